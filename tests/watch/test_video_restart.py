"""A watcher of a video file that is killed (or stopped) midway and started again goes on after the
last frame whose events were recorded: every defect is one event over both runs (a restart used
to read the file from its first frame and record every earlier defect a second time). Another
file at the same path is read from its start; a file read to its end records nothing new."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import pytest

from loomlens.events import EventStore
from loomlens.watch import DebounceSettings, Watcher, open_source

from .conftest import kill_9_once_recorded, recorded, write_video
from .test_stream_reconnect import bright_boxes

ROOT = Path(__file__).resolve().parents[2]
PLACES = [(60, 60, 120, 110), (300, 150, 380, 200), (200, 40, 260, 90)]
# The killed watcher: the same watch, a detector slowed to 0.15 s a frame so the kill lands midway.
CHILD = """
import sys, time
from loomlens.events import EventStore
from loomlens.watch import DebounceSettings, Watcher, open_source
from tests.watch.test_stream_reconnect import bright_boxes
source = open_source(sys.argv[1], camera="loom 1", fps=100)
slow = lambda images: (time.sleep(0.15), bright_boxes(images))[1]
Watcher(sources=[source], detect=slow, store=EventStore(sys.argv[2]),
        debounce=DebounceSettings(k=1, n=1, m=1)).run()
"""


def _video(path: Path, frames: int = 24, shift: int = 0) -> Path:
    """Defect, fabric, defect elsewhere, fabric, ...: one event per defect frame (k = n = m = 1)."""
    return write_video(path, {i: PLACES[(i // 2 + shift) % 3] for i in range(0, frames, 2)}, frames=frames)


def _watch(video: Path, store: EventStore, stop_after: int | None = None) -> dict:
    stop = threading.Event()
    seen = []

    def detect(images):
        seen.extend(images)
        if stop_after is not None and len(seen) >= stop_after:
            stop.set()  # the watch stops right after this frame's events are committed
        return bright_boxes(images)

    source = open_source(str(video), camera="loom 1", fps=100)
    watcher = Watcher(sources=[source], detect=detect, store=store, debounce=DebounceSettings(k=1, n=1, m=1))
    return watcher.run(stop)


def _places(store: EventStore) -> list[tuple[int, int]]:
    """Where each recorded event is, in the order they were recorded."""
    return [(round(e.x1), round(e.y1)) for e in sorted(store.query(limit=100)[0], key=lambda e: e.id)]


def _recorded(db: Path) -> list[tuple]:
    return recorded(db, "id, label, started_at, score, x1, y1, x2, y2")


def test_a_video_watch_killed_with_sigkill_and_restarted_records_each_defect_once(tmp_path) -> None:
    video, db = _video(tmp_path / "loom1.mp4"), tmp_path / "events.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    kill_9_once_recorded([sys.executable, "-c", CHILD, str(video), str(db)], db, 3, tmp_path / "child.log", env)
    before = _recorded(db)
    assert 3 <= len(before) < 12
    store = EventStore(db)
    second = _watch(video, store)
    assert second["frames"] < 24  # went on after the killed watch's mark
    assert _recorded(db)[: len(before)] == before
    assert _places(store) == [PLACES[i % 3][:2] for i in range(12)]  # 12 defect frames, 12 events


def test_a_stopped_video_watch_goes_on_after_its_last_frame(tmp_path, caplog) -> None:
    video, store = _video(tmp_path / "loom1.mp4"), EventStore(tmp_path / "events.db")
    assert _watch(video, store, stop_after=5)["frames"] == 5
    with caplog.at_level(logging.INFO, logger="loomlens.watch"):
        second = _watch(video, store)
    assert second["frames"] == 19  # the frames the first watch did not read, and only those
    assert f"going on after frame 4 of {video}" in caplog.text
    assert _places(store) == [PLACES[i % 3][:2] for i in range(12)]


class Killed(BaseException):
    """Stands for kill -9 (a BaseException: nothing on the way out takes it for an error)."""


def test_a_kill_between_an_event_and_the_batch_mark_records_that_video_event_once(tmp_path, monkeypatch) -> None:
    video, store = _video(tmp_path / "loom1.mp4", frames=4), EventStore(tmp_path / "events.db")

    def killed(*_):
        raise Killed  # the first event is committed; the watcher dies before the batch's mark

    monkeypatch.setattr(store, "set_mark", killed)
    with pytest.raises(Killed):
        _watch(video, store)
    monkeypatch.undo()
    assert len(store.query(limit=10)[0]) == 1
    assert _watch(video, store)["frames"] == 3  # the frame that started the event is not read again
    assert _places(store) == [PLACES[0][:2], PLACES[1][:2]]  # two defect frames, two events


@pytest.mark.parametrize("rewrite", ["another video", "the same bytes written again"])
def test_another_file_at_the_same_path_is_read_from_its_start(tmp_path, caplog, rewrite) -> None:
    video, store = _video(tmp_path / "loom1.mp4", frames=8), EventStore(tmp_path / "events.db")
    assert _watch(video, store, stop_after=3)["frames"] == 3
    if rewrite == "another video":
        _video(video, frames=10, shift=1)
    else:
        data = video.read_bytes()
        video.unlink()
        video.write_bytes(data)
        os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.INFO, logger="loomlens.watch"):
        second = _watch(video, store)
    assert second["frames"] == (10 if rewrite == "another video" else 8)
    assert "is not the file an earlier watch read" in caplog.text and "from its start" in caplog.text
    assert second["events"] == (5 if rewrite == "another video" else 4)


def test_a_video_read_to_its_end_and_watched_again_records_nothing_new(tmp_path, caplog) -> None:
    video, store = _video(tmp_path / "loom1.mp4", frames=8), EventStore(tmp_path / "events.db")
    assert _watch(video, store)["frames"] == 8
    assert len(store.query(limit=10)[0]) == 4
    with caplog.at_level(logging.INFO, logger="loomlens.watch"):
        again = _watch(video, store)
    assert (again["frames"], again["events"], again["failed"]) == (0, 0, {})
    assert len(store.query(limit=10)[0]) == 4
    assert "already read to its end" in caplog.text and "another --camera name or into another --db" in caplog.text
