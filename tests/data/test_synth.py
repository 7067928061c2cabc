"""The synthetic loom generator: same seed same bytes, sane boxes, defects shaped like their
names, output that converts without a single problem."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loomlens.data.convert import convert
from loomlens.data.synth import CLASSES, contact_sheet, render_frame, synthesize
from loomlens.data.voc import read_voc

SMALL = (320, 180)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    synthesize(tmp_path / "a", images=4, seed=11, size=SMALL)
    synthesize(tmp_path / "b", images=4, seed=11, size=SMALL)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 8 and a == b
    synthesize(tmp_path / "c", images=4, seed=12, size=SMALL)
    assert _files(tmp_path / "c")["images/frame_00000.jpg"] != a["images/frame_00000.jpg"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, synthesize(root, images=24, seed=3, size=(768, 432))


def test_boxes_are_sane_and_negatives_are_at_least_the_share_asked(made):
    root, records = made
    assert sum(not r.boxes for r in records) >= 0.3 * len(records)
    assert sum(bool(r.boxes) for r in records) >= len(records) // 2
    for record in records:
        assert (record.width, record.height) == (768, 432)
        with Image.open(root / record.image) as im:
            assert im.size == (768, 432)
        for box in record.boxes:
            assert box.label in CLASSES
            assert 0 <= box.x1 < box.x2 <= 768 and 0 <= box.y1 < box.y2 <= 432


def test_defects_are_shaped_like_their_names(made):
    _, records = made
    boxes = [b for r in records for b in r.boxes]
    assert {b.label for b in boxes} == set(CLASSES)
    for box in boxes:
        if box.label == "drop":  # a small spot, about 1.5 % of the frame width
            assert 4 <= box.width <= 0.04 * 768 and 4 <= box.height <= 0.06 * 432
        elif box.label == "broken-weft":  # long and thin, across the weft
            assert box.width >= 3 * box.height and box.width >= 0.04 * 768
        else:  # wrinkle: an elongated band
            assert box.width >= 2 * box.height


def test_boxes_cover_visible_changes(made):
    """A defect box holds pixels darker than the fabric around it (drop, broken-weft) or a
    light-to-dark swing (wrinkle): the box is on something visible, not on plain fabric."""
    root, records = made
    for record in records:
        pixels = np.asarray(Image.open(root / record.image).convert("L"), np.float32)
        for box in record.boxes:
            x1, y1, x2, y2 = int(box.x1), int(box.y1), int(box.x2), int(box.y2)
            inside = pixels[y1:y2, x1:x2]
            assert inside.max() - inside.min() > 40, (record.image, box)


def test_written_annotations_read_back_exactly_and_convert_cleanly(made, tmp_path):
    root, records = made
    read = read_voc(root)
    assert read.problems == []
    assert [(r.image, r.boxes) for r in read.records] == [(r.image, r.boxes) for r in records]
    report = convert(root, tmp_path / "jsonl", tasks=("od", "phrase_grounding"), flip=True)
    assert report.problems == [] and report.images == 24


def test_frames_depend_only_on_seed_and_index():
    image, boxes = render_frame(5, 3, SMALL, negative=False)
    again, same = render_frame(5, 3, SMALL, negative=False)
    assert image.tobytes() == again.tobytes() and boxes == same
    _, none = render_frame(5, 3, SMALL, negative=True)
    assert none == []


@pytest.mark.parametrize("size", [(128, 72), (2560, 1440)])
def test_size_limits(tmp_path, size):
    records = synthesize(tmp_path, images=1, seed=0, size=size, negative_fraction=0)
    assert Image.open(tmp_path / records[0].image).size == size


@pytest.mark.parametrize("kwargs", [{"size": (2561, 1440)}, {"size": (64, 64)}, {"seed": -1},
                                    {"negative_fraction": 1.5}, {"images": -1}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synthesize(tmp_path, **{"images": 1, **kwargs})


def test_contact_sheet(made, tmp_path):
    root, records = made
    contact_sheet(records[:4], root, tmp_path / "sheet.jpg", columns=2, thumb_width=200)
    with Image.open(tmp_path / "sheet.jpg") as sheet:
        assert sheet.size == (2 * 200 + 4, 2 * 113 + 4)
