"""The watcher: frames from its sources -> the model (through `loomlens.predict`) -> debounced
defect events -> the event store, pictures on disk and alerts.

Frames due from every source are predicted as one batch. Each camera has its own debouncer.
An event is written (committed) when it starts, updated when its best score rises, and ended
when the defect has gone; an event a killed watcher left open is marked interrupted when a
watcher for that camera starts again. Memory is bounded: live sources keep one frame, the
debouncers a capped number of tracks, and each track only the JPEGs of its best frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from loomlens.data.records import Box
from loomlens.events.store import Event, EventStore, Mark, VideoMark
from loomlens.watch.alerts import Alerter
from loomlens.watch.debounce import Change, DebounceSettings, Debouncer, Track
from loomlens.watch.media import Retention, crop, jpeg, picture_paths, write_jpeg
from loomlens.watch.sources import END, Frame

log = logging.getLogger("loomlens.watch")

Detect = Callable[[list[Image.Image]], list[list[Box]]]
#: The label of a whole-frame box for a frame the model holds defective without placing a box.
UNLOCATED = "unlocated"


def predictor_detector(predictor, *, tile: str = "auto", score_threshold: float = 0.0,
                       flag_threshold: float | None = None) -> Detect:
    """A `Detect` over a `loomlens.predict.Predictor` (or an object with its `predict`): `od`
    boxes per image, tiled as the run was trained (`tile` auto) and filtered by its region
    rules and `score_threshold`.

    With `flag_threshold`, a frame left without a box whose defect probability
    (`Prediction.answer_probability`) is at least it gets one box over the whole frame,
    labelled `UNLOCATED` and scored by that probability, so a defect the model is sure of but
    could not place still becomes an event (debounced like any box: the same whole-frame box
    frame after frame). The probability is the model's before region rules, which cannot
    place it either. `loomlens eval`'s false-alarm rate for a threshold counts this probability
    alone: a frame with a box kept by `score_threshold` and the region rules is flagged
    whatever its probability, a false alarm on a good frame that rate does not count."""

    def boxes(p) -> list[Box]:
        if p.boxes or flag_threshold is None or p.answer_probability is None or p.answer_probability < flag_threshold:
            return p.boxes
        return [Box(UNLOCATED, 0.0, 0.0, float(p.width), float(p.height), p.answer_probability)]

    def detect(images: list[Image.Image]) -> list[list[Box]]:
        return [boxes(p) for p in predictor.predict(images, task="od", tile=tile, score_threshold=score_threshold)]

    return detect


@dataclass
class _Snapshot:
    """A track's best frame as JPEGs, kept until the track starts or improves an event."""

    frame: int
    full: bytes
    crop: bytes


@dataclass
class _Camera:
    """One camera's state: its debouncer, the event id and times of each track, best JPEGs."""

    debouncer: Debouncer
    source: str
    events: dict[int, int] = field(default_factory=dict)
    first_at: dict[int, datetime] = field(default_factory=dict)
    last_at: dict[int, datetime] = field(default_factory=dict)
    snapshots: dict[int, _Snapshot] = field(default_factory=dict)
    flushed: dict[int, float] = field(default_factory=dict)
    paths: dict[int, tuple[str, str]] = field(default_factory=dict)


class Watcher:
    """Watches `sources` until they end (or `stop` is set).

    Args:
        sources: opened sources (`loomlens.watch.sources.open_source`).
        detect: images -> boxes per image (`predictor_detector`).
        store: where events go.
        media: the folder for event JPEGs (None: no pictures).
        debounce: k of n / m settings, shared by every camera.
        alerts: where new events are announced (None: nowhere).
        retention: the limits on `media` (None: none).
        seen_every_s: how often an open event's last-seen time and frame count are written.
        idle_s: sleep when no source has a frame ready.
    """

    def __init__(self, *, sources: Sequence, detect: Detect, store: EventStore, media: Path | None = None,
                 debounce: DebounceSettings | None = None, alerts: Alerter | None = None,
                 retention: Retention | None = None, seen_every_s: float = 5.0, idle_s: float = 0.02):
        cameras = [s.camera for s in sources]
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"two sources share a camera id ({cameras}); name each with --camera")
        self.sources = list(sources)
        self.detect, self.store, self.media, self.alerts, self.retention = detect, store, media, alerts, retention
        self.debounce = debounce or DebounceSettings()
        self.seen_every_s, self.idle_s = seen_every_s, idle_s
        self.cameras = {s.camera: _Camera(Debouncer(self.debounce), s.name) for s in self.sources}
        self.stats = {"frames": 0, "events": 0, "ended": 0, "interrupted_before": 0}
        self._marks: dict[str, Mark] = {}  # camera -> its folder's or video's mark at the batch's frame

    def run(self, stop: threading.Event | None = None) -> dict:
        """Watch until every source ended or `stop` is set; open events are then ended. A
        source that fails (a file OpenCV cannot read) is logged and ended; the others go on.
        Returns counts: frames, events started and ended, events a previous run left open,
        reconnects, and `failed`: camera -> why, for the sources that failed."""
        stop = stop or threading.Event()
        for source in self.sources:
            self._resume(source)
        self.stats["interrupted_before"] = self.store.interrupt_open(list(self.cameras))
        self.stats["failed"] = {}
        active = list(self.sources)
        try:
            while active and not stop.is_set():
                due: list[Frame] = []
                for source in list(active):
                    got = self._poll(source)
                    if got is END:
                        active.remove(source)
                        self._finish(source.camera)
                        if source.camera not in self.stats["failed"]:
                            self._save_marks({source.camera})  # a video file read to its end is marked so
                    elif got is not None:
                        due.append(got)
                if not due:
                    stop.wait(self.idle_s)
                    continue
                # A folder's or video file's mark goes with the events its frame starts (one
                # transaction), and after the batch for frames that started none.
                self._marks = {s.camera: s.mark for s in active if hasattr(s, "mark")}
                for frame, boxes in zip(due, self.detect([f.image for f in due]), strict=True):
                    self._frame(frame, boxes)
                self.stats["frames"] += len(due)
                self._save_marks({f.camera for f in due})
                if self.retention is not None:
                    self.retention.maybe_prune()
        finally:
            for source in self.sources:
                source.close()
            for camera in self.cameras:
                self._finish(camera)
        self.stats["reconnects"] = {s.camera: s.reconnects for s in self.sources}
        return dict(self.stats)

    def _poll(self, source) -> Frame | None | object:
        """`source.poll()`; a source that raises (damaged file, unreadable frame) is reported,
        kept in `stats["failed"]` and ends (END), so one bad camera never stops the others."""
        try:
            return source.poll()
        except (ValueError, OSError) as exc:
            log.error("%s stopped: %s; the other sources go on", source.camera, exc)
            self.stats["failed"][source.camera] = str(exc)
            return END

    def _resume(self, source) -> None:
        """A frame folder or video file an earlier watch of this camera read: `source` goes on
        after the mark that watch stored (a live stream has none)."""
        if not hasattr(source, "mark"):
            return
        video = isinstance(source.mark, VideoMark)
        mark = self.store.video_mark(source.camera) if video else self.store.folder_mark(source.camera)
        if mark is not None:
            source.resume_after(mark)

    def _save_marks(self, cameras: set[str]) -> None:
        """Record how far the frame folders and video files of `cameras` were read (after their
        frames' events are committed), so a restarted watcher neither reads them again nor
        records their events twice."""
        for source in self.sources:
            if source.camera in cameras and hasattr(source, "mark"):
                self.store.set_mark(source.camera, source.mark)

    def _frame(self, frame: Frame, boxes: list[Box]) -> None:
        cam = self.cameras[frame.camera]
        changes = cam.debouncer.update(frame.index, boxes)
        full: bytes | None = None
        live = {t.id for t in cam.debouncer.tracks}
        for track in cam.debouncer.tracks:
            if track.last_frame == frame.index:
                cam.last_at[track.id] = frame.at
                cam.first_at.setdefault(track.id, frame.at)
            if track.best_frame == frame.index and self.media is not None:
                snap = cam.snapshots.get(track.id)
                if snap is None or snap.frame != frame.index:
                    full = full or jpeg(frame.image)
                    cam.snapshots[track.id] = _Snapshot(frame.index, full, jpeg(crop(frame.image, track.best)))
        for change in changes:
            self._apply(frame, cam, change)
        for state in (cam.first_at, cam.last_at, cam.snapshots, cam.flushed, cam.paths):
            for track_id in set(state) - live:
                del state[track_id]

    def _pictures(self, camera: str, cam: _Camera, track: Track) -> dict:
        """Write the track's best JPEGs (over its earlier ones); their paths for the row."""
        snap = cam.snapshots.get(track.id)
        if snap is None or self.media is None:
            return {}
        if track.id not in cam.paths:
            cam.paths[track.id] = picture_paths(self.media, camera)
        frame_path, crop_path = cam.paths[track.id]
        try:
            write_jpeg(Path(frame_path), snap.full)
            write_jpeg(Path(crop_path), snap.crop)
        except OSError as err:  # a full or unmounted picture disk must not stop the line's record
            log.error("cannot write the event's pictures (%s); the event is recorded without them", err)
            return {}
        return {"frame_path": frame_path, "crop_path": crop_path}

    def _apply(self, frame: Frame, cam: _Camera, change: Change) -> None:
        track, camera = change.track, frame.camera
        best = track.best
        where = {"score": float(best.score if best.score is not None else 1.0),
                 "x1": best.x1, "y1": best.y1, "x2": best.x2, "y2": best.y2}
        last_at = cam.last_at.get(track.id, frame.at)
        if change.kind == "started":
            ev = Event(camera=camera, label=track.label, started_at=cam.first_at.get(track.id, frame.at),
                       last_seen_at=last_at, width=frame.image.width, height=frame.image.height,
                       frames=track.hits, source=cam.source, **where,
                       **self._pictures(camera, cam, track))
            cam.events[track.id] = self.store.start(ev, self._marks.get(camera))
            cam.flushed[track.id] = time.monotonic()
            self.stats["events"] += 1
            log.info("event %d: %s on %s (score %.2f)", ev.id, track.label, camera, ev.score)
            if self.alerts is not None:
                self.alerts.send({"type": "defect", **ev.as_json()})
            return
        event_id = cam.events.get(track.id)
        if event_id is None:
            return
        if change.kind == "improved":
            self.store.update(event_id, last_seen_at=last_at, frames=track.hits, **where,
                              **self._pictures(camera, cam, track))
            cam.flushed[track.id] = time.monotonic()
        elif change.kind == "seen" and time.monotonic() - cam.flushed.get(track.id, 0.0) >= self.seen_every_s:
            self.store.update(event_id, last_seen_at=last_at, frames=track.hits)
            cam.flushed[track.id] = time.monotonic()
        elif change.kind == "ended":
            self._end(cam, track, last_at)

    def _end(self, cam: _Camera, track: Track, last_at: datetime) -> None:
        event_id = cam.events.pop(track.id, None)
        if event_id is None:
            return
        self.store.update(event_id, status="ended", ended_at=last_at, last_seen_at=last_at, frames=track.hits)
        self.stats["ended"] += 1

    def _finish(self, camera: str) -> None:
        """The camera's source ended: end its open events when their defect was last seen."""
        cam = self.cameras[camera]
        for change in cam.debouncer.finish():
            self._end(cam, change.track, cam.last_at.get(change.track.id) or datetime.now(UTC))
