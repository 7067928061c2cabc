"""Generic synthetic scenes for pretraining the tiny model: shapes on varied textures.

This is deliberately *not* the loom-defect data: the tiny model learns to see (where and what
simple things are) from these, so that fine-tuning on loom defects is a real transfer, as
fine-tuning Microsoft's pretrained Florence-2 is. Scenes are drawn fresh from a seed, fast
enough (~1 ms each at 256 px) to generate every training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from loomlens.data.records import Box

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "bar", "spot", "band")
COLOURS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 50),
    "white": (240, 240, 240), "black": (20, 20, 20), "orange": (235, 130, 30), "purple": (130, 50, 170),
}


@dataclass
class Scene:
    """One generated image with its boxes and the colour name of each box."""

    image: Image.Image
    boxes: list[Box]
    colours: list[str]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random textured background: plain, gradient, stripes, weave or noise."""
    base = rng.uniform(60, 200, size=3)
    if rng.random() < 0.3:  # greyscale, like most fabric under a line camera
        base[:] = base[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(5)
    if kind == 1:
        tex = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None] * rng.uniform(20, 60)
    elif kind == 2:
        period = rng.uniform(4, 16)
        tex = (np.sin((xx if rng.random() < 0.5 else yy) * size * 2 * np.pi / period))[..., None] * 15
    elif kind == 3:
        p = rng.uniform(3, 8)
        tex = (np.sin(xx * size * 2 * np.pi / p) * np.sin(yy * size * 2 * np.pi / p))[..., None] * 18
    else:
        tex = np.zeros((size, size, 1), np.float32)
    noise = rng.normal(0, rng.uniform(2, 10), size=(size, size, 1))
    return np.clip(base[None, None, :] + tex + noise, 0, 255)


def _far_colour(rng: np.random.Generator, background: np.ndarray) -> str:
    """A colour name that stands out from the background's mean colour."""
    mean = background.reshape(-1, 3).mean(0)
    names = list(COLOURS)
    dist = np.array([np.abs(np.array(COLOURS[n]) - mean).sum() for n in names])
    candidates = [n for n, d in zip(names, dist) if d > 150] or [names[int(dist.argmax())]]
    return candidates[rng.integers(len(candidates))]


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, w: float, h: float, fill) -> tuple:
    """Draw one shape filling (x, y, w, h); return its tight box (x1, y1, x2, y2)."""
    x2, y2 = x + w, y + h
    if kind in ("circle", "spot"):
        draw.ellipse([x, y, x2, y2], fill=fill)
    elif kind == "square":
        draw.rectangle([x, y, x2, y2], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x, y2), ((x + x2) / 2, y), (x2, y2)], fill=fill)
    elif kind == "ring":
        t = max(2.0, min(w, h) * 0.2)
        draw.ellipse([x, y, x2, y2], outline=fill, width=int(t))
    elif kind == "cross":
        t = max(2.0, min(w, h) * 0.3)
        cx, cy = (x + x2) / 2, (y + y2) / 2
        draw.rectangle([x, cy - t / 2, x2, cy + t / 2], fill=fill)
        draw.rectangle([cx - t / 2, y, cx + t / 2, y2], fill=fill)
    else:  # bar and band: long thin rectangles
        draw.rectangle([x, y, x2, y2], fill=fill)
    return x, y, x2, y2


def _size_for(kind: str, rng: np.random.Generator, size: int) -> tuple[float, float]:
    # Half the objects are shrunk (log-uniform down to a quarter) so that pretraining also sees
    # defect-sized things: a loom "drop" is 4-8 px and a broken weft 3-4 px thick at 256 px.
    s = size * (np.exp(rng.uniform(np.log(0.25), 0.0)) if rng.random() < 0.5 else 1.0)
    if kind == "spot":
        d = max(3.0, rng.uniform(0.06, 0.1) * s)
        return d, d
    if kind == "bar":
        long, thin = rng.uniform(0.3, 0.7) * max(s, size / 2), max(2.0, rng.uniform(0.05, 0.08) * s)
        return (long, thin) if rng.random() < 0.5 else (thin, long)
    if kind == "band":
        return rng.uniform(0.35, 0.8) * max(s, size / 2), max(3.0, rng.uniform(0.1, 0.18) * s)
    d = rng.uniform(0.12, 0.35) * s
    return max(3.0, d * rng.uniform(0.8, 1.25)), max(3.0, d)


def make_scene(rng: np.random.Generator, size: int = 256, max_objects: int = 4,
               classes: tuple[str, ...] = SHAPE_CLASSES, empty_fraction: float = 0.1) -> Scene:
    """Draw one scene of `size` x `size` with 0..`max_objects` non-overlapping shapes."""
    background = _background(rng, size)
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    boxes: list[Box] = []
    colours: list[str] = []
    for _ in range(n * 6):  # a few tries per object to avoid overlaps
        if len(boxes) == n:
            break
        kind = classes[rng.integers(len(classes))]
        w, h = _size_for(kind, rng, size)
        x, y = rng.uniform(2, size - w - 2), rng.uniform(2, size - h - 2)
        if any(x < b.x2 + 4 and b.x1 < x + w + 4 and y < b.y2 + 4 and b.y1 < y + h + 4 for b in boxes):
            continue
        patch = background[int(y):int(y + h) + 1, int(x):int(x + w) + 1]
        colour = _far_colour(rng, patch)
        # A third are faint (blended towards the background), as real defects often are.
        alpha = rng.uniform(0.35, 0.8) if rng.random() < 0.33 else 1.0
        fill = tuple(int(alpha * c + (1 - alpha) * m) for c, m in zip(COLOURS[colour], patch.reshape(-1, 3).mean(0)))
        x1, y1, x2, y2 = _draw(draw, kind, x, y, w, h, fill)
        boxes.append(Box(kind, x1, y1, x2, y2))
        colours.append(colour)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return Scene(image, boxes, colours)
