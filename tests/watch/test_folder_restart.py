"""A watcher of a frame folder that stops midway and starts again goes on after the last frame it
read: every defect is one event, none recorded twice (a restart used to read the whole folder
again and record every earlier defect a second time)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from loomlens.events import EventStore
from loomlens.watch import DebounceSettings, Watcher, open_source

from .conftest import fabric_frame
from .test_stream_reconnect import bright_boxes

PLACES = [(60, 60, 120, 110), (300, 150, 380, 200), (200, 40, 260, 90)]


def _frames(folder: Path, count: int) -> None:
    """Defect, fabric, defect elsewhere, fabric, ...; all with the same modification time (a
    coarse file-system clock), so only the names order them."""
    import cv2

    folder.mkdir()
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        cv2.imwrite(str(path), fabric_frame(PLACES[(i // 2) % 3] if i % 2 == 0 else None))
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


def _watch(folder: Path, store: EventStore, stop_after: int | None = None) -> dict:
    stop = threading.Event()
    seen = []

    def detect(images):
        seen.extend(images)
        if stop_after is not None and len(seen) >= stop_after:
            stop.set()  # as a kill would: right after this frame's events are committed
        return bright_boxes(images)

    source = open_source(str(folder), camera="loom 1", fps=100, once=stop_after is None)
    watcher = Watcher(sources=[source], detect=detect, store=store, debounce=DebounceSettings(k=1, n=1, m=1))
    return watcher.run(stop)


def test_a_restarted_folder_watch_records_each_defect_once(tmp_path) -> None:
    folder = tmp_path / "frames"
    _frames(folder, 12)
    store = EventStore(tmp_path / "events.db")
    first = _watch(folder, store, stop_after=5)
    assert first["frames"] == 5
    second = _watch(folder, store)
    assert second["frames"] == 7  # the frames the first watch did not read, and only those
    events = sorted(store.query(limit=100)[0], key=lambda e: e.id)
    assert len(events) == 6  # six defect frames, six events
    assert [tuple(round(v) for v in (e.x1, e.y1)) for e in events] == [PLACES[i % 3][:2] for i in range(6)]


class Killed(BaseException):
    """Stands for kill -9 (a BaseException: nothing on the way out takes it for an error)."""


def test_a_kill_between_an_event_and_the_batch_mark_records_that_event_once(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "frames"
    _frames(folder, 4)  # defect, fabric, defect elsewhere, fabric
    store = EventStore(tmp_path / "events.db")

    def killed(*_):
        raise Killed  # the first event is committed; the watcher dies before the batch's mark

    monkeypatch.setattr(store, "set_mark", killed)
    with pytest.raises(Killed):
        _watch(folder, store)
    monkeypatch.undo()
    assert len(store.query(limit=10)[0]) == 1
    assert _watch(folder, store)["frames"] == 3  # the frame that started the event is not read again
    assert len(store.query(limit=10)[0]) == 2  # two defect frames, two events
