"""Online augmentation moves boxes with the pixels, keeps every defect whole, and repeats."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loomlens.data.augment import NONE, Augment, augment, sample_rng
from loomlens.data.records import Box


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
    out, (moved,) = augment(image, [box], aug=only, rng=sample_rng(0, 0, 0))
    assert _white_bounds(out) == pytest.approx((moved.x1, moved.y1, moved.x2, moved.y2))
    if which == "rot90":
        assert out.size == (40, 64)


def test_crop_jitter_keeps_every_box_whole_and_in_step_with_pixels() -> None:
    image, box = _marked()
    jitter = Augment(hflip=0, vflip=0, rot90=0, brightness=0, contrast=0, gamma=0, grey=0, scale=0.5)
    changed = 0
    for i in range(40):
        out, (moved,) = augment(image, [box], aug=jitter, rng=sample_rng(1, 0, i))
        assert out.size == image.size
        assert 0 <= moved.x1 < moved.x2 <= 64 and 0 <= moved.y1 < moved.y2 <= 40
        # Bilinear resampling blurs the edges by a pixel at most.
        assert _white_bounds(out) == pytest.approx((moved.x1, moved.y1, moved.x2, moved.y2), abs=1.5)
        assert moved.width >= box.width - 1e-6  # a crop only zooms in: never smaller, never cut
        changed += moved != box
    assert changed > 30


def test_photometry_leaves_boxes_and_size_alone() -> None:
    image, box = _marked()
    look = Augment(hflip=0, vflip=0, rot90=0, brightness=0.5, contrast=0.5, gamma=0.5, grey=1.0, scale=0)
    out, boxes = augment(image, [box], aug=look, rng=sample_rng(0, 0, 3))
    assert boxes == [box] and out.size == image.size and out.mode == "RGB"
    r, g, b = (np.asarray(out)[..., k] for k in range(3))
    assert np.array_equal(r, g) and np.array_equal(g, b)  # grey, kept as RGB


def test_same_draw_same_picture_and_different_epochs_differ() -> None:
    image, box = _marked()
    first = augment(image, [box], aug=Augment(), rng=sample_rng(0, 2, 5))
    again = augment(image, [box], aug=Augment(), rng=sample_rng(0, 2, 5))
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and first[1] == again[1]
    others = [augment(image, [box], aug=Augment(), rng=sample_rng(0, e, 5)) for e in range(3, 8)]
    assert any(o[1] != first[1] or not np.array_equal(np.asarray(o[0]), np.asarray(first[0])) for o in others)


def test_captions_get_photometry_only() -> None:
    image, box = _marked()
    _, boxes = augment(image, [box], aug=Augment(hflip=1, vflip=1), rng=sample_rng(0, 0, 0), geometric=False)
    assert boxes == [box]


def test_none_is_identity_and_bad_settings_are_refused() -> None:
    image, box = _marked()
    out, boxes = augment(image, [box], aug=NONE, rng=sample_rng(0, 0, 0))
    assert np.array_equal(np.asarray(out), np.asarray(image)) and boxes == [box] and not NONE.active
    with pytest.raises(ValueError, match="hflip is a probability"):
        Augment(hflip=1.5)
    with pytest.raises(ValueError, match="scale must be in"):
        Augment(scale=1.0)
