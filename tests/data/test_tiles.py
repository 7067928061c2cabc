"""tile_record: clipping, min_visible, ambiguous windows, negatives; save_tiles on disk."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from PIL import Image

from loomlens.data.records import Box, ImageRecord
from loomlens.data.tiles import auto_tile, hidden_when_tiled, save_tiles, tile_record, tile_windows

# 512x256 with 256 px tiles at 25 % overlap: windows start at x = 0, 128, 256 (one row).
W0, W1, W2 = (0, 0, 256, 256), (128, 0, 384, 256), (256, 0, 512, 256)
CROSSING = Box("drop", 200, 10, 280, 20)  # 70 % in W0, whole in W1, 30 % in W2


def _frame(*boxes: Box, size: tuple[int, int] = (512, 256), image: str = "images/a.png") -> ImageRecord:
    return ImageRecord(image, *size, list(boxes))


def _by_window(record: ImageRecord, **kwargs) -> dict:
    return {t.window: list(t.boxes) for t in tile_record(record, 256, 0.25, negatives=0, **kwargs)}


def test_a_crossing_box_is_clipped_kept_or_makes_the_window_ambiguous():
    assert tile_windows(512, 256, 256) == [W0, W1, W2]
    assert _by_window(_frame(CROSSING)) == {
        W0: [Box("drop", 200, 10, 256, 20)],  # clipped to the window, in its pixels
        W1: [Box("drop", 72, 10, 152, 20)],  # whole
    }  # W2 shows 30 % < min_visible: ambiguous, skipped
    assert _by_window(_frame(CROSSING), min_visible=0.25)[W2] == [Box("drop", 0, 10, 24, 20)]
    assert list(_by_window(_frame(CROSSING), min_visible=0.8)) == [W1]


def test_an_ambiguous_window_is_skipped_even_with_a_whole_box_in_it():
    inside_w2_only = Box("wrinkle", 400, 100, 420, 120)
    tiles = _by_window(_frame(CROSSING, inside_w2_only))
    assert W2 not in tiles  # not a positive missing half a drop, nor a negative
    assert tiles[W1] == [Box("drop", 72, 10, 152, 20)]


def test_a_thread_crossing_a_tile_keeps_the_tile_and_a_larger_stain_does_not():
    # 500 px long, 4 px wide: each tile it crosses end to end shows all a tile can of it.
    thread = Box("broken-end", 6, 100, 506, 104)
    assert _by_window(_frame(thread)) == {
        W0: [Box("broken-end", 6, 100, 256, 104)],  # 250 of the 256 a tile can show
        W1: [Box("broken-end", 0, 100, 256, 104)],
        W2: [Box("broken-end", 0, 100, 250, 104)],
    }
    short_end = Box("broken-end", 6, 100, 306, 104)  # shows 50 of 256 px in W2: ambiguous
    assert list(_by_window(_frame(short_end))) == [W0, W1]
    # Larger than a tile both ways, a stain counts by area: under half in every window.
    stain = Box("oil-spot", 0, 0, 500, 300)
    assert _by_window(_frame(stain, size=(512, 512))) == {}


def test_a_box_inside_the_overlap_lies_whole_in_some_tile():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.uniform(1, 64), rng.uniform(1, 64)  # up to the overlap, a quarter tile
        x, y = rng.uniform(0, 1000 - w), rng.uniform(0, 700 - h)
        box = Box("drop", x, y, x + w, y + h)
        tiles = tile_record(_frame(box, size=(1000, 700)), 256, 0.25, negatives=0)
        assert any(t.boxes == (Box("drop", x - t.window[0], y - t.window[1], x + w - t.window[0],
                                   y + h - t.window[1]),) for t in tiles), box


def test_negatives_are_bounded_by_the_positives_and_deterministic():
    frame = _frame(Box("drop", 1000, 700, 1010, 710), size=(2560, 1440))
    tiles = tile_record(frame, 256, seed=3)
    positives = [t for t in tiles if t.boxes]
    negatives = [t for t in tiles if not t.boxes]
    assert positives and len(negatives) == len(positives)
    assert len([t for t in tile_record(frame, 256, negatives=2.5, seed=3) if not t.boxes]) == \
        int(2.5 * len(positives))
    assert tile_record(frame, 256, seed=3) == tiles  # same seed, same tiles
    assert any(tile_record(frame, 256, seed=s) != tiles for s in range(4, 8))
    windows = [t.window for t in tiles]
    assert windows == sorted(windows, key=lambda w: (w[1], w[0]))  # window order


def test_a_defect_free_frame_gives_floor_of_negatives_tiles():
    frame = _frame(size=(2560, 1440))
    assert len(tile_record(frame, 256)) == 1
    assert len(tile_record(frame, 256, negatives=3)) == 3
    assert tile_record(frame, 256, negatives=0) == []


def test_frames_no_larger_than_a_tile_give_no_tiles():
    assert tile_record(_frame(Box("drop", 1, 1, 5, 5), size=(256, 200)), 256) == []
    assert len(tile_record(_frame(Box("drop", 1, 1, 5, 5), size=(300, 200)), 256)) == 2  # wider only


def test_bad_arguments_raise_value_error():
    for kwargs in ({"min_visible": 0}, {"min_visible": 1.5}, {"negatives": -1}, {"overlap": 1.0}):
        with pytest.raises(ValueError):
            tile_record(_frame(), 256, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        tile_windows(100, 100, 0)


def test_save_tiles_crops_in_the_frames_format_and_keeps_fresh_ones(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frame.png")
    a, b = tmp_path / "tiles" / "a.png", tmp_path / "tiles" / "b.png"
    save_tiles(tmp_path / "frame.png", {a: (0, 0, 32, 32), b: (28, 8, 60, 40)})
    assert np.array_equal(np.asarray(Image.open(b)), pixels[8:40, 28:60])
    assert Image.open(a).format == "PNG"
    assert a.stat().st_mtime_ns == (tmp_path / "frame.png").stat().st_mtime_ns  # stamped with its frame's time
    Image.new("RGB", (32, 32)).save(a)  # a marker a re-run must leave alone, the stamp put back
    os.utime(a, ns=(0, (tmp_path / "frame.png").stat().st_mtime_ns))
    save_tiles(tmp_path / "frame.png", {a: (0, 0, 32, 32)})
    assert not np.asarray(Image.open(a)).any()
    Image.fromarray(255 - pixels).save(tmp_path / "frame.png")  # a new frame under an older time, as unzip leaves it
    os.utime(tmp_path / "frame.png", ns=(0, a.stat().st_mtime_ns - 10**10))
    save_tiles(tmp_path / "frame.png", {a: (0, 0, 32, 32)})
    assert np.array_equal(np.asarray(Image.open(a)), 255 - pixels[:32, :32])
    save_tiles(tmp_path / "frame.png", {a: (0, 0, 16, 16)})  # same name, another tile size
    assert Image.open(a).size == (16, 16)
    assert sorted(p.name for p in a.parent.iterdir()) == ["a.png", "b.png"]  # no temporaries


def _frames(size: tuple[int, int], box: tuple[float, float], count: int = 4) -> list[ImageRecord]:
    """`count` frames of `size`, each with one `box` (width, height) defect."""
    w, h = box
    return [ImageRecord(f"images/{i}.png", *size, [Box("hole", 10, 10, 10 + w, 10 + h)]) for i in range(count)]


def test_auto_tile_leaves_frames_whose_defects_survive_the_squeeze_whole():
    assert auto_tile(_frames((2560, 1440), (300, 200))) is None  # 30 px at the input: seen
    assert auto_tile(_frames((256, 144), (5, 5))) is None  # no larger than the input: nothing to tile
    assert auto_tile(_frames((2560, 1440), (2, 2))) is None  # under 4 px even at full size: tiles keep nothing
    assert auto_tile(_frames((2560, 1440), (20, 20), count=2) + _frames((2560, 1440), (300, 200), count=7)) is None
    assert auto_tile([ImageRecord("images/good.png", 4096, 256)]) is None  # no boxes at all


def test_auto_tile_picks_the_largest_tile_that_keeps_the_defects_in_sight():
    # 20 px defects in 2560x1440 frames: 2 px squeezed whole, 10 px in 512 px tiles, 5 in 1024.
    assert auto_tile(_frames((2560, 1440), (20, 20))) == 512
    assert hidden_when_tiled(_frames((2560, 1440), (20, 20))) == 4
    assert hidden_when_tiled(_frames((2560, 1440), (20, 20)), tile=512, px=8) == 0
    # 36 px: 3.6 px squeezed whole, 9 px in 1024 px tiles, 4.5 px in 2048 px ones.
    assert auto_tile(_frames((2560, 1440), (36, 36))) == 1024
    # A line-scan strip with 6 px defects: only the input's own edge keeps them over 4 px.
    assert auto_tile(_frames((4096, 256), (6, 6))) == 256
    # The tile is chosen for the input it is given: base's 768 px keeps 40 px defects whole
    # (12 px), and sees 20 px ones at 6 px whole, 10 px in 1536 px tiles.
    assert auto_tile(_frames((2560, 1440), (40, 40)), edge=768) is None
    assert auto_tile(_frames((2560, 1440), (20, 20)), edge=768) == 1536
