"""Tiled detection for frames much larger than the model's input.

In: a detect function (crops -> boxes), a frame, a tile size. Out: the frame's boxes, merged.

Florence-2 squeezes any frame to its input size (768 px; 256 for the tiny model): a 40 px
defect in a 2560x1440 frame becomes ~12 px (4 px for tiny) and is lost. Tiling cuts the frame
into overlapping windows of `tile` px, detects in all of them (and the whole frame, for
defects larger than a tile) in one batched call, maps boxes back to frame pixels and merges
duplicates class-wise. Overlap > defect size means every defect lies whole in at least one
tile; its clipped copies in the neighbours are found by measuring overlap as intersection over
the *smaller* box (a clipped copy lies inside the whole one) and merged into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from loomlens.data.records import Box
# The same windows `convert --tile` trains on, and the rule of a large frame training's crop uses.
from loomlens.data.tiles import is_large, tile_windows


def should_tile(width: int, height: int, mode: str, tile: int) -> bool:
    """Whether `mode` ("on" | "off" | "auto") tiles a `width` x `height` frame: "auto" tiles a
    frame large for `tile` (`loomlens.data.tiles.is_large`)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"tile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and is_large(width, height, tile))


def _overlap(box: Box, others: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of `box` with each row (x1, y1, x2, y2) of `others`."""
    w = np.clip(np.minimum(box.x2, others[:, 2]) - np.maximum(box.x1, others[:, 0]), 0, None)
    h = np.clip(np.minimum(box.y2, others[:, 3]) - np.maximum(box.y1, others[:, 1]), 0, None)
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return w * h / np.minimum(box.width * box.height, areas)


def merge_boxes(boxes: Sequence[Box], threshold: float = 0.6) -> list[Box]:
    """Class-wise non-maximum *merging*: by descending score, a box whose intersection over
    the smaller area with a kept box of its label reaches `threshold` is merged into it (the
    kept box grows to enclose both and keeps its higher score); otherwise it is kept. Merging
    rather than dropping matters when a clipped copy outscores the whole box, or when no tile
    holds the defect whole: the union is still the whole defect."""
    kept: dict[str, list[Box]] = {}
    for box in sorted(boxes, key=lambda b: -(b.score if b.score is not None else 1.0)):
        same = kept.setdefault(box.label, [])
        if same:
            overlaps = _overlap(box, np.array([[k.x1, k.y1, k.x2, k.y2] for k in same]))
            best = int(overlaps.argmax())
            if overlaps[best] >= threshold:
                k = same[best]
                same[best] = replace(k, x1=min(k.x1, box.x1), y1=min(k.y1, box.y1),
                                     x2=max(k.x2, box.x2), y2=max(k.y2, box.y2))
                continue
        same.append(box)
    return [b for group in kept.values() for b in group]


def tiled_detect(
    detect: Callable[[list[Image.Image]], list[list[Box]]],
    image: Image.Image,
    tile: int,
    overlap: float = 0.25,
    whole_frame: bool = True,
    merge_threshold: float = 0.6,
) -> list[Box]:
    """Boxes in `image`'s pixels from `detect` (images -> boxes in each image's pixels) run
    once on every tile, and on the whole frame when `whole_frame`, merged."""
    windows = tile_windows(image.width, image.height, tile, overlap)
    if whole_frame and len(windows) > 1:
        windows.append((0, 0, image.width, image.height))
    found = detect([image.crop(w) for w in windows])
    frame_boxes = [
        replace(b, x1=b.x1 + x0, y1=b.y1 + y0, x2=b.x2 + x0, y2=b.y2 + y0)
        for (x0, y0, _, _), boxes in zip(windows, found) for b in boxes
    ]
    return merge_boxes(frame_boxes, merge_threshold)
