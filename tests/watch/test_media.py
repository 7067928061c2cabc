"""Event pictures: crops with context, and retention keeping the folder within age and size."""

from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from loomlens.data.records import Box
from loomlens.watch import Retention
from loomlens.watch.media import crop


def test_crop_keeps_context_and_stays_inside() -> None:
    image = Image.new("RGB", (512, 288))
    assert crop(image, Box("hole", 200, 100, 260, 150)).size == (121, 101)
    assert crop(image, Box("hole", 0, 0, 10, 10)).size == (38, 38)  # at least 64 wide, cut by the edge


def test_retention_removes_old_then_oldest(tmp_path) -> None:
    folder = tmp_path / "media" / "loom1"
    folder.mkdir(parents=True)
    now = time.time()
    for i, age_days in enumerate([40, 10, 5, 1, 0]):
        path = folder / f"{i}.jpg"
        path.write_bytes(b"x" * 400_000)
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    retention = Retention(tmp_path / "media", keep_days=30, keep_mb=1.0)
    assert retention.prune() == 3  # 0 is too old; 1 and 2 go for size (1 MB holds two files)
    assert sorted(p.name for p in folder.iterdir()) == ["3.jpg", "4.jpg"]


@pytest.mark.parametrize("bad", [{"keep_days": 0}, {"keep_mb": -1}])
def test_bad_retention_is_refused(tmp_path, bad) -> None:
    with pytest.raises(ValueError, match="keep"):
        Retention(tmp_path, **bad)
