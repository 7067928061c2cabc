"""Hostile files: decompression bombs, damaged images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_colour_png(width: int, height: int) -> bytes:
    """A whole, valid greyscale PNG of one colour: tiny on disk, `width * height` bytes once
    decoded (streamed through zlib, so making it never holds the pixels)."""
    packer = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bomb_png(tmp_path_factory) -> Path:
    """The file that aborted convert: a 30000x30000 one-colour PNG, under a megabyte."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(one_colour_png(30000, 30000))
    return path


def voc_dataset(root: Path, names: list[str]) -> Path:
    """A VOC dataset of good 64x48 JPEGs, one box each."""
    for name in names:
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (90, 100, 110)).save(root / "images" / name)
        write_voc(ImageRecord(f"images/{name}", 64, 48, [Box("drop", 5, 5, 20, 20)]),
                  root / "annotations" / f"{Path(name).stem}.xml", root)
    return root
