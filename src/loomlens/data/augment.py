"""Online, box-correct augmentation for fabric: every sample a little different each epoch.

Geometry moves the boxes with the pixels (a defect crop of frames larger than the model's
input, flips, quarter turns, a crop-and-rescale jitter that never cuts a defect); photometry
(brightness, contrast, gamma, grey) leaves them alone. The defect crop shows such a frame as one
window of the input's size at full resolution, as tiled prediction sees it: squeezed whole to
the input, a defect a few pixels wide vanishes. The
draw for a sample is a pure function of `(seed, epoch, index)`, so a resumed run sees the same
pictures. Quarter turns are off by default: on a loom the direction of a defect is its class
(a broken end runs along the warp, a broken pick across it), so turning it would teach the
wrong name. Which transforms help, and by how much, is measured in docs/training.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageEnhance, ImageOps

from loomlens.data.records import Box
from loomlens.data.tiles import MIN_VISIBLE, Window, clip_box, exceeds

#: Placements the defect crop tries before it falls back to the whole frame.
CROP_TRIES = 4


@dataclass(frozen=True)
class Augment:
    """Probabilities and strengths of each transform; all zero = the picture as it is.

    `hflip`, `vflip`, `rot90`, `grey`: the chance of each. `brightness`, `contrast`: the largest
    relative change (0.2: factor in [0.8, 1.2]). `gamma`: the largest change of the exponent
    (0.2: gamma in [0.8, 1.2]). `scale`: the largest share of each side a crop may drop (the
    crop, rescaled to the output size, zooms in by up to 1 / (1 - scale)); its position is the
    shift jitter, and it always keeps every box whole. `crop`: the chance that a frame longer
    than the model's input (`loomlens.data.tiles.exceeds`) is shown as one window of the input's
    edge at full resolution, holding a defect when it has one (`_defect_crop`). `paste`: the
    chance that a frame showing defects gets one more from another frame (`loomlens.data.paste`,
    which the dataset applies first: it needs the other frames).
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: float = 0.2
    grey: float = 0.1
    scale: float = 0.1
    crop: float = 0.0
    paste: float = 0.5

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rot90", "grey", "crop", "paste"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment {name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "gamma", "scale"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment {name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)


#: No augmentation at all (the write-up's way, and validation).
NONE = Augment(hflip=0, vflip=0, rot90=0, brightness=0, contrast=0, gamma=0, grey=0, scale=0, crop=0, paste=0)


def sample_rng(seed: int, epoch: int, index: int, stream: str = "augment") -> random.Random:
    """The generator for one sample's draw: the same (seed, epoch, index) gives the same picture.
    Each `stream` (a kind of draw) is its own, so turning one transform on leaves the others'."""
    return random.Random(f"{stream}:{seed}:{epoch}:{index}")


def _flip(image: Image.Image, boxes: list[Box], horizontal: bool) -> tuple[Image.Image, list[Box]]:
    w, h = image.size
    if horizontal:
        return ImageOps.mirror(image), [b.hflip(w) for b in boxes]
    return ImageOps.flip(image), [b.vflip(h) for b in boxes]


def _quarter_turn(image: Image.Image, boxes: list[Box]) -> tuple[Image.Image, list[Box]]:
    """Turn a quarter counter-clockwise: the pixel (x, y) goes to (y, W - x)."""
    w, _ = image.size
    turned = image.transpose(Image.Transpose.ROTATE_90)
    return turned, [replace(b, x1=b.y1, y1=w - b.x2, x2=b.y2, y2=w - b.x1) for b in boxes]


def _span(lo: float, hi: float, size: int, keep: float, rng: random.Random) -> int:
    """A whole-pixel crop start along one axis for a window of `keep` pixels that holds [lo, hi)
    whole (fractional edges too), -1 when none does."""
    first, last = max(0, math.ceil(hi - keep)), min(size - keep, math.floor(lo))
    return rng.randint(first, last) if first <= last else -1


def _jitter_window(width: int, height: int, boxes: list[Box], scale: float, rng: random.Random) -> Window:
    """A window dropping up to `scale` of each side, at a random place that keeps every box
    whole (the scale and shift jitter); the whole picture when no such window exists."""
    factor = 1 - rng.uniform(0, scale)
    cw, ch = max(1, round(width * factor)), max(1, round(height * factor))
    lo_x = min((b.x1 for b in boxes), default=width)
    hi_x = max((b.x2 for b in boxes), default=0)
    lo_y = min((b.y1 for b in boxes), default=height)
    hi_y = max((b.y2 for b in boxes), default=0)
    x0 = _span(lo_x, hi_x, width, cw, rng) if boxes else rng.randint(0, width - cw)
    y0 = _span(lo_y, hi_y, height, ch, rng) if boxes else rng.randint(0, height - ch)
    if x0 < 0 or y0 < 0:
        return 0, 0, width, height
    return x0, y0, x0 + cw, y0 + ch


def _resampled(image: Image.Image, boxes: list[Box], window: Window, size: tuple[int, int],
               resample: Image.Resampling) -> tuple[Image.Image, list[Box]]:
    """`window` of `image` resampled once to `size` (W, H), the boxes moved with it; the
    picture as it is when that changes nothing."""
    x0, y0, x1, y1 = window
    if window == (0, 0, *image.size) and size == image.size:
        return image, boxes
    w, h = size
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    moved = [replace(b, x1=min(w, (b.x1 - x0) * sx), y1=min(h, (b.y1 - y0) * sy),
                     x2=min(w, (b.x2 - x0) * sx), y2=min(h, (b.y2 - y0) * sy)) for b in boxes]
    return image.resize(size, resample, box=window), moved


def _holding_start(lo: float, hi: float, size: int, keep: int, rng: random.Random) -> int:
    """A window start along one axis: a random one of `keep` pixels that holds [lo, hi) whole,
    else (the span is longer than the window) the one centred on it, inside [0, size - keep]."""
    start = _span(lo, hi, size, keep, rng)
    return start if start >= 0 else min(max(0, round((lo + hi - keep) / 2)), size - keep)


def _placement(boxes: list[Box], width: int, height: int, edge: int, rng: random.Random) -> Window:
    """A window of `edge` px (cut to the frame) around a box drawn from `boxes`, or anywhere
    when there is none."""
    cw, ch = min(edge, width), min(edge, height)
    if not boxes:
        x0, y0 = rng.randint(0, width - cw), rng.randint(0, height - ch)
    else:
        box = rng.choice(boxes)
        x0 = _holding_start(box.x1, box.x2, width, cw, rng)
        y0 = _holding_start(box.y1, box.y2, height, ch, rng)
    return x0, y0, x0 + cw, y0 + ch


def _defect_crop(image: Image.Image, boxes: list[Box], edge: int,
                 rng: random.Random) -> tuple[Image.Image, list[Box]]:
    """One window of `edge` px of `image` at full resolution and its boxes, clipped to it, in
    its pixels: a box drawn at random lies whole in it (centred when larger), and every box it
    cuts shows at least `MIN_VISIBLE` (as `tiles.clip_box` counts it, so a thread crossing the
    window counts as shown). After `CROP_TRIES` placements that cut a box with less showing,
    the whole frame as it is: a window that hides most of a defect would teach that the
    defect's visible part is background."""
    for _ in range(CROP_TRIES):
        window = _placement(boxes, image.width, image.height, edge, rng)
        clipped = [clip_box(box, window) for box in boxes]
        if not any(0 < visible < MIN_VISIBLE for _, visible in clipped):
            return image.crop(window), [box for box, _ in clipped if box is not None]
    return image, boxes


def _photometric(image: Image.Image, aug: Augment, rng: random.Random) -> Image.Image:
    if aug.brightness:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - aug.brightness, 1 + aug.brightness))
    if aug.contrast:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - aug.contrast, 1 + aug.contrast))
    if aug.gamma:
        g = rng.uniform(1 - aug.gamma, 1 + aug.gamma)
        lut = [min(255, round(255 * (v / 255) ** g)) for v in range(256)]
        image = image.point(lut * len(image.getbands()))
    if aug.grey and rng.random() < aug.grey:
        image = ImageOps.grayscale(image).convert(image.mode)
    return image


def augment(
    image: Image.Image, boxes: list[Box], *, aug: Augment, rng: random.Random, edge: int, geometric: bool = True,
    size: tuple[int, int] | None = None, resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[Image.Image, list[Box]]:
    """One random variant of an RGB `image` and its pixel `boxes`.

    Args:
        image: the picture, RGB, W x H.
        boxes: its boxes in pixels.
        aug: what to apply, and how strongly.
        rng: the sample's generator (`sample_rng`).
        edge: the model's input edge in pixels: a frame longer than it may be cropped (`aug.crop`).
        geometric: False for answers that are not boxes (captions): only photometry then.
        size: the (W, H) the picture goes out at, resampled with `resample`: the model's input,
            so that the jitter's crop and the squeeze to the input are one resampling and the
            photometry runs on the input's pixels, not on a frame's (a quarter as many for a
            frame twice the input). None: the picture's own size.

    Returns:
        The new picture (`size`; else W x H, a window of at most `edge` x `edge` after a defect
        crop, or turned a quarter) and the boxes moved with it.
    """
    if geometric:
        # Drawn only for a frame prediction tiles, so a small one sees the same variants as before the crop.
        if aug.crop and exceeds(*image.size, edge) and rng.random() < aug.crop:
            image, boxes = _defect_crop(image, boxes, edge, rng)
        if aug.hflip and rng.random() < aug.hflip:
            image, boxes = _flip(image, boxes, horizontal=True)
        if aug.vflip and rng.random() < aug.vflip:
            image, boxes = _flip(image, boxes, horizontal=False)
        if aug.rot90 and rng.random() < aug.rot90:
            image, boxes = _quarter_turn(image, boxes)
    window = (0, 0, *image.size)
    if geometric and aug.scale:
        window = _jitter_window(*image.size, boxes, aug.scale, rng)
    image, boxes = _resampled(image, boxes, window, size or image.size, resample)
    return _photometric(image, aug, rng), boxes
