"""What `loomlens predict` reads: image files, folders, globs and video files, as a stream of
items (a still image, or one sampled frame of a video) with where each came from."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loomlens.predict.video import frame_count, is_video, read_frames

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass
class Item:
    """One picture to predict on: its `source` file, the frame index and timestamp (seconds)
    for a video frame (None for a still image), and the picture itself."""

    source: Path
    image: Image.Image
    frame: int | None = None
    timestamp: float | None = None


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image and video files named by `inputs` (files, folders searched recursively, glob
    patterns), sorted within each input, duplicates removed. Raises FileNotFoundError for an
    input that names nothing, and ValueError for a file that is neither image nor video."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES or is_video(p))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES and not is_video(path):
                raise ValueError(f"{path} is neither an image nor a video")
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(raw), recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"no such file, folder or matching files: {raw}")
        found += files
    return list(dict.fromkeys(found))


def count_items(files: Sequence[Path], every: int = 1) -> int:
    """How many items `iter_items` will yield (for a progress bar; videos as declared)."""
    return sum(-(-frame_count(f) // every) if is_video(f) else 1 for f in files)


def iter_items(files: Sequence[Path], every: int = 1) -> Iterator[Item]:
    """Each image as one item, each video as every `every`-th frame."""
    for f in files:
        if is_video(f):
            for frame in read_frames(f, every):
                yield Item(f, frame.image, frame.index, frame.timestamp)
        else:
            with Image.open(f) as im:
                yield Item(f, im.convert("RGB"))
