"""Copy-paste for defects: a frame that shows defects gets one more, cut with a rim of its own
fabric from a training frame and blended in at a free place.

Simple Copy-Paste (Ghiasi et al. 2021, arXiv:2012.07177, sec. 3) pastes objects between
training images and finds that plain pasting works as well as blending. A fabric defect is no
object on a background, though: the seam between two weaves would itself look like a defect.
So the patch keeps a rim of the donor's fabric that fades out (`feather`), its colours are
moved to the receiving frame's (`matched`), and the defect's box is the only box added. The donor's class is drawn first, uniformly, then one of its boxes,
so a rare class is pasted as often as a common one (the share of whole frames stays the
balance's, `loomlens.data.sampling`). Defect-free frames are never pasted onto: the balance
holds them as the negatives the model must answer with no box.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from loomlens.data.records import Box

#: The rim of donor fabric around a pasted defect: this share of the box's side, at least
#: `MIN_RIM` px; it fades from the box's edge to the patch's.
RIM_SHARE = 0.25
MIN_RIM = 3
#: Places tried for a patch before the frame is left as it is.
PLACE_TRIES = 8


def by_class(boxes: Sequence[Sequence[Box] | None]) -> dict[str, list[tuple[int, Box]]]:
    """Every box of `boxes` (one sequence per sample, None for text answers) under its label,
    with the index of its sample: what `draw_donor` chooses from."""
    donors: dict[str, list[tuple[int, Box]]] = {}
    for index, sample in enumerate(boxes):
        for box in sample or ():
            donors.setdefault(box.label, []).append((index, box))
    return donors


def draw_donor(donors: dict[str, list[tuple[int, Box]]], rng: random.Random) -> tuple[int, Box]:
    """A (sample index, box) of `donors`: its class uniformly, then one box of that class."""
    label = rng.choice(sorted(donors))
    return rng.choice(donors[label])


def cut_patch(picture: Image.Image, box: Box) -> tuple[Image.Image, Box]:
    """The piece of `picture` around `box` with its rim (cut to the picture), and the box in
    the piece's pixels."""
    rim_x = max(MIN_RIM, RIM_SHARE * box.width)
    rim_y = max(MIN_RIM, RIM_SHARE * box.height)
    x0, y0 = max(0, int(box.x1 - rim_x)), max(0, int(box.y1 - rim_y))
    x1, y1 = min(picture.width, int(box.x2 + rim_x) + 1), min(picture.height, int(box.y2 + rim_y) + 1)
    inside = replace(box, x1=max(box.x1, x0) - x0, y1=max(box.y1, y0) - y0,
                     x2=min(box.x2, x1) - x0, y2=min(box.y2, y1) - y0)
    return picture.crop((x0, y0, x1, y1)), inside


def _ramp(size: int, lo: float, hi: float) -> np.ndarray:
    """Per pixel along one side of `size`: 1 inside [lo, hi), falling linearly to 0 at the
    side's ends outside it."""
    centres = np.arange(size) + 0.5
    rise = np.clip(centres / max(lo, 1e-6), 0, 1)
    fall = np.clip((size - centres) / max(size - hi, 1e-6), 0, 1)
    return np.minimum(rise, fall)


def feather(patch: Image.Image, box: Box) -> Image.Image:
    """The blending mask of `patch` ("L", its size): opaque over `box`, fading to clear at the
    patch's edges, so the donor's fabric meets the frame's without a seam."""
    mask = np.outer(_ramp(patch.height, box.y1, box.y2), _ramp(patch.width, box.x1, box.x2))
    return Image.fromarray(np.round(mask * 255).astype(np.uint8), mode="L")


def matched(patch: Image.Image, region: Image.Image) -> Image.Image:
    """`patch` with each channel's mean and spread moved to those of `region` (the receiving
    frame under it, same size), the spread's factor held to [1/2, 2]: a defect cut from a
    darker or other-coloured cloth then shows as a defect, not as a foreign square (Reinhard et
    al. 2001's colour transfer, per RGB channel)."""
    source = np.asarray(patch, dtype=np.float32)
    target = np.asarray(region, dtype=np.float32)
    mean_s, mean_t = source.mean(axis=(0, 1)), target.mean(axis=(0, 1))
    gain = np.clip(target.std(axis=(0, 1)) / np.maximum(source.std(axis=(0, 1)), 1e-3), 0.5, 2.0)
    return Image.fromarray(np.clip((source - mean_s) * gain + mean_t, 0, 255).round().astype(np.uint8), mode="RGB")


def _overlaps(a: tuple[float, float, float, float], box: Box) -> bool:
    return a[0] < box.x2 and box.x1 < a[2] and a[1] < box.y2 and box.y1 < a[3]


def paste(image: Image.Image, boxes: list[Box], patch: Image.Image, box: Box,
          rng: random.Random) -> tuple[Image.Image, list[Box]]:
    """`image` with `patch` blended in at a random place where the whole patch misses every box.

    Args:
        image: the receiving picture, RGB, W x H (left as it is; a copy is returned).
        boxes: its boxes in pixels.
        patch: the donor's piece (`cut_patch`), RGB, at most W x H to fit.
        box: the defect in the patch's pixels.
        rng: the sample's generator.

    Returns:
        The new picture (W x H) and `boxes` plus the pasted box; `image` and `boxes` as they
        are when no place was free after `PLACE_TRIES` draws.
    """
    room_x, room_y = image.width - patch.width, image.height - patch.height
    if room_x < 0 or room_y < 0:
        return image, boxes
    for _ in range(PLACE_TRIES):
        x0, y0 = rng.randint(0, room_x), rng.randint(0, room_y)
        if not any(_overlaps((x0, y0, x0 + patch.width, y0 + patch.height), b) for b in boxes):
            region = image.crop((x0, y0, x0 + patch.width, y0 + patch.height))
            pasted = image.copy()
            pasted.paste(matched(patch, region), (x0, y0), feather(patch, box))
            moved = replace(box, x1=box.x1 + x0, y1=box.y1 + y0, x2=box.x2 + x0, y2=box.y2 + y0)
            return pasted, [*boxes, moved]
    return image, boxes
