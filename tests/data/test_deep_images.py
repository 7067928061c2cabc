"""Deep grey images (16-bit PNG and TIFF from line cameras) reach the model as the picture
they hold, not clipped to white by PIL's 8-bit conversion: in training, prediction and tiles."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loomlens.data.convert import convert
from loomlens.data.records import Box, ImageRecord
from loomlens.data.sanitize import read_rgb, to_rgb
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


def _png_48(path, pixels: np.ndarray) -> None:
    """Write `pixels` (H, W, 3 uint16) as a 48-bit colour PNG (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _colour_ramp(top: int) -> np.ndarray:
    """The grey `_ramp` to `top` in red, half of it in green, none in blue."""
    grey = _ramp(top)
    return np.stack([grey, grey // 2, np.zeros_like(grey)], axis=-1)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_12_bit_colour_frame_in_48_bits_is_scaled_as_a_grey_one(tmp_path, suffix):
    pixels, path = _colour_ramp(4095), tmp_path / f"frame{suffix}"
    if suffix == ".png":
        _png_48(path, pixels)
    else:
        cv2 = pytest.importorskip("cv2")
        cv2.imwrite(str(path), pixels[..., ::-1])  # OpenCV writes BGR
    grey = np.asarray(to_rgb(Image.fromarray(_ramp(4095))))[..., 0]
    for rgb in (read_rgb(path), read_image(path)):
        values = np.asarray(rgb)
        assert rgb.mode == "RGB" and np.array_equal(values[..., 0], grey)  # not PIL's top byte: 15 at most
        assert np.abs(values[..., 1].astype(int) - grey // 2).max() <= 1 and values[..., 2].max() == 0


def test_tiles_and_flips_of_a_48_bit_frame_keep_its_brightness(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    _png_48(src / "images" / "a.png", np.tile(_colour_ramp(4095), (1, 2, 1)))  # 128 x 48
    write_voc(ImageRecord("images/a.png", 128, 48, [Box("hole", 80, 10, 100, 30)]), src / "a.xml", src)
    out = tmp_path / "out"
    convert(src, out, flip=True, tile=64, tile_overlap=0, val_fraction=0)
    frame = np.asarray(read_rgb(src / "images" / "a.png"))
    tiles = [s["image"] for s in all_samples(out) if s["image"].startswith("images/tiles/a_")]
    assert tiles
    for tile in tiles:
        x0 = int(tile.split("_x")[1].split("_")[0])
        assert np.array_equal(np.asarray(read_rgb(out / tile)), frame[:, x0 : x0 + 64])
    assert np.array_equal(np.asarray(read_rgb(out / "images" / "flipped_a.png")), frame[:, ::-1])


def test_prediction_reads_a_48_bit_frame_whole_from_its_path_or_undecoded_image_only(tmp_path):
    """What `Predictor.predict` tells its callers: a 48-bit colour frame keeps its low bytes
    from its path or from `Image.open`'s result not yet decoded; once PIL has decoded it only
    the top bytes are left (a 12-bit frame: 15 at most), which nothing after can undo. A deep
    grey frame keeps its depth when decoded."""
    from loomlens.predict.predictor import _open  # how predict reads each image it is given

    path, grey = tmp_path / "frame.png", tmp_path / "grey.png"
    _png_48(path, _colour_ramp(4095))
    whole = np.asarray(_open(path))
    assert whole.max() == 255 and np.array_equal(np.asarray(_open(Image.open(path))), whole)
    decoded = Image.open(path)
    decoded.load()
    assert np.asarray(_open(decoded)).max() == 15
    Image.fromarray(_ramp(4095)).save(grey)
    loaded = Image.open(grey)
    loaded.load()
    assert np.array_equal(np.asarray(_open(loaded)), np.asarray(_open(grey)))
