"""Cutting annotated frames into overlapping tiles, for training at tile scale (as SAHI does).

A small defect in a 2560x1440 frame all but vanishes when the frame is squeezed to the model's
input; inference tiles such frames (`loomlens.infer.tiling`), so training must show the model
defects at tile scale too. The windows here are the ones inference uses. A box cut by a window
edge is clipped and kept when the window shows at least `min_visible` of it (of its area, or,
for a thread crossing the window, of what a window can show of it: `clip_box`); a window that
cuts a box with less than that showing is skipped: labelling a half-visible defect as
background would teach the model to ignore it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loomlens.data.atomic import atomic_save_image, same_stamp, stamp
from loomlens.data.records import Box, ImageRecord

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels

#: A frame is large for a model input of `edge` px when its longer side exceeds this many
#: edges: `loomlens train` warns when such frames hide boxes from the model (`hidden_by_squeeze`).
LARGE_FACTOR = 2.0
#: The least share of a box a window must show for the box to be kept, clipped (less: the
#: window is ambiguous, as labelling a half-visible defect as background would be wrong). A
#: thread longer than the window counts against the window's side (`clip_box`).
MIN_VISIBLE = 0.5
#: A box whose shorter side is under this many pixels at the model's input is barely visible to
#: it (DaViT's first stage already pools 4x4 pixels into one cell).
VANISHING_PX = 4.0
#: Under twice `VANISHING_PX` at the input the model finds a defect but seldom places its edges
#: to IoU 0.5 (docs/training.md, "Tiles on mid-size frames"): `convert --tile auto` tiles for it.
PLACED_PX = 2 * VANISHING_PX
#: The share of boxes hidden by the squeeze to the input at which `loomlens train` warns and
#: `convert --tile auto` cuts tiles.
VANISHING_SHARE = 0.25
#: Where `convert` writes tiles, relative to its output folder (and so how a split's samples
#: tell a tile from a whole frame).
TILES_DIR = "images/tiles"
#: The input edge `convert --tile auto` plans for: the embedded default model's. A run on
#: Florence-2-base (768 px) converts with `--tile 768`, or `--tile off`.
AUTO_TILE_INPUT = 256


def exceeds(width: int, height: int, tile: int) -> bool:
    """Whether a `width` x `height` frame is longer than a `tile` px window on some side: the
    frames `convert --tile` cuts, training's defect crop shows a window at a time and
    prediction's `tile="auto"` tiles, so that a run predicts in tiles every frame it learnt in
    tiles."""
    return max(width, height) > tile


def is_large(width: int, height: int, edge: int) -> bool:
    """Whether a `width` x `height` frame is large for an input of `edge` px (`LARGE_FACTOR`)."""
    return max(width, height) > LARGE_FACTOR * edge


def hidden_by_squeeze(box: Box, width: int, height: int, edge: int, px: float = VANISHING_PX) -> bool:
    """Whether `box`, at least `VANISHING_PX` on its shorter side in its `width` x `height`
    frame (or window), falls under `px` (or under its own size, when that is smaller) once the
    frame is resized to the model's `edge` x `edge` input: a box smaller tiles would keep."""
    side = min(box.width, box.height)
    return side >= VANISHING_PX and min(box.width * edge / width, box.height * edge / height) < min(px, side)


def hidden_when_tiled(
    records: Sequence[ImageRecord], tile: int | None = None, edge: int = AUTO_TILE_INPUT, px: float = PLACED_PX,
) -> int:
    """How many boxes of `records` fall under `px` at an `edge` px input (`hidden_by_squeeze`)
    when the frames longer than `tile` are seen in `tile` px windows (as prediction's auto mode
    sees them; None: no tiles) and every other frame whole."""
    hidden = 0
    for r in records:
        tiled = tile is not None and exceeds(r.width, r.height, tile)
        width, height = (min(tile, r.width), min(tile, r.height)) if tiled else (r.width, r.height)
        hidden += sum(hidden_by_squeeze(b, width, height, edge, px) for b in r.boxes)
    return hidden


def auto_tile(records: Sequence[ImageRecord], edge: int = AUTO_TILE_INPUT) -> int | None:
    """The tile edge `convert --tile auto` cuts `records` into, None for no tiles.

    None unless at least `VANISHING_SHARE` of all boxes fall under `PLACED_PX` (or under their
    own size) when their frames are squeezed whole to the `edge` px input. Then the largest of
    `edge`, 2 `edge`, 4 `edge`, ... at which fewer than that share of the boxes do: larger
    tiles cost fewer passes a frame. `edge` itself when no larger tile does, since a window no
    larger than the input hides nothing."""
    boxes = sum(len(r.boxes) for r in records)
    if not boxes or hidden_when_tiled(records, None, edge) < VANISHING_SHARE * boxes:
        return None
    chosen, tile = edge, 2 * edge
    while any(exceeds(r.width, r.height, tile) for r in records):
        if hidden_when_tiled(records, tile, edge) >= VANISHING_SHARE * boxes:
            break
        chosen, tile = tile, 2 * tile
    return chosen


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
    """`box` clipped to `window`, in window pixels (None when they do not meet), and how much
    of the box the window shows: the share of its area, or, for a box longer than the window
    on one side only (a thread or crease crossing it), the product per axis of the share of
    what the window could show, `min(box side, window side)`. A broken end crossing a tile
    end to end then shows all a tile can of it rather than a fifth, so the tile teaches it;
    a stain larger than the window both ways keeps the area count (docs/training.md, "Tiles on
    mid-size frames")."""
    x0, y0, x1, y1 = window
    cx1, cy1, cx2, cy2 = max(box.x1, x0), max(box.y1, y0), min(box.x2, x1), min(box.y2, y1)
    if not (cx1 < cx2 and cy1 < cy2):
        return None, 0.0
    ww, wh = x1 - x0, y1 - y0
    if (box.width > ww) != (box.height > wh):
        visible = (cx2 - cx1) / min(box.width, ww) * (cy2 - cy1) / min(box.height, wh)
    else:
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
    (no box at all). A window that cuts a box with less than `min_visible` of it inside (as
    `clip_box` counts it) is ambiguous and left out, so a box larger than a tile both ways may
    give no tile: the whole frame still teaches it. Negatives: at most
    `floor(negatives * max(positives, 1))`, drawn without replacement from a generator seeded
    by `seed` and the record's image, so one defect-free frame gives `floor(negatives)` tiles
    (one at the default) rather than none or all of them, and a re-run picks the same ones. A frame no larger than a tile gives none.
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
    from instead of reading the file again. A tile that carries the frame's modification time
    (`atomic.stamp`) and is of its window's size is kept (a re-run). Raises OSError when the
    frame cannot be read or a tile cannot be written."""
    def fresh(path: Path, window: Window) -> bool:
        if not same_stamp(path, frame):
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
            stamp(path, frame)
