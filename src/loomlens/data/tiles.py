"""Cutting annotated frames into overlapping tiles, for training at tile scale (as SAHI does).

A small defect in a 2560x1440 frame all but vanishes when the frame is squeezed to the model's
input; inference tiles such frames (`loomlens.infer.tiling`), so training must show the model
defects at tile scale too. The windows here are the ones inference uses. A box cut by a window
edge is clipped and kept when at least `min_visible` of it lies inside; a window that cuts a box
with less than that showing is skipped: labelling a half-visible defect as background would
teach the model to ignore it.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loomlens.data.atomic import atomic_save_image
from loomlens.data.records import Box, ImageRecord

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels

#: A frame is large for a model input (or tile) of `edge` px when its longer side exceeds this
#: many edges: prediction's `tile="auto"` tiles it, training's defect crop shows it a window at a time.
AUTO_FACTOR = 2.0
#: The least share of a box a window must show for the box to be kept, clipped (less: the
#: window is ambiguous, as labelling a half-visible defect as background would be wrong).
MIN_VISIBLE = 0.5


def is_large(width: int, height: int, edge: int) -> bool:
    """Whether a `width` x `height` frame is large for an input of `edge` px (`AUTO_FACTOR`)."""
    return max(width, height) > AUTO_FACTOR * edge


def _starts(size: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one axis: evenly spread, at least `overlap` of a tile shared, the
    last window flush with the far edge."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile * (1 - overlap))) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_windows(width: int, height: int, tile: int, overlap: float = 0.25) -> list[Window]:
    """Overlapping `tile` x `tile` windows covering a `width` x `height` frame (a window is
    cut to the frame when the frame is smaller than a tile)."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)
    ]


@dataclass(frozen=True)
class Tile:
    """One window of a frame and the boxes it keeps, in the tile's own pixels."""

    window: Window
    boxes: tuple[Box, ...]

    @property
    def width(self) -> int:
        return self.window[2] - self.window[0]

    @property
    def height(self) -> int:
        return self.window[3] - self.window[1]


def clip_box(box: Box, window: Window) -> tuple[Box | None, float]:
    """`box` clipped to `window`, in window pixels (None when they do not meet), and the share
    of the box's area inside the window."""
    x0, y0, x1, y1 = window
    cx1, cy1, cx2, cy2 = max(box.x1, x0), max(box.y1, y0), min(box.x2, x1), min(box.y2, y1)
    if not (cx1 < cx2 and cy1 < cy2):
        return None, 0.0
    visible = (cx2 - cx1) * (cy2 - cy1) / (box.width * box.height)
    return Box(box.label, cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0, box.score), visible


def tile_record(
    record: ImageRecord,
    tile: int,
    overlap: float = 0.25,
    *,
    min_visible: float = MIN_VISIBLE,
    negatives: float = 1.0,
    seed: int = 0,
) -> list[Tile]:
    """The training tiles of one annotated frame, in window order (rows, then columns).

    In: `record` (pixel boxes), the `tile` edge in pixels and the `overlap` share between
    neighbours (the windows of `tile_windows`). Out: every positive window (some box at least
    `min_visible` inside, boxes clipped to the window, in its pixels) and some negative ones
    (no box at all). A window that cuts a box with less than `min_visible` of it inside is
    ambiguous and left out, so a box larger than a tile may give no tile: the whole frame
    still teaches it. Negatives: at most `floor(negatives * max(positives, 1))`, drawn
    without replacement from a generator seeded by `seed` and the record's image, so one
    defect-free frame gives `floor(negatives)` tiles (one at the default) rather than none or
    all of them, and a re-run picks the same ones. A frame no larger than a tile gives none.
    Raises ValueError for a `min_visible` outside (0, 1], a negative `negatives`, or a bad
    tile or overlap.
    """
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    windows = tile_windows(record.width, record.height, tile, overlap)  # checks tile and overlap
    if record.width <= tile and record.height <= tile:
        return []
    positives, empty = [], []
    for window in windows:
        clipped = [clip_box(box, window) for box in record.boxes]
        if any(0 < visible < min_visible for _, visible in clipped):
            continue
        kept = tuple(box for box, visible in clipped if box is not None)
        (positives if kept else empty).append(Tile(window, kept))
    budget = min(len(empty), math.floor(negatives * max(len(positives), 1) + 1e-9))  # 1e-9: 0.29 * 100 is 29
    chosen = random.Random(f"{seed}:{record.image}").sample(range(len(empty)), budget)
    tiles = positives + [empty[i] for i in chosen]
    return sorted(tiles, key=lambda t: (t.window[1], t.window[0]))


def save_tiles(frame: Path, tiles: dict[Path, Window], image: Image.Image | None = None) -> None:
    """Crop each window of the image file `frame` and save it at its path (`tiles`: path ->
    window), in the frame's own format, atomically. `image`: the frame already decoded, to crop
    from instead of reading the file again. A tile already newer than the frame and of its
    window's size is kept (a re-run). Raises OSError when the frame cannot be read or a tile
    cannot be written."""
    def fresh(path: Path, window: Window) -> bool:
        if not path.exists() or path.stat().st_mtime < frame.stat().st_mtime:
            return False
        try:
            with Image.open(path) as im:  # a name survives a change of --tile: check the size too
                return im.size == (window[2] - window[0], window[3] - window[1])
        except OSError:
            return False  # a damaged old tile is simply rewritten

    todo = {path: window for path, window in tiles.items() if not fresh(path, window)}
    if not todo:
        return
    with nullcontext(image) if image is not None else Image.open(frame) as im:
        # A frame mirrored in memory has no format of its own: its file's suffix tells.
        fmt = im.format or Image.registered_extensions().get(frame.suffix.lower(), "PNG")
        im.load()
        for path, window in todo.items():
            atomic_save_image(im.crop(window), path, fmt)
