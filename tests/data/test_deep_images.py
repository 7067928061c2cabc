"""Deep grey images (16-bit PNG and TIFF from line cameras) reach the model as the picture
they hold, not clipped to white by PIL's 8-bit conversion: in training, prediction and tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loomlens.data.convert import convert
from loomlens.data.records import Box, ImageRecord
from loomlens.data.sanitize import to_rgb
from loomlens.data.voc import write_voc
from loomlens.predict.sources import read_image

from .conftest import all_samples


def _ramp(top: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A left-to-right ramp from 0 to `top` (uint16)."""
    return np.tile(np.linspace(0, top, size[0]).round().astype(np.uint16), (size[1], 1))


@pytest.mark.parametrize(("top", "depth"), [(65535, 16), (4095, 12), (1000, 10), (255, 8)])
def test_a_deep_grey_image_is_scaled_from_the_depth_it_fills(top, depth):
    grey = np.asarray(to_rgb(Image.fromarray(_ramp(top))))[..., 0]
    assert grey.max() == round(top * 255 / (2**depth - 1)) and grey.min() == 0
    assert np.all(np.diff(grey[0].astype(int)) >= 0)  # the ramp stays a ramp, not a white wall


def test_float_and_plain_images():
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32)))).max() == 128
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    assert to_rgb(rgb).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_prediction_reads_a_16_bit_png_as_its_picture(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(_ramp(65535)).save(path)
    assert Image.open(path).mode.startswith("I")
    grey = np.asarray(read_image(path))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and 100 < grey.mean() < 155


def test_tiles_and_flips_of_a_16_bit_frame_keep_its_brightness(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    Image.fromarray(_ramp(1500, (128, 64))).save(src / "images" / "a.png")  # 12 bits; its left half 10
    write_voc(ImageRecord("images/a.png", 128, 64, [Box("hole", 80, 10, 100, 30)]), src / "a.xml", src)
    out = tmp_path / "out"
    convert(src, out, flip=True, tile=64, tile_overlap=0, val_fraction=0)
    frame = np.asarray(to_rgb(Image.open(src / "images" / "a.png")))
    tiles = [s["image"] for s in all_samples(out) if s["image"].startswith("images/tiles/a_")]
    assert tiles
    for tile in tiles:
        x0 = int(tile.split("_x")[1].split("_")[0])
        # each tile is the frame's own 8-bit picture there, not rescaled on its own
        assert np.array_equal(np.asarray(to_rgb(Image.open(out / tile))), frame[:, x0 : x0 + 64])
    flipped = np.asarray(to_rgb(Image.open(out / "images" / "flipped_a.png")))
    assert np.array_equal(flipped, frame[:, ::-1])
