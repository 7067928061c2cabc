"""Event pictures: crops with context, and retention keeping the folder within age and size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.records import Box
from loomlens.watch import Retention
from loomlens.watch.media import crop, picture_paths


def test_crop_keeps_context_and_stays_inside() -> None:
    image = Image.new("RGB", (512, 288))
    assert crop(image, Box("hole", 200, 100, 260, 150)).size == (121, 101)
    assert crop(image, Box("hole", 0, 0, 10, 10)).size == (38, 38)  # at least 64 wide, cut by the edge


def test_retention_removes_old_then_oldest_and_only_event_pictures(tmp_path) -> None:
    folder = tmp_path / "media" / "loom1"
    folder.mkdir(parents=True)
    now = time.time()
    names = []
    for age_days in [40, 10, 5, 1, 0]:
        frame, _ = picture_paths(tmp_path / "media", "loom1")
        names.append(Path(frame).name)
        Path(frame).write_bytes(b"x" * 400_000)
        os.utime(frame, (now - age_days * 86400, now - age_days * 86400))
    others = [folder / "calibration.yaml", tmp_path / "media" / "roll-report.xlsx", folder / "0.jpg"]
    for path in others:  # the plant's own files in the same folder: old and large, and kept
        path.write_bytes(b"y" * 400_000)
        os.utime(path, (now - 60 * 86400, now - 60 * 86400))
    retention = Retention(tmp_path / "media", keep_days=30, keep_mb=1.0)
    assert retention.prune() == 3  # the 40-day one is too old; the next two go for size (1 MB holds two)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names[3:], "calibration.yaml", "0.jpg"])
    assert all(path.exists() for path in others)


@pytest.mark.parametrize("bad", [{"keep_days": 0}, {"keep_mb": -1}])
def test_bad_retention_is_refused(tmp_path, bad) -> None:
    with pytest.raises(ValueError, match="keep"):
        Retention(tmp_path, **bad)


def test_a_picture_disk_that_fails_records_the_event_without_pictures(tmp_path, caplog) -> None:
    import threading

    from loomlens.events import EventStore
    from loomlens.watch import DebounceSettings, Watcher, open_source

    from .test_folder_restart import _frames
    from .test_stream_reconnect import bright_boxes

    _frames(tmp_path / "frames", 4)
    (tmp_path / "media").write_text("a file where the picture folder should be")  # as a full or unmounted disk fails
    store = EventStore(tmp_path / "events.db")
    source = open_source(str(tmp_path / "frames"), camera="loom 1", fps=100, once=True)
    stats = Watcher(sources=[source], detect=bright_boxes, store=store, media=tmp_path / "media",
                    debounce=DebounceSettings(k=1, n=1, m=1)).run(threading.Event())
    assert stats["frames"] == 4 and stats["events"] == 2 and not stats["failed"]
    events, total = store.query(limit=10)
    assert total == 2 and all(e.frame_path is None and e.crop_path is None for e in events)
    assert "recorded without them" in caplog.text


def test_a_line_scan_strip_longer_than_a_jpeg_holds_gets_its_event_pictures(tmp_path) -> None:
    """A 70000 px strip: a JPEG holds at most 65500 px a side, and saving the event's frame
    raised and stopped the whole watcher; its pictures are now shrunk to fit."""
    import io
    import threading

    from loomlens.events import EventStore
    from loomlens.watch import DebounceSettings, Watcher, open_source

    (tmp_path / "strips").mkdir()
    Image.new("RGB", (70000, 4), (90, 90, 90)).save(tmp_path / "strips" / "strip.png")
    source = open_source(str(tmp_path / "strips"), camera="line 1", fps=100, once=True)
    store = EventStore(tmp_path / "events.db")
    whole = lambda images: [[Box("stain", 0, 0, im.width, im.height, 0.9)] for im in images]  # noqa: E731
    stats = Watcher(sources=[source], detect=whole, store=store, media=tmp_path / "media",
                    debounce=DebounceSettings(k=1, n=1, m=1)).run(threading.Event())
    assert stats["frames"] == 1 and stats["events"] == 1 and not stats["failed"]
    (event,), _ = store.query(limit=10)
    assert event.width == 70000  # the event in the frame's own pixels
    for path in (event.frame_path, event.crop_path):
        with Image.open(io.BytesIO(Path(path).read_bytes())) as picture:
            assert picture.format == "JPEG" and max(picture.size) <= 65500
