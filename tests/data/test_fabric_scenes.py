"""Fabric scenes: same seed same pixels, sane boxes of every defect class, words the tiny
tokenizer knows, and labels that serialise as the pretraining tasks need."""

from __future__ import annotations

import numpy as np
import pytest

from loomlens.data.fabric_scenes import CHROMATIC, FABRIC_CLASSES, MIN_SIDE, make_fabric_scene
from loomlens.data.florence_text import boxes_to_text, parse_text

SIZE = 128


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(5)
    return [make_fabric_scene(rng, SIZE, max_objects=4) for _ in range(60)]


def test_same_seed_gives_the_same_scene() -> None:
    a = make_fabric_scene(np.random.default_rng([3, 1]), SIZE)
    b = make_fabric_scene(np.random.default_rng([3, 1]), SIZE)
    c = make_fabric_scene(np.random.default_rng([3, 2]), SIZE)
    assert a.image.tobytes() == b.image.tobytes() and a.boxes == b.boxes and a.colours == b.colours
    assert a.image.tobytes() != c.image.tobytes()


def test_boxes_are_inside_at_least_three_pixels_and_apart(scenes) -> None:
    for scene in scenes:
        assert scene.image.size == (SIZE, SIZE) and scene.image.mode == "RGB"
        assert len(scene.boxes) == len(scene.colours) <= 4
        for box in scene.boxes:
            assert 0 <= box.x1 < box.x2 <= SIZE and 0 <= box.y1 < box.y2 <= SIZE
            assert box.width >= MIN_SIDE - 1e-6 and box.height >= MIN_SIDE - 1e-6
        for i, a in enumerate(scene.boxes):
            for b in scene.boxes[i + 1 :]:
                assert a.x2 <= b.x1 or b.x2 <= a.x1 or a.y2 <= b.y1 or b.y2 <= a.y1


def test_every_defect_class_and_thin_ones_occur(scenes) -> None:
    boxes = [b for s in scenes for b in s.boxes]
    assert {b.label for b in boxes} == set(FABRIC_CLASSES)
    assert any(min(b.width, b.height) < 4 for b in boxes)  # thin defects, down to 3 px
    assert any(not s.boxes for s in scenes)  # defect-free cloth too
    assert {c for s in scenes for c in s.colours} <= {*CHROMATIC, "dark", "light"}


def test_labels_serialise_and_parse_back(scenes) -> None:
    for scene in scenes:
        text = boxes_to_text(scene.boxes, SIZE, SIZE)
        parsed, dropped = parse_text(text, SIZE, SIZE)
        assert dropped == 0 and sorted(b.label for b in parsed) == sorted(b.label for b in scene.boxes)

