"""Online augmentation moves boxes with the pixels, keeps every defect whole, and repeats."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loomlens.data.augment import NONE, Augment, augment, sample_rng
from loomlens.data.records import Box
from loomlens.data.tiles import MIN_VISIBLE, clip_box

#: The model input the small pictures below are augmented for: none of them is large for it.
EDGE = 64
#: Only the defect crop, always.
CROP = Augment(hflip=0, vflip=0, rot90=0, brightness=0, contrast=0, gamma=0, grey=0, scale=0, crop=1.0)


def _marked(width: int = 64, height: int = 40) -> tuple[Image.Image, Box]:
    """A black picture with one white rectangle, and its box."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[5:15, 40:56] = 255
    return Image.fromarray(pixels), Box("knot", 40, 5, 56, 15)


def _white_bounds(image: Image.Image) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.asarray(image.convert("L")) > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("which", ["hflip", "vflip", "rot90"])
def test_geometry_moves_the_box_with_the_pixels(which: str) -> None:
    image, box = _marked()
    only = Augment(**{**{f: 0 for f in Augment.__dataclass_fields__}, which: 1.0})
    out, (moved,) = augment(image, [box], aug=only, edge=EDGE, rng=sample_rng(0, 0, 0))
    assert _white_bounds(out) == pytest.approx((moved.x1, moved.y1, moved.x2, moved.y2))
    if which == "rot90":
        assert out.size == (40, 64)


@pytest.mark.parametrize("size", [None, (48, 48)])
def test_crop_jitter_keeps_every_box_whole_and_in_step_with_pixels(size) -> None:
    # size: the picture straight at the model's input, the jitter's crop and the squeeze one resampling
    image, box = _marked()
    jitter = Augment(hflip=0, vflip=0, rot90=0, brightness=0, contrast=0, gamma=0, grey=0, scale=0.5)
    width, height = size or image.size
    changed = 0
    for i in range(40):
        out, (moved,) = augment(image, [box], aug=jitter, edge=EDGE, rng=sample_rng(1, 0, i), size=size)
        assert out.size == (width, height)
        assert 0 <= moved.x1 < moved.x2 <= width and 0 <= moved.y1 < moved.y2 <= height
        # Resampling blurs the edges by a pixel at most.
        assert _white_bounds(out) == pytest.approx((moved.x1, moved.y1, moved.x2, moved.y2), abs=1.5)
        # a crop only zooms in: never smaller, never cut
        assert moved.width >= box.width * width / image.width - 1e-6
        changed += moved != box
    assert changed > 30


def test_photometry_leaves_boxes_and_size_alone() -> None:
    image, box = _marked()
    look = Augment(hflip=0, vflip=0, rot90=0, brightness=0.5, contrast=0.5, gamma=0.5, grey=1.0, scale=0)
    out, boxes = augment(image, [box], aug=look, edge=EDGE, rng=sample_rng(0, 0, 3))
    assert boxes == [box] and out.size == image.size and out.mode == "RGB"
    r, g, b = (np.asarray(out)[..., k] for k in range(3))
    assert np.array_equal(r, g) and np.array_equal(g, b)  # grey, kept as RGB


def test_same_draw_same_picture_and_different_epochs_differ() -> None:
    image, box = _marked()
    first = augment(image, [box], aug=Augment(), edge=EDGE, rng=sample_rng(0, 2, 5))
    again = augment(image, [box], aug=Augment(), edge=EDGE, rng=sample_rng(0, 2, 5))
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and first[1] == again[1]
    others = [augment(image, [box], aug=Augment(), edge=EDGE, rng=sample_rng(0, e, 5)) for e in range(3, 8)]
    assert any(o[1] != first[1] or not np.array_equal(np.asarray(o[0]), np.asarray(first[0])) for o in others)


def test_captions_get_photometry_only() -> None:
    image, box = _marked()
    _, boxes = augment(image, [box], aug=Augment(hflip=1, vflip=1), edge=EDGE, rng=sample_rng(0, 0, 0), geometric=False)
    assert boxes == [box]


def test_none_is_identity_and_bad_settings_are_refused() -> None:
    image, box = _marked()
    out, boxes = augment(image, [box], aug=NONE, edge=EDGE, rng=sample_rng(0, 0, 0))
    assert np.array_equal(np.asarray(out), np.asarray(image)) and boxes == [box] and not NONE.active
    with pytest.raises(ValueError, match="hflip is a probability"):
        Augment(hflip=1.5)
    with pytest.raises(ValueError, match="scale must be in"):
        Augment(scale=1.0)


def _strip(*boxes: Box, size: tuple[int, int] = (1024, 64)) -> Image.Image:
    """A black line-scan strip with each box painted white (one grey level per box)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for k, b in enumerate(boxes):
        pixels[round(b.y1):round(b.y2), round(b.x1):round(b.x2)] = 255 - k
    return Image.fromarray(pixels)


def _offset(strip: Image.Image, window: Image.Image) -> int:
    """Where along `strip` its full-height `window` was cut (pixel for pixel: no resampling)."""
    pixels, cut = np.asarray(strip), np.asarray(window)
    width = window.width
    return next(x for x in range(strip.width - width + 1) if np.array_equal(pixels[:, x : x + width], cut))


def test_defect_crop_shows_a_window_holding_a_defect_at_full_resolution() -> None:
    boxes = [Box("knot", 700, 10, 712, 20), Box("drop", 100, 30, 110, 40), Box("nep", 500, 0, 560, 60)]
    strip = _strip(*boxes)
    seen = set()
    for i in range(30):
        out, kept = augment(strip, boxes, aug=CROP, edge=EDGE, rng=sample_rng(0, 0, i))
        assert out.size == (EDGE, EDGE) and kept  # a window of the input, never an empty one
        x0 = _offset(strip, out)
        for box in boxes:  # every box the window meets is kept, clipped, with at least half showing
            clipped, visible = clip_box(box, (x0, 0, x0 + EDGE, EDGE))
            assert (clipped in kept) == (visible > 0) and (visible == 0 or visible >= MIN_VISIBLE)
        assert any(b.width == o.width and b.height == o.height for b in kept for o in boxes)  # one whole
        for b in kept:
            assert 0 <= b.x1 < b.x2 <= EDGE and 0 <= b.y1 < b.y2 <= EDGE
        seen |= {b.label for b in kept}
    assert seen == {"knot", "drop", "nep"}


def test_defect_crop_repeats_per_sample_and_varies_across_epochs() -> None:
    box = Box("knot", 300, 10, 310, 20)
    strip = _strip(box)
    draws = [augment(strip, [box], aug=CROP, edge=EDGE, rng=sample_rng(7, e, 3)) for e in (0, 0, 1, 2, 3)]
    assert np.array_equal(np.asarray(draws[0][0]), np.asarray(draws[1][0])) and draws[0][1] == draws[1][1]
    assert len({d[1][0].x1 for d in draws}) > 1


def test_small_frames_are_left_whole_and_defect_free_ones_get_any_window() -> None:
    image, box = _marked(width=64, height=40)  # no longer than the 64 px input: nothing to crop
    out, boxes = augment(image, [box], aug=CROP, edge=EDGE, rng=sample_rng(0, 0, 0))
    assert out.size == image.size and boxes == [box]
    ramp = np.zeros((64, 1024, 3), np.uint8)  # each column its own colour: x = red + 256 green
    ramp[..., 0], ramp[..., 1] = np.arange(1024) % 256, np.arange(1024) // 256
    ramp = Image.fromarray(ramp)
    windows = [augment(ramp, [], aug=CROP, edge=EDGE, rng=sample_rng(0, 0, i)) for i in range(5)]
    assert all(w.size == (EDGE, EDGE) and boxes == [] for w, boxes in windows)
    assert len({_offset(ramp, w) for w, _ in windows}) > 1  # anywhere along the strip


def test_defect_crop_falls_back_to_the_whole_frame_when_every_window_cuts_a_box() -> None:
    # The stain, larger than the window both ways, never shows half of itself in one, and every
    # window holding the knot cuts the stain: no placement keeps every box, so the whole frame.
    large, short = Box("stain", 200, 20, 400, 230), Box("knot", 290, 10, 300, 18)
    strip = _strip(large, short, size=(1024, 256))
    for i in range(10):
        out, boxes = augment(strip, [large, short], aug=CROP, edge=EDGE, rng=sample_rng(0, 0, i))
        assert out.size == strip.size and boxes == [large, short]


def test_defect_crop_keeps_a_crease_crossing_the_window_end_to_end() -> None:
    # Longer than the window one way only: a window it crosses shows all a window can of it.
    long, short = Box("crease", 200, 20, 400, 30), Box("knot", 290, 40, 300, 50)
    strip = _strip(long, short)
    for i in range(10):
        out, boxes = augment(strip, [long, short], aug=CROP, edge=EDGE, rng=sample_rng(0, 0, i))
        assert out.size == (EDGE, EDGE) and Box("crease", 0, 20, EDGE, 30) in boxes, (i, boxes)


def test_the_scale_jitter_keeps_fractional_boxes_whole():
    import random

    image = Image.new("RGB", (1000, 1000))
    jitter = Augment(**{**NONE.__dict__, "scale": 0.1})
    for seed in range(400):
        rng = random.Random(seed)
        x1, y1 = rng.uniform(0, 990), rng.uniform(0, 990)
        box = Box("d", x1, y1, x1 + rng.uniform(0.1, 9), y1 + rng.uniform(0.1, 9))
        _, (moved,) = augment(image, [box], aug=jitter, rng=random.Random(seed), edge=EDGE)
        sx, sy = (moved.x2 - moved.x1) / (box.x2 - box.x1), (moved.y2 - moved.y1) / (box.y2 - box.y1)
        assert abs(sx - sy) < 0.01, (seed, box, moved)  # both axes scaled alike: no side cut off
    # A sliver at the far side of the frame: the crop once ended short of it, leaving no width.
    augment(image, [Box("d", 950.1, 500, 950.3, 510)], aug=jitter, rng=random.Random(15), edge=EDGE)
