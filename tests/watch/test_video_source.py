"""A video file source that was cut off says so instead of ending as if whole."""

from __future__ import annotations

import logging
from pathlib import Path

from loomlens.watch.sources import END, open_source

from .conftest import fabric_frame


def _avi(path: Path, frames: int) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 288))
    for i in range(frames):
        writer.write(fabric_frame((10 * i, 10, 10 * i + 40, 50)))
    writer.release()
    return path


def _read_all(path: Path) -> tuple[object, int]:
    source = open_source(str(path), fps=10)
    count = 0
    while source.poll() is not END:
        count += 1
    source.close()
    return source, count


def test_a_cut_off_video_is_reported_with_the_frame_it_ends_at(tmp_path, caplog) -> None:
    whole = _avi(tmp_path / "whole.avi", 20)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="loomlens.watch"):
        source, count = _read_all(whole)
        assert (count, source.cut_at) == (20, None) and not caplog.records
        source, count = _read_all(cut)
    assert 0 < count < 20 and source.cut_at == count
    message = caplog.records[-1].getMessage()
    assert str(cut) in message and f"frame {count} of the 20" in message and "re-copy" in message


def test_a_video_is_cut_off_only_when_over_two_percent_short_of_its_declared_count() -> None:
    from loomlens.predict.video import ends_short

    assert not ends_short(44, 44) and not ends_short(43, 44)  # whole, or one off (an estimated count)
    assert not ends_short(990, 1000) and ends_short(979, 1000)  # a variable frame rate's few frames
    assert ends_short(28, 44)  # a copy that stopped
