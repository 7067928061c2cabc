"""Copy-paste of defects: the patch, its mask, its colours, where it lands and which class."""

import random

import numpy as np
from PIL import Image, ImageDraw

from loomlens.data.paste import by_class, cut_patch, draw_donor, feather, matched, paste
from loomlens.data.records import Box


def test_a_patch_is_the_box_with_a_rim_cut_to_the_picture():
    picture = Image.new("RGB", (100, 60))
    patch, inside = cut_patch(picture, Box("hole", 40, 20, 60, 40))
    assert patch.size == (31, 31)  # 20 px + a 5 px rim each side (+1 for the fractional edge)
    assert (inside.x1, inside.y1, inside.x2, inside.y2) == (5, 5, 25, 25)
    patch, inside = cut_patch(picture, Box("hole", 0, 50, 8, 60))  # at the corner: no rim outside
    assert (inside.x1, inside.y1) == (0, 3) and patch.size == (12, 13)
    assert inside.x2 <= patch.width and inside.y2 <= patch.height
    patch, inside = cut_patch(picture, Box("hole", -2, 50, 8, 62))  # a box past the picture: cut to it
    assert (inside.x1, inside.y2) == (0, patch.height)


def test_the_mask_is_opaque_on_the_defect_and_clear_at_the_patch_edge():
    mask = np.asarray(feather(Image.new("RGB", (30, 20)), Box("hole", 10, 5, 20, 15)))
    assert mask.shape == (20, 30)
    assert (mask[5:15, 10:20] == 255).all()
    assert mask[0, 0] < 20 and mask[19, 29] < 20 and mask[10, 0] < 40
    assert (np.diff(mask[10, :10].astype(int)) >= 0).all()  # rising towards the defect


def test_the_patch_takes_the_colours_of_the_cloth_it_lands_on():
    rng = np.random.default_rng(0)
    dark = Image.fromarray((rng.normal(40, 5, (16, 16, 3))).clip(0, 255).astype(np.uint8), "RGB")
    light = Image.fromarray((rng.normal(200, 10, (16, 16, 3))).clip(0, 255).astype(np.uint8), "RGB")
    moved = np.asarray(matched(dark, light), dtype=np.float32)
    assert abs(moved.mean() - 200) < 2 and abs(moved.std() - 10) < 2


def test_a_paste_lands_where_it_covers_no_box_and_adds_only_its_box():
    image = Image.new("RGB", (120, 80), (100, 100, 100))
    held = [Box("drop", 0, 0, 60, 80)]  # the left half is taken
    patch = Image.new("RGB", (20, 20), (100, 100, 100))
    ImageDraw.Draw(patch).rectangle((5, 5, 14, 14), fill=(0, 0, 0))
    for seed in range(10):
        out, boxes = paste(image, held, patch, Box("hole", 5, 5, 15, 15), random.Random(seed))
        assert boxes[:-1] == held and boxes[-1].label == "hole"
        new = boxes[-1]
        assert new.x1 - 5 >= 60 and new.x2 + 5 <= 120 and new.width == 10  # the whole patch right of the box
        pixels = np.asarray(out)
        assert (pixels[:, :60] == 100).all()  # the held box untouched
        assert pixels[int(new.y1) + 2, int(new.x1) + 2].max() < 80  # the defect is there, darker than the cloth
    assert np.asarray(image).max() == 100  # the input picture is not changed


def test_no_room_leaves_the_frame_as_it_is():
    image = Image.new("RGB", (40, 40))
    patch, box = Image.new("RGB", (20, 20)), Box("hole", 5, 5, 15, 15)
    held = [Box("drop", 0, 0, 40, 40)]
    assert paste(image, held, patch, box, random.Random(0)) == (image, held)
    assert paste(image, [], Image.new("RGB", (50, 20)), box, random.Random(0)) == (image, [])  # too wide


def test_a_rare_class_is_drawn_as_often_as_a_common_one():
    samples = [[Box("drop", 0, 0, 1, 1)] for _ in range(99)] + [[Box("hole", 0, 0, 1, 1)], None, []]
    donors = by_class(samples)
    assert {k: len(v) for k, v in donors.items()} == {"drop": 99, "hole": 1}
    assert donors["hole"] == [(99, samples[99][0])]
    rng = random.Random(0)
    holes = sum(draw_donor(donors, rng)[1].label == "hole" for _ in range(2000))
    assert 900 < holes < 1100


def test_a_box_scales_with_its_image():
    assert Box("hole", 10, 20, 30, 40, score=0.5).scaled(0.5, 2) == Box("hole", 5, 40, 15, 80, score=0.5)
