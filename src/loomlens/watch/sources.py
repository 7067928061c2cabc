"""Where a watcher's frames come from: a video file, a stream (RTSP, HTTP MJPEG), a camera index,
or a folder where frames land. Each source is polled; it answers a frame, nothing yet, or `END`.

A live source (stream or camera) is read by its own thread that keeps only the newest frame
(decoded at most `fps` times a second), so a slow model never lets a backlog grow; when the
stream drops, the thread reconnects with back-off, and gives up only after `max_reconnects`
failed tries in a row (None: never). A file or folder is read at its own pace and ends.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image

from loomlens.data.sanitize import IMAGE_SUFFIXES, visible
from loomlens.events.store import VideoMark
from loomlens.predict.sources import read_image
from loomlens.predict.video import ends_short, is_video, read_frames

log = logging.getLogger("loomlens.watch")

END = object()  # what `poll` answers once a source has nothing more to give
_URL = re.compile(r"^(rtsp|rtsps|rtmp|http|https)://", re.IGNORECASE)


@dataclass
class Frame:
    """One frame to predict on: the `camera` it is from, the picture (RGB), when it was seen
    (UTC; for a video file, the watch's start plus the frame's time in the file, after the mark
    when a watch goes on after an earlier one; for a folder, the file's modification time) and
    its number among the frames taken from this source."""

    camera: str
    image: Image.Image
    at: datetime
    index: int


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise RuntimeError("watching streams and videos needs OpenCV: pip install 'loomlens[video]'") from exc
    return cv2


class VideoFileSource:
    """The frames of a video file, `fps` of them per second of video, then END. How far it was
    read is `mark` (which file, the last frame read, whether to its end), and `resume_after`
    starts a new watch of the same file after an earlier one's mark."""

    live = False

    def __init__(self, path: Path, camera: str, fps: float):
        cv2 = _cv2()
        capture = cv2.VideoCapture(str(path))
        self.native = (capture.get(cv2.CAP_PROP_FPS) or 0.0) if capture.isOpened() else 0.0
        self.declared = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))) if capture.isOpened() else 0
        capture.release()
        self.camera, self.name = camera, str(path)
        self.every = max(1, round(self.native / fps)) if self.native > 0 else 1
        self.started = datetime.now(UTC)
        stat = path.stat()
        self._mark = VideoMark(stat.st_size, stat.st_mtime_ns)
        self._frames = read_frames(path, self.every)
        self._count = 0
        self.reconnects = 0
        #: The frame the file ends at when it ends before the count it declares (cut off), else None.
        self.cut_at: int | None = None

    @property
    def mark(self) -> VideoMark:
        """This file (size, mtime_ns), the index of its last frame read (-1 before the first)
        and whether it was read to its end."""
        return self._mark

    def resume_after(self, mark: VideoMark) -> None:
        """Go on after `mark` (an earlier watch's `mark`) when it is of this very file: its
        frames up to the mark are not read again (a file read to its end, none); another file,
        or this path re-written since, is read from its start. Says which in the log."""
        if (mark.size, mark.mtime_ns) != (self._mark.size, self._mark.mtime_ns):
            log.info("%s: %s is not the file an earlier watch read (its size or modification time differ): "
                     "reading it from its start", self.camera, self.name)
            return
        self._mark = mark
        if mark.ended:
            log.info("%s: %s was already read to its end by an earlier watch: nothing new to record; to read "
                     "it again, watch it under another --camera name or into another --db", self.camera, self.name)
            return
        log.info("%s: going on after frame %d of %s, the last frame an earlier watch read",
                 self.camera, mark.frame, self.name)
        if self.native > 0:  # the frames after the mark are timed from now, not as far ahead as the mark is in
            self.started -= timedelta(seconds=(mark.frame + 1) / self.native)

    def poll(self) -> Frame | None | object:
        """The next sampled frame after the mark, or END after the last (a file cut off before
        its declared end is logged, naming the frame it ends at, and kept in `cut_at`)."""
        if self._mark.ended:
            return END
        try:
            frame = next(self._frames)
            # read and discarded up to the mark: a seek (CAP_PROP_POS_FRAMES) lands off with B-frames (opencv#9053)
            while frame.index <= self._mark.frame:
                frame = next(self._frames)
        except StopIteration as end:
            self._ended(end.value)
            return END
        self._count += 1
        self._mark = self._mark._replace(frame=frame.index)
        return Frame(self.camera, frame.image, self.started + timedelta(seconds=frame.timestamp), self._count - 1)

    def _ended(self, read: int | None) -> None:
        """The file gave its last frame (`read` frames in all): mark it read to its end, and log
        it when it ends before its declared count (cut off). Raises ValueError when it gave none."""
        if self._mark.frame < 0:
            raise ValueError(f"{self.name} holds no frame OpenCV can decode: re-copy or re-encode it") from None
        self._mark = self._mark._replace(ended=True)
        if read is not None and ends_short(read, self.declared):
            self.cut_at = read
            log.warning("%s ends at frame %d of the %d it declares (cut off or damaged): the frames after "
                        "it were not watched; re-copy the file (or re-encode it) and watch it again",
                        self.name, read, self.declared)

    def close(self) -> None:
        """Stop reading the file."""
        self._frames.close()


#: The names read last that each look of a folder stats again, so that a camera that writes its
#: frames under one name again and again (`latest.jpg`), or a ring of up to this many names, is
#: read each time it writes, while a look still costs a bounded number of stats.
REREAD = 8


class FolderSource:
    """Image files landing in a folder, oldest first (by modification time, then name), each
    seen when it landed (its modification time, not when a busy or restarted watcher got to
    it). With `once`, the files there now and then END; otherwise it keeps looking every
    `1 / fps` seconds. How far it has read is a watermark, `mark`, and `resume_after` starts a
    new watch of the folder after an earlier one's mark. The folder is listed again only once
    the files newer than the mark at the last listing are read, so a backlog costs one
    listing, not one per frame. The names a listing met are remembered (and forgotten once
    they leave the folder), so a listing stats only the names it has not met: a new frame
    costs one stat, not one per file the folder holds. Of the names read, only the last
    `REREAD` are looked at again, so a frame written again under one of those (a camera that
    keeps one name, or a short ring of names) is read again, and one under an older name is
    not. A file that lands with a modification time below the mark (copied keeping its time:
    `cp -p`, `rsync -a`) is not read, and a warning counts such files as they appear; it is
    read, like a file skipped as unreadable, once it is written again with a time above the
    mark (a plain `cp`)."""

    live = False

    def __init__(self, folder: Path, camera: str, fps: float, once: bool) -> None:
        self.folder, self.camera, self.name, self.once = folder, camera, str(folder), once
        self.interval = 1.0 / fps
        self._mark: tuple[int, str] = (-1, "")
        self._known: set[str] = set()  # names settled: read, not a frame, or below the mark at the first look
        self._unread: dict[str, int] = {}  # names at or below the mark, not read (landed late, skipped) -> mtime_ns
        self._looked = False
        self._recent: deque[str] = deque(maxlen=REREAD)  # the names read last, looked at again
        self._queue: deque[tuple[tuple[int, str], Path]] = deque()  # the last listing's new files not read yet
        self._stop_at: tuple[int, str] | None = None
        self._next_look = 0.0
        self._count = 0
        self.reconnects = 0
        if once:
            keys = [key for name in self._listing() if _is_frame(name) and (key := self._key(name)) is not None]
            self._stop_at = max(keys, default=(-1, ""))
        self._say_subfolders()

    def _say_subfolders(self) -> None:
        """Log, at start, how many subfolders (hidden ones aside) the folder holds: only its own
        frames are read, and a camera writing into per-day or per-line subfolders would
        otherwise seem to send nothing at all."""
        with os.scandir(self.folder) as entries:
            subfolders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if subfolders:
            log.warning("%s: %d subfolder%s of %s not watched (%s): only the frames in the folder itself are read; "
                        "to watch a subfolder, give each as a source of its own, e.g. loomlens watch %s",
                        self.camera, len(subfolders), "s" if len(subfolders) > 1 else "", self.folder,
                        ", ".join(subfolders[:3]) + (", ..." if len(subfolders) > 3 else ""),
                        self.folder / subfolders[0])

    def _listing(self) -> list[str]:
        """The names in the folder (one directory read; nothing stat-ed)."""
        return os.listdir(self.folder)

    def _key(self, name: str) -> tuple[int, str] | None:
        """(modification time in ns, name) of the file `name`; None when it is gone."""
        try:
            return (os.stat(self.folder / name).st_mtime_ns, name)
        except FileNotFoundError:  # removed while listed
            return None

    @property
    def mark(self) -> tuple[int, str]:
        """(modification time in ns, name) of the last file read; (-1, "") before the first."""
        return self._mark

    def resume_after(self, mark: tuple[int, str]) -> None:
        """Go on after `mark` (an earlier watch's `mark`): the files up to it are not read again.
        Says so in the log."""
        self._mark = max(self._mark, (int(mark[0]), str(mark[1])))
        self._queue.clear()
        log.info("%s: going on after %s, the last frame an earlier watch read", self.camera, mark[1])

    def poll(self) -> Frame | None | object:
        """The oldest image newer than the last one read; None when there is none yet; END
        (with `once`) when every file that was there at the start has been read."""
        if self.once and self._mark >= self._stop_at:
            return END
        if not self._queue:
            if time.monotonic() < self._next_look:
                return None
            self._look()
            if not self._queue:
                self._next_look = time.monotonic() + self.interval
                return END if self.once else None
        key, path = self._queue[0]
        try:
            now = (path.stat().st_mtime_ns, path.name)  # a frame finished since the listing has a later time
            image = read_image(path)
        except (ValueError, OSError) as exc:
            if not self.once and time.time() - key[0] / 1e9 < 2.0:
                self._queue.clear()  # still being written: try it again on the next look
                self._next_look = time.monotonic() + self.interval
                return None
            log.warning("skipping %s: %s", path, exc)
            self._advance()
            return None
        self._advance(now)
        self._count += 1
        landed = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=key[0] // 1000)  # exact, unlike ns / 1e9
        return Frame(self.camera, image, landed, self._count - 1)

    def _look(self) -> None:
        """List the folder once and stat only the names not met before (and the files below the
        mark not read, whose time may have moved): queue those newer than the mark (up to the
        end of a `once` watch) in order, and warn of files that appeared at or below it since
        the last listing."""
        present = set(self._listing())
        self._known &= present  # a name that leaves the folder and comes back is new again
        self._unread = {name: ns for name, ns in self._unread.items() if name in present}
        fresh, landed_below = [], 0
        for name in present - self._known:
            if not _is_frame(name):
                self._known.add(name)
                continue
            key = self._key(name)
            if key is None or self._unread.get(name) == key[0]:
                continue
            if key > self._mark:
                self._unread.pop(name, None)
                if self._stop_at is None or key <= self._stop_at:
                    fresh.append((key, self.folder / name))
            elif not self._looked:
                self._known.add(name)  # at or below the mark when the watch began: read by an earlier one
            else:
                landed_below += name not in self._unread
                self._unread[name] = key[0]
        fresh += self._rewritten(present, fresh)
        if landed_below:
            log.warning("%s: %d file(s) landed in %s with a modification time before the last frame read (%s), "
                        "so they are not read: copy frames in without keeping their times (not cp -p or rsync -a)",
                        self.camera, landed_below, self.folder, self._mark[1])
        self._looked = True
        self._queue.extend(sorted(fresh))

    def _rewritten(self, present: set[str], fresh: list[tuple[tuple[int, str], Path]]
                   ) -> list[tuple[tuple[int, str], Path]]:
        """The files among the last `REREAD` read that were written again since (their time
        now above the mark), and not already in `fresh` or the queue."""
        waiting = {path.name for _, path in (*self._queue, *fresh)}
        found = []
        for name in set(self._recent) & present - waiting:
            key = self._key(name)
            if key is not None and key > self._mark and (self._stop_at is None or key <= self._stop_at):
                found.append((key, self.folder / name))
        return found

    def _advance(self, now: tuple[int, str] | None = None) -> None:
        """Move the mark past the first queued file, just read (or skipped), and past its time
        `now` when it was read: a frame still being written when listed is not read again. A
        file read is settled; one skipped is looked at again should its time move."""
        key, path = self._queue.popleft()
        self._mark = max(self._mark, key, now or key)
        if now is None:
            self._unread[path.name] = key[0]
        else:
            self._known.add(path.name)
            self._recent.append(path.name)

    def close(self) -> None:
        """Nothing to release."""


def _is_frame(name: str) -> bool:
    """Whether a file `name` in the folder may be a frame (`sanitize.visible`: the rule
    `convert` and `predict` list folders by)."""
    return visible((name,), IMAGE_SUFFIXES)


class LiveSource:
    """A stream URL or camera index, read by a thread that keeps the newest frame.

    Args:
        target: the URL, or the camera index as an int.
        camera: the camera id events are recorded under.
        fps: frames a second handed out at most (the rest are grabbed and dropped undecoded).
        max_reconnects: failed connection tries in a row before the source ends (None: never).
        backoff_s: the first wait before reconnecting; it doubles per failure up to 30 s.
        timeout_s: how long opening or reading may stall before the stream counts as dropped.
    """

    live = True

    def __init__(self, target: str | int, camera: str, fps: float, *, max_reconnects: int | None = None,
                 backoff_s: float = 0.5, timeout_s: float = 10.0):
        self.cv2 = _cv2()
        self.target, self.camera, self.name = target, camera, redact(str(target))
        self.interval = 1.0 / fps
        self.max_reconnects, self.backoff_s, self.timeout_s = max_reconnects, backoff_s, timeout_s
        self.reconnects = 0
        self._lock = threading.Lock()
        self._latest: tuple[object, datetime] | None = None
        self._ended = False
        self._gave_up: str | None = None  # why the reader stopped trying, once it has
        self._stop = threading.Event()
        self._count = 0
        self._thread = threading.Thread(target=self._run, name=f"loomlens-watch-{camera}", daemon=True)
        self._thread.start()

    def _open(self):
        cv2 = self.cv2
        ms = int(self.timeout_s * 1000)
        if isinstance(self.target, int):
            return cv2.VideoCapture(self.target)
        return cv2.VideoCapture(self.target, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])

    def _read(self, capture) -> Iterator[None]:
        """Grab every frame; decode and keep one per interval. Yields after each kept frame."""
        last = 0.0
        while not self._stop.is_set() and capture.grab():
            now = time.monotonic()
            if now - last < self.interval:
                continue
            ok, bgr = capture.retrieve()
            if not ok:
                break
            last = now
            with self._lock:
                self._latest = (bgr, datetime.now(UTC))
            yield

    def _run(self) -> None:
        failures, ever = 0, False
        while not self._stop.is_set():
            capture = self._open()
            got = False
            try:
                if capture.isOpened():
                    for _ in self._read(capture):
                        got, failures, ever = True, 0, True
            finally:
                capture.release()
            if self._stop.is_set():
                break
            failures += not got
            if self.max_reconnects is not None and failures > self.max_reconnects:
                self._gave_up = (f"{self.name}: gave up after {failures} failed connection(s) in a row"
                                 f"{'' if ever else ', no frame ever read'}: check that the camera is on and "
                                 "its address is right (--max-reconnects sets how many tries)")
                break
            wait = min(30.0, self.backoff_s * 2 ** max(0, failures - 1))
            log.warning("%s: stream dropped; reconnecting in %.1f s", self.name, wait)
            self.reconnects += 1
            self._stop.wait(wait)
        with self._lock:
            self._ended = True

    def poll(self) -> Frame | None | object:
        """The newest frame not handed out yet, None when there is none, END once the reader
        stopped (`close`). Raises ValueError saying why once it gave up (`max_reconnects`): a
        camera off or a wrong address is a failed source, not a watch that ended well."""
        with self._lock:
            latest, self._latest, ended = self._latest, None, self._ended
        if latest is None:
            if ended and self._gave_up:
                raise ValueError(self._gave_up)
            return END if ended else None
        bgr, at = latest
        self._count += 1
        image = Image.fromarray(self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB))
        return Frame(self.camera, image, at, self._count - 1)

    def close(self) -> None:
        """Stop the reader thread (it ends within one read timeout)."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 1)


def redact(url: str) -> str:
    """`url` without its `user:password@` part: what goes into logs, the database and alerts."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


def default_camera(spec: str) -> str:
    """A camera id for a source: `cam0` for index 0, the file or folder name, host and path of
    a URL (credentials dropped), in letters, digits, `.`, `_` and `-`."""
    if spec.isdigit():
        return f"cam{spec}"
    if _URL.match(spec):
        rest = spec.split("://", 1)[1].split("?", 1)[0].rsplit("@", 1)[-1]
        name = rest.strip("/")
    else:
        path = Path(spec)
        name = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "camera"


def check_camera(camera: str) -> str:
    """`camera` when it can name the folder of its event pictures under --media (one name: no
    `/` or `\\`, not `.` or `..`), else ValueError naming it and a fix: a `../x` or `/x` id put
    its pictures outside --media, where retention never looks."""
    if camera in (".", "..") or any(c in camera for c in "/\\\0"):
        fix = re.sub(r"[/\\\0]+", "-", camera).strip(".-") or "camera"
        raise ValueError(f"--camera {camera!r} names a folder path, but a camera id names the folder of its event "
                         f"pictures under --media: give one name without '/' or '\\' (e.g. {fix!r})")
    return camera


def open_source(spec: str, *, camera: str | None = None, fps: float = 2.0, once: bool = False,
                max_reconnects: int | None = None, timeout_s: float = 10.0) -> VideoFileSource | FolderSource | LiveSource:
    """The source `spec` names: a camera index (`0`), an RTSP/HTTP(S) URL, a folder or a video
    file; `camera` is its id (default `default_camera(spec)`).

    Raises ValueError for a spec that is none of those, an fps that is not positive, or a
    `camera` that is a path (`check_camera`)."""
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    camera = check_camera(camera or default_camera(spec))
    if spec.isdigit():
        return LiveSource(int(spec), camera, fps, max_reconnects=max_reconnects, timeout_s=timeout_s)
    if _URL.match(spec):
        return LiveSource(spec, camera, fps, max_reconnects=max_reconnects, timeout_s=timeout_s)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, camera, fps, once)
    if path.is_file() and is_video(path):
        return VideoFileSource(path, camera, fps)
    if path.is_file():
        raise ValueError(f"{spec} is not a video file; watch a folder of images, a video, a stream URL "
                         "(rtsp://, http://) or a camera index")
    raise ValueError(f"no such source {redact(spec)!r}: give a video file, a folder where frames land, an "
                     "rtsp:// or http:// URL, or a camera index such as 0")
