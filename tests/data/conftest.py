"""Helpers for the data tests: tiny datasets written on disk in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.records import Box, ImageRecord


def write_image(path: Path, size: tuple[int, int] = (64, 48), fmt: str | None = None) -> Path:
    """A small solid image at `path` (format from the suffix unless `fmt`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 130, 140)).save(path, fmt)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_samples(out: Path) -> list[dict]:
    """Every sample of every split in a convert output folder."""
    return [s for name in ("train", "val", "test") if (out / f"{name}.jsonl").exists()
            for s in read_jsonl(out / f"{name}.jsonl")]


@pytest.fixture
def records() -> list[ImageRecord]:
    """Three images: two with boxes of the seed's classes (one with a hyphen and a space in a
    name, one box touching the right and bottom edges), one negative."""
    return [
        ImageRecord("images/a.jpg", 640, 360, [Box("drop", 468.5, 173.25, 479.0, 180.75),
                                               Box("broken-weft", 10.0, 20.0, 300.0, 26.5)]),
        ImageRecord("images/b.jpg", 320, 240, [Box("wrinkle", 100.0, 200.0, 320.0, 240.0),
                                               Box("Broken Weft", 5.0, 5.0, 50.0, 9.0)]),
        ImageRecord("images/c.jpg", 320, 240, []),
    ]


#: The start of convert's problem for a held-out split of defect-free images only, which the
#: small fixtures here (one val image, often a clean one) meet on purpose.
NO_DEFECT = "the val split holds no defect box"


def besides_no_defect(problems: list) -> list:
    """`problems` without convert's val-split-without-a-defect one (`NO_DEFECT`)."""
    return [p for p in problems if not p.message.startswith(NO_DEFECT)]
