"""Fabric-like synthetic scenes for pretraining: woven and knitted textures with small defects.

The generic scenes (`data/shapes.py`) teach the tiny model to see; these bring pretraining
closer to the line: plain and twill weaves and knit loops (grey or colour, varied thread pitch,
lighting gradients, sensor noise), some drawn as line-scan strips (a frame 2-4x wider than tall,
squashed into the square input), with defects as labelled boxes. Scenes are drawn fresh from a
seed, like the generic ones, and come back as the same `Scene` (image, boxes, colour words), so
every pretraining task works on them unchanged.

Class words are single tokens of the tiny tokenizer after a `<loc_N>` (`tests/model/
test_tokenizer.py`): the tokenizer is retrained from its corpus on every build, and a new word
in the corpus would move the ids of the shipped model's tokens, so only words already in it
are used. They are deliberately not the demo's or AITEX's class names, so that fine-tuning on
either stays a transfer:
- `hole`: an opening with a frayed edge, the backing seen through it;
- `knot`: a small lump of yarn with a highlight;
- `stain`: a soft, irregular tint (oil, dirt, dye);
- `thread` (broken yarn): one warp or weft thread missing, or loose and lying wavy on top,
  along the whole or part of the frame;
- `gap` (broken pick): two to five neighbouring picks (weft threads) missing along part of the
  width, the warp alone showing;
- `crease`: a fold or crease, a long ridge lit on one side and shaded on the other.
A third of the defects are faint (blended towards the cloth), and thin ones go down to 3 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from loomlens.data.records import Box
from loomlens.data.shapes import COLOURS, Scene

FABRIC_CLASSES = ("hole", "knot", "stain", "thread", "gap", "crease")
#: Defects cut into the weave before a strip is squashed (they follow its threads).
WOVEN_IN = ("thread", "gap")
MIN_SIDE = 3.0  # px: the thinnest defect a box may describe
CHROMATIC = ("red", "green", "blue", "yellow", "orange", "purple")


@dataclass
class Cloth:
    """A rendered texture and what it is made of, to cut threads out of it later.

    `image` (H, W, 3) is the lit cloth; `warp` and `weft` (H, W) are the lit profiles of the
    vertical and horizontal threads (knit: the loops, and the bars a run leaves), `colours`
    their yarn colours, `light` the lighting gain (H, W)."""

    image: np.ndarray
    warp: np.ndarray
    weft: np.ndarray
    colours: tuple[np.ndarray, np.ndarray]
    pitch_x: float  # px between neighbouring warp threads (knit: wales)
    pitch_y: float  # px between neighbouring weft threads (knit: courses)
    light: np.ndarray

    def under(self, vertical: bool, rows: slice, cols: slice) -> np.ndarray:
        """What shows in the window where horizontal (or, `vertical`, vertical) threads are
        missing: the crossing threads alone over a dark backing, as lit as the cloth."""
        threads, colour = (self.weft, self.colours[1]) if vertical else (self.warp, self.colours[0])
        return ((0.15 + 0.5 * threads[rows, cols] ** 2) * self.light[rows, cols])[..., None] * colour


@dataclass
class Defect:
    """One defect's label, variant and box (x, y, w, h) in output pixels."""

    kind: str
    x: float
    y: float
    w: float
    h: float
    vertical: bool = False  # threads and creases: along the warp (down the frame)
    loose: bool = False  # threads: lying on top rather than missing
    diagonal: bool = False  # creases: from corner to corner of the box


def _yarn_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Warp and weft colours: grey (half the cloths, as under most line cameras) or colour,
    the two the same or (a quarter of the time) different."""
    if rng.random() < 0.5:
        warp = np.full(3, rng.uniform(70, 215))
    else:
        warp = rng.uniform(40, 220, size=3)
    weft = warp * rng.uniform(0.85, 1.15) if rng.random() < 0.75 else rng.uniform(40, 220, size=3)
    return warp.astype(np.float32), weft.astype(np.float32)


def _lighting(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A lighting gain (H, W): a gradient both ways and a line light's falloff across the width."""
    x = np.arange(w, dtype=np.float32)[None, :] / w
    y = np.arange(h, dtype=np.float32)[:, None] / h
    across = (1 + rng.uniform(-0.25, 0.25) * (x - 0.5)) * (1 - rng.uniform(0, 0.25) * ((x - rng.uniform(0.3, 0.7)) * 2) ** 2)
    return (across + rng.uniform(-0.25, 0.25) * (y - 0.5)).astype(np.float32)


def _woven(rng: np.random.Generator, h: int, w: int) -> Cloth:
    """A plain or twill weave: vertical warp and horizontal weft threads, each rounded across
    its width, with slightly uneven yarns and a gentle waviness."""
    pitch_x = rng.uniform(2.5, 8.0)
    pitch_y = pitch_x * rng.uniform(0.7, 1.4)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    u = x / pitch_x + np.float32(rng.uniform(0, 0.4)) * np.sin(y / np.float32(rng.uniform(20, 80)))
    v = y / pitch_y + np.float32(rng.uniform(0, 0.4)) * np.sin(x / np.float32(rng.uniform(20, 80)))
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    if rng.random() < 0.5:
        warp_on_top = (i + j) % 2 == 0
    else:  # twill: warp over `over` of every `repeat` picks, the float shifting one per pick
        repeat = int(rng.integers(3, 5))
        over = int(rng.integers(1, repeat))
        warp_on_top = (i + int(rng.choice([-1, 1])) * j) % repeat < over
    unevenness = rng.uniform(0.02, 0.08)
    warp = (1 - 0.6 * (2 * (u - i) - 1) ** 2) * (1 + rng.normal(0, unevenness, 4096).astype(np.float32))[i % 4096]
    weft = (1 - 0.6 * (2 * (v - j) - 1) ** 2) * (1 + rng.normal(0, unevenness, 4096).astype(np.float32))[j % 4096]
    warp, weft = np.broadcast_to(warp, (h, w)), np.broadcast_to(weft, (h, w))
    colours = _yarn_colours(rng)
    light = _lighting(rng, h, w)
    image = np.where(warp_on_top[..., None], warp[..., None] * colours[0], weft[..., None] * colours[1])
    return Cloth(image * light[..., None], warp, weft, colours, float(pitch_x), float(pitch_y), light)


def _knitted(rng: np.random.Generator, h: int, w: int) -> Cloth:
    """A jersey knit: columns (wales) of V-shaped loops, row after row (courses)."""
    wale = rng.uniform(3.0, 9.0)
    course = wale * rng.uniform(0.6, 1.0)
    x = np.arange(w, dtype=np.float32)[None, :]
    t = (np.arange(h, dtype=np.float32)[:, None] / np.float32(course)) % 1.0
    s = (x / np.float32(wale)) % 1.0
    width = np.float32(rng.uniform(0.12, 0.2))
    loops = np.maximum(np.exp(-(((s - (0.08 + 0.42 * t)) / width) ** 2)),
                       np.exp(-(((s - (0.92 - 0.42 * t)) / width) ** 2)))
    shade = (1 + rng.normal(0, rng.uniform(0.02, 0.06), 4096).astype(np.float32))[np.floor(x / wale).astype(np.int64) % 4096]
    colour, _ = _yarn_colours(rng)
    light = _lighting(rng, h, w)
    bars = np.broadcast_to(np.exp(-(((t - 0.5) / 0.15) ** 2)), (h, w))  # the ladder a run down a wale leaves
    image = ((0.45 + 0.55 * loops) * shade * light)[..., None] * colour
    return Cloth(image, loops, bars, (colour, colour), float(wale), float(course), light)


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A size between `low` and `high` drawn evenly on a log scale (small defects as often as large)."""
    return float(np.exp(rng.uniform(np.log(low), np.log(max(high, low * 1.01)))))


def _defect(rng: np.random.Generator, kind: str, size: int, squash: float, cloth: Cloth) -> Defect:
    """A `kind` defect of random size and placement on a `size` frame whose width is squashed
    `squash` times (round things get narrower; threads and gaps keep the weave's pitch)."""
    vertical = loose = diagonal = False
    if kind in ("hole", "knot", "stain"):
        top = {"hole": 0.15, "knot": 0.06, "stain": 0.3}[kind] * size
        h = _loguniform(rng, MIN_SIDE if kind != "stain" else 8.0, top)
        w = h * rng.uniform(0.7, 1.4) if kind != "stain" else _loguniform(rng, 8.0, top)
        w = w / squash
    elif kind == "crease":
        long, w = size * rng.uniform(0.3, 0.95), _loguniform(rng, MIN_SIDE, 0.05 * size)
        h, vertical = long, rng.random() < 0.5
        diagonal = rng.random() < 0.3
        if diagonal:  # the box spans both ways
            w = h = long * 0.7
        elif not vertical:
            w, h = h, w
    else:
        loose = kind == "thread" and rng.random() < 0.5
        vertical = kind == "thread" and squash == 1.0 and rng.random() < 0.4  # a warp thread vanishes in a squash
        picks = 1 if kind == "thread" else int(rng.integers(2, 6))
        long = size if rng.random() < 0.3 else size * rng.uniform(0.2, 0.9)  # the whole width or a part
        thick = (cloth.pitch_x if vertical else cloth.pitch_y) * picks
        w, h = (thick, long) if vertical else (long, thick)
    w, h = min(max(MIN_SIDE, w), size), min(max(MIN_SIDE, h), size)
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return Defect(kind, x, y, w, h, vertical, loose, diagonal)


def _layout(rng: np.random.Generator, count: int, size: int, squash: float, cloth: Cloth) -> list[Defect]:
    """Up to `count` defects whose boxes keep 3 px apart (a few tries each)."""
    placed: list[Defect] = []
    for _ in range(count * 6):
        if len(placed) == count:
            break
        kind = FABRIC_CLASSES[rng.integers(len(FABRIC_CLASSES))]
        d = _defect(rng, kind, size, squash, cloth)
        if not any(d.x < o.x + o.w + 3 and o.x < d.x + d.w + 3 and d.y < o.y + o.h + 3 and o.y < d.y + d.h + 3
                   for o in placed):
            placed.append(d)
    return placed


def _weave_in(cloth: Cloth, d: Defect, squash: float, alpha: float) -> np.ndarray:
    """Cut a missing thread or gap into the cloth (canvas pixels: x times `squash`);
    returns the colour that now shows there."""
    x0, x1 = int(d.x * squash), max(int(d.x * squash) + 1, int(np.ceil((d.x + d.w) * squash)))
    y0, y1 = int(d.y), max(int(d.y) + 1, int(np.ceil(d.y + d.h)))
    under = cloth.under(d.vertical, slice(y0, y1), slice(x0, x1))
    patch = cloth.image[y0:y1, x0:x1]
    patch *= 1 - alpha
    patch += alpha * under
    return under.reshape(-1, 3).mean(0)


def _window(d: Defect, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The pixels of a defect's box and their centres in pixels relative to the box centre."""
    y0, y1 = int(d.y), min(size, max(int(d.y) + 1, int(np.ceil(d.y + d.h))))
    x0, x1 = int(d.x), min(size, max(int(d.x) + 1, int(np.ceil(d.x + d.w))))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return (slice(y0, y1), slice(x0, x1)), xx - (d.x + d.w / 2), yy - (d.y + d.h / 2)


def _hole(rng: np.random.Generator, image: np.ndarray, d: Defect, alpha: float) -> np.ndarray:
    """An opening with a ragged, frayed edge, the (dark or light) backing seen through it."""
    window, dx, dy = _window(d, image.shape[0])
    r = np.hypot(dx / (d.w / 2), dy / (d.h / 2))
    theta = np.arctan2(dy, dx)
    ragged = 0.85 + 0.1 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.05 * np.sin(7 * theta + rng.uniform(0, 6.3))
    inside = np.clip((ragged - r) * 6, 0, 1)[..., None]
    frayed = 1 + 0.35 * np.exp(-(((r - ragged) / 0.12) ** 2))[..., None]
    backing = np.full(3, rng.uniform(10, 50) if rng.random() < 0.7 else rng.uniform(200, 245), np.float32)
    patch = image[window]
    target = patch * (1 - inside) * frayed + backing * inside
    image[window] = patch * (1 - alpha) + alpha * target
    return backing


def _knot(rng: np.random.Generator, image: np.ndarray, d: Defect, alpha: float) -> np.ndarray:
    """A lump of yarn: a round blob lighter or darker than the cloth, lit from the top left."""
    window, dx, dy = _window(d, image.shape[0])
    u, v = dx / (d.w / 2), dy / (d.h / 2)
    lump = (np.clip(1 - u**2 - v**2, 0, 1) ** 0.4)[..., None]
    shine = 1 + 0.25 * np.exp(-((u + 0.3) ** 2 + (v + 0.3) ** 2) / 0.15)[..., None]
    patch = image[window]
    colour = np.clip(patch.reshape(-1, 3).mean(0) * (rng.uniform(1.35, 1.7) if rng.random() < 0.5 else rng.uniform(0.35, 0.65)), 0, 255)
    target = patch * (1 - lump) + lump * colour * shine
    image[window] = patch * (1 - alpha) + alpha * target
    return colour


def _stain(rng: np.random.Generator, image: np.ndarray, d: Defect, alpha: float) -> np.ndarray:
    """A soft, irregular tint: a few overlapping Gaussian blobs, darkening or coloured."""
    window, dx, dy = _window(d, image.shape[0])
    u, v = dx / (d.w / 2), dy / (d.h / 2)
    blobs = np.zeros_like(u)
    for _ in range(3):
        cu, cv, s = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.25, 0.45)
        blobs = np.maximum(blobs, np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * s * s)))
    blobs *= np.clip((1 - np.maximum(abs(u), abs(v))) * 4, 0, 1)
    if rng.random() < 0.5:
        tint = np.array(COLOURS[CHROMATIC[rng.integers(len(CHROMATIC))]], np.float32) / 255 * 0.8 + 0.2
    else:
        tint = np.full(3, rng.uniform(0.3, 0.7), np.float32)
    m = (alpha * blobs / max(float(blobs.max()), 1e-6))[..., None]
    patch = image[window]
    image[window] = patch * (1 - m) + m * patch * tint
    return patch.reshape(-1, 3).mean(0) * tint


def _crease(rng: np.random.Generator, image: np.ndarray, d: Defect, alpha: float) -> np.ndarray:
    """A fold: a ridge along the box's long axis (or its diagonal), lit on one side, shaded on
    the other, lighter or darker on its crest, fading at the ends."""
    window, dx, dy = _window(d, image.shape[0])
    if d.diagonal:
        ux, uy = d.w, d.h * rng.choice([-1.0, 1.0])
        half = _loguniform(rng, MIN_SIDE, 0.05 * image.shape[0]) / 2
    else:
        ux, uy = (0.0, 1.0) if d.vertical else (1.0, 0.0)
        half = min(d.w, d.h) / 2
    norm = np.hypot(ux, uy)
    across = (dx * uy - dy * ux) / norm / half * 1.2
    along = (dx * ux + dy * uy) / norm / (np.hypot(d.w, d.h) / 2 if d.diagonal else max(d.w, d.h) / 2)
    crest = rng.uniform(0.3, 1.0) * rng.choice([-1.0, 1.0])
    shading = 2.33 * rng.choice([-1.0, 1.0]) * across * np.exp(-across**2) + crest * np.exp(-across**2)
    strength = alpha * rng.uniform(0.25, 0.5)
    fade = np.clip((1 - abs(along)) * 5, 0, 1)
    patch = image[window]
    image[window] = patch * (1 + strength * shading * fade)[..., None]
    return patch.reshape(-1, 3).mean(0) * (1 + strength * crest)


def _loose_thread(rng: np.random.Generator, image: np.ndarray, d: Defect, alpha: float) -> np.ndarray:
    """A broken thread lying wavy on top of the cloth along the box, lighter or darker."""
    window, dx, dy = _window(d, image.shape[0])
    along, across = (dy, dx) if d.vertical else (dx, dy)
    thick = rng.uniform(1.5, 3.0)
    room = max(0.0, (min(d.w, d.h) - thick) / 2)
    centre = room * rng.uniform(0.3, 1.0) * np.sin(along * 2 * np.pi / rng.uniform(15, 60) + rng.uniform(0, 6.3))
    line = (alpha * np.exp(-(((across - centre) / (thick / 2)) ** 2)))[..., None]
    patch = image[window]
    colour = np.clip(patch.reshape(-1, 3).mean(0) * (rng.uniform(1.3, 1.7) if rng.random() < 0.6 else rng.uniform(0.4, 0.65)), 0, 255)
    image[window] = patch * (1 - line) + line * colour
    return colour


SURFACE = {"hole": _hole, "knot": _knot, "stain": _stain, "crease": _crease, "thread": _loose_thread}


def _word(fill: np.ndarray, cloth: np.ndarray) -> str:
    """The colour word of a defect of colour `fill` on cloth of mean colour `cloth`: a named
    colour when it is clearly coloured, else `dark` or `light`."""
    if np.ptp(fill) > 60 and np.ptp(fill) > np.ptp(cloth) + 30:
        unit = fill / max(float(fill.max()), 1.0)
        return min(CHROMATIC, key=lambda n: float(np.abs(np.array(COLOURS[n]) / max(COLOURS[n]) - unit).sum()))
    return "dark" if fill.mean() < cloth.mean() else "light"


def _finish(rng: np.random.Generator, image: np.ndarray) -> Image.Image:
    """Sensor noise (per pixel, and per column as a line camera's fixed pattern), maybe a
    little defocus, then 8-bit."""
    h, w, _ = image.shape
    image = image + rng.normal(0, rng.uniform(2, 8), (h, w, 1)) + rng.normal(0, rng.uniform(0, 3), (1, w, 1))
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8))) if rng.random() < 0.25 else out


def make_fabric_scene(rng: np.random.Generator, size: int = 256, max_objects: int = 4,
                      empty_fraction: float = 0.1, strip_share: float = 0.3) -> Scene:
    """Draw one `size` x `size` fabric scene with 0..`max_objects` defects that keep apart.

    A quarter are knits, the rest weaves; `strip_share` of them are line-scan strips, a frame
    2-4x wider than tall squashed into the square (the weave is drawn at full width, then
    averaged down, as a squeezed line-scan frame is)."""
    squash = float(rng.uniform(2.0, 4.0)) if rng.random() < strip_share else 1.0
    cloth = (_knitted if rng.random() < 0.25 else _woven)(rng, size, round(size * squash))
    mean = cloth.image.reshape(-1, 3).mean(0)
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    defects = _layout(rng, n, size, squash, cloth)
    alphas = [float(rng.uniform(0.3, 0.7)) if rng.random() < 1 / 3 else 1.0 for _ in defects]
    fills: dict[int, np.ndarray] = {}
    for i, (d, alpha) in enumerate(zip(defects, alphas)):
        if d.kind in WOVEN_IN and not d.loose:
            fills[i] = _weave_in(cloth, d, squash, alpha)
    image = cloth.image
    if squash != 1.0:
        squeezed = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
        image = np.asarray(squeezed, np.float32).copy()
    for i, (d, alpha) in enumerate(zip(defects, alphas)):
        if i not in fills:
            fills[i] = SURFACE[d.kind](rng, image, d, alpha)
    boxes = [Box(d.kind, d.x, d.y, d.x + d.w, d.y + d.h) for d in defects]
    return Scene(_finish(rng, image), boxes, [_word(fills[i], mean) for i in range(len(defects))])
