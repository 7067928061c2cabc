"""Test-time augmentation: mirrors and their inverses, weighted boxes fusion, the views a run
was trained on, and detection through several views fused into one answer per image."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from loomlens.data.records import Box
from loomlens.infer.detection import detect_with_details
from loomlens.infer.tta import ALL_VIEWS, check_views, choose_views, fuse_boxes, mirrored, unmirrored


def corners(box: Box) -> tuple[float, ...]:
    return tuple(round(c, 3) for c in (box.x1, box.y1, box.x2, box.y2))  # batching moves scores by ~1e-6


@pytest.mark.parametrize("view", ALL_VIEWS)
def test_a_box_around_pixels_in_a_mirrored_copy_comes_back_around_them(view):
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[20:30, 100:140] = 255  # a 40x10 defect near the top right
    copy = np.asarray(mirrored(Image.fromarray(frame), view))
    ys, xs = np.nonzero(copy[..., 0])
    found = Box("spot", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert corners(unmirrored(found, view, 160, 90)) == (100, 20, 140, 30)


def test_boxes_the_views_agree_on_are_averaged_by_score():
    a = Box("drop", 10, 10, 20, 20, 0.8)
    b = Box("drop", 12, 10, 22, 20, 0.2)  # the same defect, 2 px to the right
    [fused] = fuse_boxes([[a], [b]])
    assert corners(fused) == (10.4, 10, 20.4, 20) and fused.score == pytest.approx(0.5)


def test_a_box_one_view_of_four_saw_keeps_a_quarter_of_its_score():
    lone = Box("knot", 50, 50, 60, 60, 0.8)
    both = [Box("drop", 10, 10, 20, 20, 0.6)]
    fused = fuse_boxes([[lone, *both], both, both, both])
    assert [(f.label, round(f.score, 6)) for f in fused] == [("drop", 0.6), ("knot", 0.2)]
    assert corners(fused[1]) == corners(lone)


def test_other_labels_and_distant_boxes_are_not_fused():
    drop = Box("drop", 10, 10, 20, 20, 0.9)
    wrinkle = Box("wrinkle", 10, 10, 20, 20, 0.9)
    apart = Box("drop", 15, 15, 25, 25, 0.9)  # IoU 25 / 175 with `drop`
    assert len(fuse_boxes([[drop, wrinkle], [apart]])) == 3


def test_a_box_mostly_inside_a_better_one_of_its_label_is_the_same_defect():
    """Two views' boxes on a small defect can overlap too little to cluster (IoU 0.24 here):
    the defect still comes out as one box, the better one."""
    whole = Box("knot", 0, 0, 10, 10, 0.9)
    inner = Box("knot", 0, 0, 3, 8, 0.8)
    other = Box("stain", 0, 0, 3, 8, 0.8)
    fused = fuse_boxes([[whole, other], [inner]])
    assert [(b.label, corners(b), round(b.score, 6)) for b in fused] == [("knot", corners(whole), 0.45),
                                                                          ("stain", corners(other), 0.4)]


def test_views_by_mode():
    assert choose_views("auto", ("", "h")) == ("", "h")
    assert choose_views("auto", ()) == ("",)
    assert choose_views("on", ("",)) == ALL_VIEWS
    assert choose_views("off", ALL_VIEWS) == ("",)
    with pytest.raises(ValueError, match="--tta must be one of auto, on, off"):
        choose_views("flips", ())
    assert check_views(["", "h"]) == ("", "h")
    for bad in ((), ("x",), ("", "")):
        with pytest.raises(ValueError, match="views must be"):
            check_views(bad)


@pytest.fixture(scope="module")
def shapes():
    """A picture the embedded tiny model finds two boxes in."""
    im = Image.new("RGB", (256, 256), (120, 120, 120))
    draw = ImageDraw.Draw(im)
    draw.rectangle((40, 60, 120, 140), fill=(250, 250, 250))
    draw.ellipse((150, 30, 220, 90), fill=(10, 10, 10))
    return im


def test_detection_through_a_mirror_is_the_mirrored_detection_brought_back(tiny, shapes):
    model, processor = tiny
    [direct] = detect_with_details(model, processor, [mirrored(shapes, "hv")])
    [through] = detect_with_details(model, processor, [shapes], views=("hv",))
    assert direct.boxes, "the tiny model should find the shapes"
    expected = [unmirrored(b, "hv", 256, 256) for b in direct.boxes]
    assert sorted(map(corners, through.boxes)) == sorted(map(corners, expected))


def test_several_views_give_one_fused_detection_per_image(tiny, shapes):
    model, processor = tiny
    images = [shapes, mirrored(shapes, "h")]
    alone = [detect_with_details(model, processor, [im], views=(view,))[0] for view in ALL_VIEWS for im in images]
    fused = detect_with_details(model, processor, iter(images), views=ALL_VIEWS, batch_size=3)  # read once
    assert len(fused) == 2
    for i, detection in enumerate(fused):
        seen = alone[i::2]  # this image through each view
        assert [corners(b) for b in detection.boxes] == [corners(b) for b in fuse_boxes([d.boxes for d in seen])]
        mean = sum(d.generation.answer_probability for d in seen) / len(seen)
        assert detection.generation.answer_probability == pytest.approx(mean, abs=1e-5)
        assert detection.dropped == sum(d.dropped for d in seen)


def test_the_mirrors_look_only_where_the_first_look_may_see_a_defect(tiny, shapes, monkeypatch):
    from loomlens.infer import detection, tta

    model, processor = tiny
    [once] = detect_with_details(model, processor, [shapes])
    looks, real = [], detection.generate
    monkeypatch.setattr(detection, "generate", lambda m, p, images, *a: looks.append(len(images)) or real(m, p, images, *a))
    sure = once.generation.answer_probability
    monkeypatch.setattr(tta, "MIRROR_GATE", sure + 1e-3)  # less sure than the gate: looked at once
    [gated] = detect_with_details(model, processor, [shapes], views=ALL_VIEWS)
    assert sum(looks) == 1 and [corners(b) for b in gated.boxes] == [corners(b) for b in once.boxes]
    looks.clear()
    monkeypatch.setattr(tta, "MIRROR_GATE", sure - 1e-3)  # surer: through all four views, fused
    [fused] = detect_with_details(model, processor, [shapes], views=ALL_VIEWS)
    assert sum(looks) == 4 and fused.generation.answer_probability != pytest.approx(sure, abs=1e-9)


def test_after_batch_comes_after_every_batch_of_looks_mirrored_ones_too(tiny, shapes, monkeypatch):
    from loomlens.infer import detection, tta

    model, processor = tiny
    monkeypatch.setattr(tta, "MIRROR_GATE", 0.0)  # every picture is looked at through all four views
    looks, calls, real = [], [], detection.generate
    monkeypatch.setattr(detection, "generate", lambda m, p, images, *a: looks.append(len(images)) or real(m, p, images, *a))
    detect_with_details(model, processor, [shapes] * 3, views=ALL_VIEWS, batch_size=2, streams=1,
                        after_batch=lambda: calls.append(sum(looks)))
    # 3 first looks in batches of 2 (2 + 1), then 9 mirrored ones (2 + 2 + 2 + 2 + 1)
    assert looks == [2, 1, 2, 2, 2, 2, 1] and calls == [2, 3, 5, 7, 9, 11, 12]
