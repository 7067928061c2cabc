"""A synthetic loom dataset: camera frames like the seed's (a fixed camera above a loom) with
`broken-weft`, `drop` and `wrinkle` defects, written in LabelImg's Pascal VOC layout.

The camera is fixed, so everything but the fabric is drawn once per (seed, size) as a
`_Scene`: machine parts, the roller bar, lighting, and the perspective map from frame pixels
to fabric coordinates `(u, v)` (u across the warp threads, v along them, about one unit per
pixel mid-frame). A frame then only gathers a scrolled window of a precomputed woven tile
through that map, shades its defects, adds noise, blur and the timestamp. Defects are drawn
as gain fields on the fabric and a box is the bounding box of the pixels each visibly
changes (occlusion by the roller included), so boxes are tight by construction.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from loomlens.data.atomic import atomic_write
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc

CLASSES = ("broken-weft", "drop", "wrinkle")
# Relative frequencies, roughly the seed's test set (drop most common, broken-weft least).
CLASS_WEIGHTS = (0.25, 0.45, 0.30)
MAX_SIZE = (2560, 1440)
MIN_SIZE = (128, 72)
_MACHINE_WIDTH = 1024
_VISIBLE = 0.08  # a pixel belongs to a defect where the defect changes the fabric by > 8 %

Window = tuple[slice, slice]
# A drawn defect: the frame window it covers, its gain on the fabric there, and how far it
# displaces the threads along v (or None); None when it falls off the frame.
Drawn = tuple[Window, np.ndarray, np.ndarray | None] | None


@dataclass(frozen=True)
class _Scene:
    """Everything fixed for one camera: see the module docstring."""

    static: np.ndarray  # (H, W, 3) float32: the frame without fabric, fabric area zeroed
    alpha: np.ndarray  # (H, W) float32: how much fabric shows (0 off it and under the roller)
    light: np.ndarray  # (H, W) float32: lighting and shadows on the fabric
    tilt: np.ndarray  # (H, W) float32: -1..1 left to right, for per-frame lighting changes
    u: np.ndarray  # (H, W) float32 fabric coordinates of each pixel
    v: np.ndarray
    flat: np.ndarray  # (H, W) int64: tile index of each pixel before scrolling
    tile: np.ndarray  # (2V, U) float32 woven texture, seamless along v
    to_frame: np.ndarray  # 3x3 homography fabric (u, v) -> frame (x, y)
    fabric: tuple[int, int]  # (U, V)
    pitch: tuple[float, float]  # thread spacing across u and along v, in fabric units
    tint: np.ndarray  # (3,) colour of the fabric


def _homography(src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]]) -> np.ndarray:
    """The 3x3 projective map taking the four points `src` to `dst`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows, float), np.array(rhs, float)), 1.0).reshape(3, 3)


def _apply(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    den = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / den, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / den


def _polygon(size: tuple[int, int], points: Sequence[tuple[float, float]], soften: float = 0.8) -> np.ndarray:
    """A (H, W) float32 0..1 mask of the polygon with points in 0..1 frame units."""
    w, h = size
    im = Image.new("L", size, 0)
    ImageDraw.Draw(im).polygon([(x * w, y * h) for x, y in points], fill=255)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(soften)), np.float32) / 255


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 smooth noise around 0 (std ~1): a coarse random grid, upscaled."""
    coarse = rng.standard_normal((cells[1], cells[0])).astype(np.float32)
    im = Image.fromarray(coarse, mode="F").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(im, np.float32)


def _streaks(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """Long motion-blurred threads along `angle` (radians): 0..1 stripes across the direction,
    broken along it, like the unwoven warp sheet beside the fabric."""
    across = (-x * math.sin(angle) + y * math.cos(angle)) / scale
    along = (x * math.cos(angle) + y * math.sin(angle)) / (scale * 40)
    n = 4096
    stripes, dashes = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    a = stripes[across.astype(np.int64) % n] ** 3
    d = dashes[(along + 7 * stripes[across.astype(np.int64) % n]).astype(np.int64) % n]
    return a * (0.35 + 0.65 * d)


def _fabric_tile(rng: np.random.Generator, width: int, height: int, pitch: tuple[float, float]) -> np.ndarray:
    """A woven texture `height` x `width` (float32, ~0.15..1): a plain weave of warp threads
    (columns, spacing pitch[0]) and weft threads (rows, pitch[1]), each thread a little
    brighter or darker, with cloudy density changes. `height` is a whole number of weft
    pitches, so the tile repeats seamlessly as the fabric scrolls."""
    pu, pv = pitch
    x = (np.arange(width, dtype=np.float32) + 0.5) / pu
    y = (np.arange(height, dtype=np.float32) + 0.5) / pv
    i, j = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    round_u = np.sin(np.pi * (x - i)) ** 0.6  # thread cross-section: bright crest, dark gap
    round_v = np.sin(np.pi * (y - j)) ** 0.6
    warp_gain = (1 + 0.10 * rng.standard_normal(i.max() + 1)).astype(np.float32)[i]
    weft_gain = (1 + 0.07 * rng.standard_normal(j.max() + 1)).astype(np.float32)[j]
    warp_up = (i[None, :] + j[:, None]) % 2 == 0
    warp = round_u[None, :] * (0.72 + 0.28 * round_v[:, None]) * warp_gain[None, :]
    weft = round_v[:, None] * (0.55 + 0.25 * round_u[None, :]) * weft_gain[:, None]
    cloud = _smooth_noise(rng, (width, height), (max(2, width // 90), max(2, height // 90)))
    return (0.42 + 0.58 * np.where(warp_up, warp, weft)) * (1 + 0.05 * cloud)


@lru_cache(maxsize=4)
def _scene(seed: int, width: int, height: int) -> _Scene:
    """Build the fixed camera view for `seed` at `width` x `height`."""
    rng = np.random.default_rng((seed, 0))
    size = (width, height)

    def j(spread: float) -> float:  # small per-seed camera jitter
        return float(rng.uniform(-spread, spread))

    # Fabric corners (0..1 frame units): far edge at the top, narrower, as the camera looks down.
    quad = [(0.40 + j(0.03), 0.05 + j(0.02)), (0.78 + j(0.02), 0.06 + j(0.02)),
            (0.81 + j(0.02), 0.95), (0.17 + j(0.03), 0.95)]
    fabric_u = round(0.5 * width * (quad[1][0] - quad[0][0] + quad[2][0] - quad[3][0]))
    fabric_v = round(height * 0.9)
    corners = [(0, 0), (fabric_u, 0), (fabric_u, fabric_v), (0, fabric_v)]
    to_fabric = _homography([(x * width, y * height) for x, y in quad], corners)
    to_frame = np.linalg.inv(to_fabric)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = (a.astype(np.float32) for a in _apply(to_fabric, xx, yy))

    pitch_u = width / 300 * rng.uniform(0.9, 1.1)
    pitch = (pitch_u, pitch_u * rng.uniform(0.75, 0.9))
    tile_v = int(2 * fabric_v / pitch[1] + 1) * pitch[1]
    pitch = (pitch[0], tile_v / round(tile_v / pitch[1]))
    tile = _fabric_tile(rng, fabric_u, math.ceil(tile_v), pitch)
    ui = np.clip(u, 0, fabric_u - 1).astype(np.int64)
    vi = np.clip(v, 0, fabric_v - 1).astype(np.int64)

    fabric = _polygon(size, quad)
    # The roller bar lies across the fabric from the far edge to the near one.
    bar_top = quad[0][0] + (quad[1][0] - quad[0][0]) * rng.uniform(0.5, 0.65)
    bar_bottom = quad[3][0] + (quad[2][0] - quad[3][0]) * rng.uniform(0.5, 0.62)
    bar_w = 0.022 * rng.uniform(0.9, 1.2)
    bar_axis = (xx / width - (bar_top + (bar_bottom - bar_top) * yy / height)) / (bar_w * (0.8 + 0.4 * yy / height))
    bar = np.clip(1.5 - np.abs(bar_axis) * 1.5, 0, 1) ** 0.5 * (yy > 0.02 * height)
    shadow = 1 - 0.5 * np.exp(-(((bar_axis - 1.6) / 1.2) ** 2))
    alpha = fabric * (1 - bar)

    gx, gy = xx / width - 0.5, yy / height - 0.5
    tilt = (2 * gx).astype(np.float32)
    light = (1.05 - 0.55 * (gx**2 + gy**2)) * (1 + rng.uniform(-0.15, 0.15) * tilt) * shadow
    if rng.random() < 0.5:  # the beater's blurred shadow, sweeping diagonally across
        sweep = (gx * 0.8 + gy * 0.6 - rng.uniform(-0.35, 0.0)) / 0.07
        light = light * (1 - 0.45 * np.exp(-(sweep**2)))
    light *= 1 + 0.03 * _smooth_noise(rng, size, (6, 4))

    static = _machine(rng, size, quad)
    metal = 0.14 + 0.25 * np.sqrt(np.clip(1 - bar_axis**2, 0, 1)) + 0.3 * np.exp(-(((bar_axis + 0.35) / 0.18) ** 2))
    static = static * (1 - bar[..., None]) + (bar * metal)[..., None] * np.array([0.92, 0.95, 1.0], np.float32)
    static = static * (1 - alpha[..., None])
    return _Scene(
        static=static.astype(np.float32), alpha=alpha.astype(np.float32), light=light.astype(np.float32),
        tilt=tilt, u=u, v=v, flat=vi * fabric_u + ui, tile=tile.astype(np.float32), to_frame=to_frame,
        fabric=(fabric_u, fabric_v), pitch=pitch,
        tint=np.array([0.90, 0.94, 1.0], np.float32) * rng.uniform(0.93, 1.0),
    )


def _machine(rng: np.random.Generator, size: tuple[int, int], quad: Sequence[tuple[float, float]]) -> np.ndarray:
    """The loom around the fabric as (H, W, 3) float32. It is only backdrop, so it is drawn at
    most `_MACHINE_WIDTH` wide and scaled up: 2560x1440 scenes build in a fraction of the time."""
    width, height = size
    scale = min(1.0, _MACHINE_WIDTH / width)
    work = (round(width * scale), round(height * scale))
    art = _draw_machine(rng, work, quad)
    if work == size:
        return art
    channels = [Image.fromarray(art[..., c], mode="F").resize(size, Image.Resampling.BICUBIC) for c in range(3)]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def _draw_machine(rng: np.random.Generator, size: tuple[int, int], quad: Sequence[tuple[float, float]]) -> np.ndarray:
    """The loom around the fabric, (H, W, 3) float32: the warp sheet left of it, a light
    machine panel with dark slots and a wooden plank on the far left, the worn green frame and
    floor on the right, dark parts along the bottom."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    out = np.empty((height, width, 3), np.float32)
    out[:] = np.array([0.09, 0.09, 0.085], np.float32) * (1 + 0.3 * _smooth_noise(rng, size, (8, 5)))[..., None]
    (tlx, tly), (trx, _), (brx, _), (blx, bly) = quad

    sheet = _polygon(size, [(tlx - 0.14, 0.0), (tlx + 0.02, tly), (blx + 0.02, bly), (blx - 0.16, 1.0)], 2.0)
    threads = _streaks(rng, xx, yy, math.radians(rng.uniform(-32, -22)), width / 700)
    out += (sheet * (0.12 + 0.55 * threads))[..., None] * np.array([0.85, 0.87, 0.92], np.float32)

    panel = _polygon(size, [(0, 0), (tlx - 0.16, 0), (blx - 0.33, 1.0), (0, 1.0)], 1.0)
    shade = 0.62 - 0.18 * yy / height + 0.03 * _smooth_noise(rng, size, (10, 6))
    slots = Image.new("L", size, 0)
    draw = ImageDraw.Draw(slots)
    for row in range(9):
        t = (row + 0.5) / 9
        for col in (0.35, 0.75):
            cx = ((tlx - 0.16) * (1 - t) + (blx - 0.33) * t) * col * width
            cy = t * height
            draw.rounded_rectangle(
                (cx - 0.022 * width, cy - 0.012 * height, cx + 0.022 * width, cy + 0.012 * height),
                radius=max(1, int(0.006 * width)), fill=255,
            )
    hole = np.asarray(slots.filter(ImageFilter.GaussianBlur(1)), np.float32) / 255
    grey = (shade * (1 - 0.8 * hole))[..., None] * np.array([0.97, 0.98, 1.0], np.float32)
    out = out * (1 - panel[..., None]) + panel[..., None] * grey
    px = rng.uniform(0.12, 0.2)
    plank = _polygon(size, [(px, 0.0), (px + 0.05, 0.0), (px + 0.03, 0.42), (px - 0.02, 0.42)], 1.0)
    out = out * (1 - plank[..., None]) + plank[..., None] * np.array([0.55, 0.33, 0.17], np.float32)

    frame = _polygon(size, [(trx + 0.02, 0.0), (1.0, 0.0), (1.0, 1.0), (brx + 0.03, 1.0)], 1.5)
    edge = _polygon(size, [(trx + 0.12, 0.0), (1.0, 0.0), (1.0, 1.0), (brx + 0.16, 1.0)], 2.5)
    wear = (_smooth_noise(rng, size, (150, 84)) > 1.9).astype(np.float32)
    green = np.array([0.07, 0.25, 0.18], np.float32) * (1 + 0.5 * wear)[..., None]
    floor = np.where((yy < 0.55 * height)[..., None], np.array([0.12, 0.38, 0.27], np.float32),
                     np.array([0.33, 0.34, 0.34], np.float32))
    floor = floor * (1 + 0.15 * _smooth_noise(rng, size, (30, 17)))[..., None]
    green = green * (1 - edge[..., None]) + edge[..., None] * floor
    out = out * (1 - frame[..., None]) + frame[..., None] * green

    bottom = _polygon(size, [(0, 0.955), (1, 0.945), (1, 1), (0, 1)], 1.5)
    out *= 1 - 0.75 * bottom[..., None]
    return out


def _window(scene: _Scene, u0: float, u1: float, v0: float, v1: float, pad: int = 3) -> Window | None:
    """The frame rows/cols covering the fabric rectangle u0..u1 x v0..v1, or None if empty."""
    xs, ys = _apply(scene.to_frame, np.array([u0, u1, u1, u0]), np.array([v0, v0, v1, v1]))
    height, width = scene.alpha.shape
    x0, x1 = max(0, int(xs.min()) - pad), min(width, math.ceil(xs.max()) + pad)
    y0, y1 = max(0, int(ys.min()) - pad), min(height, math.ceil(ys.max()) + pad)
    return (slice(y0, y1), slice(x0, x1)) if x0 < x1 and y0 < y1 else None


def _drop(scene: _Scene, rng: np.random.Generator, u0: float, v0: float) -> Drawn:
    """A missing stitch: a small dark irregular spot, ~1.5 % of the frame width across."""
    width = scene.alpha.shape[1]
    r = 0.0065 * width * rng.uniform(0.8, 1.25)
    ru, rv = r, r * rng.uniform(1.0, 1.35)  # a little longer along the warp
    win = _window(scene, u0 - 1.5 * ru, u0 + 1.5 * ru, v0 - 1.5 * rv, v0 + 1.5 * rv)
    if win is None:
        return None
    du, dv = (scene.u[win] - u0) / ru, (scene.v[win] - v0) / rv
    theta = np.arctan2(dv, du)
    wobble = 1 + 0.12 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * theta + rng.uniform(0, 6.3))
    d = np.sqrt(du**2 + dv**2) / wobble
    depth = rng.uniform(0.55, 0.8)
    return win, 1 - depth * np.clip((1.1 - d) / 0.35, 0, 1) ** 1.5, None


def _broken_weft(scene: _Scene, rng: np.random.Generator, u0: float, v0: float) -> Drawn:
    """A missing weft thread: a long thin dark line across the warp, interrupted in places,
    with the neighbouring weft pulled bright beside it."""
    fu, _ = scene.fabric
    _, pv = scene.pitch
    half = fu * rng.uniform(0.08, 0.2)
    slope = rng.uniform(-0.025, 0.025)
    sigma = 0.55 * pv
    win = _window(scene, u0 - half, u0 + half, v0 - abs(slope) * half - 4 * pv, v0 + abs(slope) * half + 4 * pv)
    if win is None:
        return None
    u, v = scene.u[win], scene.v[win]
    t = (u - u0) / half  # -1..1 along the line
    gaps = rng.uniform(-0.8, 0.8, size=rng.integers(1, 4))
    present = np.clip((np.abs(t[..., None] - gaps).min(axis=-1) - 0.04) / 0.03, 0, 1)
    along = np.clip((1 - np.abs(t)) / 0.08, 0, 1) * present
    centre = v0 + slope * (u - u0) + 0.4 * pv * np.sin(t * rng.uniform(2, 5))
    dark = np.exp(-(((v - centre) / sigma) ** 2))
    bright = np.exp(-(((v - centre - 1.3 * pv) / (0.5 * sigma)) ** 2))
    return win, 1 + along * (0.3 * bright - rng.uniform(0.55, 0.75) * dark), None


def _wrinkle(scene: _Scene, rng: np.random.Generator, u0: float, v0: float) -> Drawn:
    """A fold: an elongated band along the weft, lit on one side and shaded on the other,
    with the threads bunched into it; it fades out at both ends."""
    fu, fv = scene.fabric
    half = fu * rng.uniform(0.1, 0.22)
    sigma = fv * rng.uniform(0.008, 0.014)
    amp, period, phase = sigma * rng.uniform(0.5, 1.5), half * rng.uniform(1.5, 3), rng.uniform(0, 6.3)
    slope = rng.uniform(-0.06, 0.06)
    reach = abs(slope) * half + amp + 3 * sigma
    win = _window(scene, u0 - half, u0 + half, v0 - reach, v0 + reach)
    if win is None:
        return None
    u, v = scene.u[win], scene.v[win]
    t = (u - u0) / half
    taper = np.clip(np.sin(np.pi * np.clip((t + 1) / 2, 0, 1)), 0, 1) ** 0.7
    d = (v - (v0 + slope * (u - u0) + amp * np.sin(2 * np.pi * (u - u0) / period + phase))) / sigma
    bump = np.exp(-(d**2))
    strength = rng.uniform(0.35, 0.5) * rng.choice([-1.0, 1.0])
    gain = 1 + taper * (strength * -1.7 * d * bump - 0.25 * bump)
    return win, gain, -0.8 * sigma * taper * bump * np.sign(d)


_DEFECTS: dict[str, Callable[[_Scene, np.random.Generator, float, float], Drawn]] = {
    "broken-weft": _broken_weft, "drop": _drop, "wrinkle": _wrinkle,
}


def _place(
    scene: _Scene, rng: np.random.Generator, label: str, taken: list[Box]
) -> tuple[Window, np.ndarray, np.ndarray | None, Box] | None:
    """Try spots until the defect is mostly visible (not under the roller, on the fabric) and
    clear of the boxes already `taken`. Returns (window, gain, displacement, box) or None."""
    fu, fv = scene.fabric
    for _ in range(30):
        # broken-weft shows only in the left part of the frame, as in the seed's region rules
        u0 = rng.uniform(0.12, 0.55 if label == "broken-weft" else 0.88) * fu
        v0 = rng.uniform(0.1, 0.9) * fv
        made = _DEFECTS[label](scene, rng, u0, v0)
        if made is None:
            continue
        win, gain, shift = made
        changed = np.abs(gain - 1) > _VISIBLE
        seen = changed & (scene.alpha[win] > 0.5)
        if seen.sum() < 12 or seen.sum() < 0.85 * changed.sum():
            continue
        rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
        box = Box(label, float(win[1].start + cols[0]), float(win[0].start + rows[0]),
                  float(win[1].start + cols[-1] + 1), float(win[0].start + rows[-1] + 1))
        if all(_apart(box, other) for other in taken):
            return win, gain, shift, box
    return None


def _apart(a: Box, b: Box, gap: float = 4.0) -> bool:
    return a.x2 + gap <= b.x1 or b.x2 + gap <= a.x1 or a.y2 + gap <= b.y1 or b.y2 + gap <= a.y1


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_frame(seed: int, index: int, size: tuple[int, int], negative: bool) -> tuple[Image.Image, list[Box]]:
    """Frame `index` of camera `seed` at `size` = (W, H): the picture and its defect boxes
    (none when `negative`). Deterministic for its arguments."""
    width, height = size
    scene = _scene(seed, width, height)
    rng = np.random.default_rng((seed, 1, index))
    fu, fv = scene.fabric
    scroll = int(rng.integers(0, scene.tile.shape[0] - fv)) * fu  # the fabric has moved on
    fabric = scene.tile.ravel().take(scene.flat + scroll)

    boxes: list[Box] = []
    count = 0 if negative else int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    for label in rng.choice(CLASSES, size=count, p=CLASS_WEIGHTS):
        placed = _place(scene, rng, str(label), boxes)
        if placed is None:
            continue
        win, gain, shift, box = placed
        if shift is not None:  # re-gather the window with the threads displaced
            rows = np.clip(scene.flat[win] // fu + np.rint(shift).astype(np.int64), 0, fv - 1)
            fabric[win] = scene.tile.ravel().take(rows * fu + scene.flat[win] % fu + scroll)
        fabric[win] *= gain
        boxes.append(box)

    light = scene.light * (1 + rng.uniform(-0.12, 0.12) * scene.tilt)
    rgb = scene.static + (scene.alpha * fabric * light)[..., None] * scene.tint
    rgb *= rng.uniform(0.85, 1.08)
    rgb += (rng.uniform(0.012, 0.03) * rng.standard_normal((height, width), dtype=np.float32))[..., None]
    np.multiply(rgb, 255, out=rgb)
    image = Image.fromarray(np.clip(rgb, 0, 255, out=rgb).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8) * width / 768))
    _overlay(image, seed, index, rng)
    return image, boxes


def _overlay(image: Image.Image, seed: int, index: int, rng: np.random.Generator) -> None:
    """Burn in the camera's timestamp (top left) and name (bottom right), like the seed's CCTV."""
    width, height = image.size
    start = datetime(2024, 4, 19, 21, 0, 0) + timedelta(days=seed % 97)
    stamp = (start + timedelta(seconds=index * 37 + int(rng.integers(0, 30)))).strftime("%Y-%m-%d %H:%M:%S")
    draw = ImageDraw.Draw(image)
    font = _font(max(8, round(height * 0.04)))
    style = {"fill": (235, 235, 235), "stroke_width": max(1, height // 500), "stroke_fill": (20, 20, 20), "font": font}
    draw.text((0.01 * width, 0.03 * height), stamp, **style)
    draw.text((0.72 * width, 0.89 * height), f"Camera {seed % 99 + 1:02d}", **style)


def synthesize(
    out: str | Path,
    images: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (768, 432),
    negative_fraction: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> list[ImageRecord]:
    """Write `images` synthetic loom frames as `out/images/frame_NNNNN.jpg` with LabelImg VOC
    files `out/annotations/frame_NNNNN.xml`, and return their records (paths relative to
    `out`). At least `negative_fraction` of the frames are defect-free. Same arguments, same
    bytes. `size` = (W, H) from 128x72 up to 2560x1440. `progress(done, total)` after each
    frame. Raises ValueError for arguments out of range."""
    width, height = size
    if not (MIN_SIZE[0] <= width <= MAX_SIZE[0] and MIN_SIZE[1] <= height <= MAX_SIZE[1]):
        raise ValueError(f"size {width}x{height} out of range {MIN_SIZE[0]}x{MIN_SIZE[1]}..{MAX_SIZE[0]}x{MAX_SIZE[1]}")
    if images < 0 or seed < 0 or not 0 <= negative_fraction <= 1:
        raise ValueError("images and seed must be >= 0 and negative_fraction in 0..1")
    out = Path(out)
    order = np.random.default_rng((seed, 2)).permutation(images)
    negatives = set(order[: math.ceil(images * negative_fraction)].tolist())
    records = []
    for i in range(images):
        image, boxes = render_frame(seed, i, (width, height), i in negatives)
        record = ImageRecord(f"images/frame_{i:05d}.jpg", width, height, boxes, f"annotations/frame_{i:05d}.xml")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        atomic_write(out / record.image, buffer.getvalue(), durable=False)
        write_voc(record, out / record.source, out)
        records.append(record)
        if progress:
            progress(i + 1, images)
    return records


def contact_sheet(
    records: Sequence[ImageRecord], root: str | Path, path: str | Path, columns: int = 3, thumb_width: int = 512
) -> None:
    """Save a JPEG grid of the `records`' frames (images relative to `root`) with their boxes
    and labels drawn, `columns` wide, each frame scaled to `thumb_width`."""
    colours = {"broken-weft": (255, 70, 70), "drop": (255, 220, 0), "wrinkle": (0, 230, 255)}
    thumbs = []
    for record in records:
        scale = thumb_width / record.width
        with Image.open(Path(root) / record.image) as im:
            thumb = im.convert("RGB").resize((thumb_width, round(record.height * scale)), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(thumb)
        font = _font(max(9, thumb_width // 45))
        for box in record.boxes:
            colour = colours.get(box.label, (255, 255, 255))
            xy = (box.x1 * scale - 2, box.y1 * scale - 2, box.x2 * scale + 2, box.y2 * scale + 2)
            draw.rectangle(xy, outline=colour, width=2)
            draw.text((xy[0], xy[1] - font.size - 3), box.label, fill=colour, font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0))
        thumbs.append(thumb)
    rows = math.ceil(len(thumbs) / columns)
    th = max(t.height for t in thumbs)
    sheet = Image.new("RGB", (columns * thumb_width + (columns - 1) * 4, rows * th + (rows - 1) * 4), (255, 255, 255))
    for k, thumb in enumerate(thumbs):
        sheet.paste(thumb, ((k % columns) * (thumb_width + 4), (k // columns) * (th + 4)))
    buffer = io.BytesIO()
    sheet.save(buffer, "JPEG", quality=82, optimize=True)
    atomic_write(path, buffer.getvalue())
