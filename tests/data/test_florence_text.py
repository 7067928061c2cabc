"""The Florence-2 text format: the grid, boxes <-> text, the parser's robustness, labels."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loomlens.data.florence_text import (
    LabelError,
    boxes_to_text,
    dequantize,
    parse_polygons,
    parse_text,
    quantize,
    validate_label,
)
from loomlens.data.records import Box

sizes = st.integers(min_value=1, max_value=8000)


@given(size=sizes, fraction=st.floats(min_value=0, max_value=1))
def test_dequantize_of_quantize_is_within_half_a_bin(size, fraction):
    v = fraction * size
    q = quantize(v, size)
    assert 0 <= q <= 999
    assert abs(dequantize(q, size) - v) <= 0.5 * size / 1000 + 1e-9


@given(size=sizes, q=st.integers(0, 999))
def test_quantize_of_dequantize_is_identity(size, q):
    assert quantize(dequantize(q, size), size) == q


@given(size=st.integers(16, 8000), fraction=st.floats(0, 1), to=st.sampled_from([64, 256, 384, 768]))
def test_a_box_carried_to_another_size_keeps_its_bin(size, fraction, to):
    # An integer coordinate's exact bin, also once multiplied onto the model's input (about 1
    # in 1000 landed a float hair under a bin edge and lost a bin before the slack).
    x = round(fraction * size)
    assert quantize(x, size) == quantize(x * (to / size), to) == min(999, x * 1000 // size)


def test_far_edge_encodes_999_never_1000():
    assert quantize(2560, 2560) == 999
    assert quantize(2560.0 - 1e-9, 2560) == 999
    assert quantize(-3, 100) == 0 and quantize(150, 100) == 999
    text = boxes_to_text([Box("drop", 2500, 1400, 2560, 1440)], 2560, 1440)
    assert text == "drop<loc_976><loc_972><loc_999><loc_999>"


def test_quantize_rejects_a_bad_size():
    with pytest.raises(ValueError):
        quantize(1, 0)


def test_reading_order_is_y1_then_x1_of_the_quantised_box():
    boxes = [Box("c", 50, 50, 60, 60), Box("b", 80, 10, 90, 20), Box("a", 10, 10, 20, 20)]
    assert boxes_to_text(boxes, 100, 100) == (
        "a<loc_100><loc_100><loc_200><loc_200>b<loc_800><loc_100><loc_900><loc_200>"
        "c<loc_500><loc_500><loc_600><loc_600>"
    )
    assert boxes_to_text(list(reversed(boxes)), 100, 100) == boxes_to_text(boxes, 100, 100)


@pytest.mark.parametrize("name", ["wrinkle", "drop", "broken-weft", "Broken Weft", "hole 2", "Ölfleck", "défaut", "破损"])
def test_every_class_name_round_trips(name):
    text = boxes_to_text([Box(name, 10, 20, 30, 40), Box(name, 50, 60, 70, 80)], 100, 100)
    boxes, dropped = parse_text(text, 100, 100)
    assert dropped == 0
    assert [b.label for b in boxes] == [name, name]
    assert validate_label(name) == name


@pytest.mark.parametrize("bad", ["", "   ", "a<b", "x>y", "tab\there", "<OD>", "zero\u200bwidth", "bell\x07"])
def test_labels_that_cannot_round_trip_are_rejected_clearly(bad):
    with pytest.raises(LabelError, match="class name"):
        validate_label(bad)
    with pytest.raises(LabelError):
        boxes_to_text([Box(bad, 1, 1, 2, 2)], 10, 10)


def test_validate_label_strips_surrounding_space():
    assert validate_label("  drop \n") == "drop"


def test_validate_label_joins_the_two_spellings_of_an_accent():
    # macOS writes "Ö" as "O" + a combining diaeresis; both name one class.
    assert validate_label("O\u0308lfleck") == validate_label("\u00d6lfleck") == "\u00d6lfleck"


def test_parser_ignores_florence_noise_and_keeps_labels_whole():
    text = "<s><OD>broken-weft<loc_1><loc_2><loc_30><loc_4>Broken Weft<loc_5><loc_6><loc_7><loc_8></s><pad><pad>"
    boxes, dropped = parse_text(text, 1000, 1000)
    assert dropped == 0
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in boxes] == [
        ("broken-weft", 1.5, 2.5, 30.5, 4.5), ("Broken Weft", 5.5, 6.5, 7.5, 8.5)]


def test_parser_drops_and_counts_malformed_parts():
    text = (
        "drop<loc_1><loc_2><loc_3>"  # three locs
        "<loc_4><loc_5><loc_6><loc_7>"  # no label (the text before is part of the run above)
        "wrinkle<loc_1><loc_2><loc_3><loc_1000>"  # out of range
        "hole 2<loc_10><loc_10><loc_20><loc_20>"  # good
        "tail"  # a label with no box
    )
    boxes, dropped = parse_text(text, 1000, 1000)
    assert [b.label for b in boxes] == ["drop", "hole 2"]  # drop's run: 7 locs = 1 box + 3 left
    assert dropped == 3


def test_empty_label_is_dropped_unless_a_default_is_given():
    text = "<loc_1><loc_2><loc_3><loc_4>"
    assert parse_text(text, 100, 100) == ([], 1)
    boxes, dropped = parse_text(text, 100, 100, default_label="broken-weft")
    assert dropped == 0 and boxes[0].label == "broken-weft"


def test_several_boxes_after_one_label_share_it():
    boxes, dropped = parse_text("drop<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>", 1000, 1000)
    assert dropped == 0 and [b.label for b in boxes] == ["drop", "drop"]


def test_one_bin_boxes_still_make_valid_boxes():
    boxes, dropped = parse_text("b<loc_5><loc_5><loc_5><loc_5>", 1000, 1000)
    assert dropped == 0 and (boxes[0].x1, boxes[0].x2) == (5.0, 6.0)  # the bin's edges, not zero width


def test_reversed_boxes_are_malformed_dropped_and_counted():
    # The class grammar never writes one and the processor's parse leaves it reversed (it
    # matches nothing); swapping it into a box made a false positive of every one on the demo.
    text = "a<loc_30><loc_40><loc_10><loc_20>b<loc_10><loc_40><loc_30><loc_20>c<loc_10><loc_20><loc_30><loc_40>"
    boxes, dropped = parse_text(text, 1000, 1000)
    assert [b.label for b in boxes] == ["c"] and dropped == 2
    assert (boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2) == (10.5, 20.5, 30.5, 40.5)


def test_polygons():
    text = "broken-weft<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><sep><loc_7><loc_8><loc_9><loc_10><loc_11><loc_12>"
    polygons, dropped = parse_polygons(text, 1000, 1000)
    assert dropped == 0
    assert [p.label for p in polygons] == ["broken-weft", "broken-weft"]
    assert polygons[0].points == ((1.5, 2.5), (3.5, 4.5), (5.5, 6.5))
    odd, dropped = parse_polygons("a<loc_1><loc_2><loc_3><loc_4><loc_5>b<loc_1><loc_2><loc_3><loc_4>", 10, 10)
    assert odd == [] and dropped == 2
    phrase, _ = parse_polygons("<poly><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6></poly>", 10, 10, "drop")
    assert phrase[0].label == "drop"


_fragments = st.sampled_from([
    "<loc_0>", "<loc_12>", "<loc_999>", "<loc_1000>", "<loc_", "loc_5>", "<loc_-1>", "<loc_0099>",
    "<loc_" + "9" * 5000 + ">", "drop", "broken-weft", "Broken Weft", " ", "\n", "</s>", "<s>", "<pad>",
    "<", ">", "<<", "<sep>", "<poly>", "</poly>", "<OD>", "é", "\x00", "",
])


@settings(max_examples=300)
@given(text=st.one_of(st.lists(_fragments, max_size=40).map("".join), st.text(max_size=200)),
       width=sizes, height=sizes)
def test_parsers_never_raise_and_always_return_valid_boxes(text, width, height):
    boxes, dropped = parse_text(text, width, height)
    assert dropped >= 0
    for box in boxes:
        assert box.label == box.label.strip() and box.label
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
    polygons, dropped = parse_polygons(text, width, height)
    assert dropped >= 0 and all(len(p.points) >= 3 for p in polygons)


@given(
    width=st.integers(10, 4000), height=st.integers(10, 4000),
    coords=st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=0, max_size=6),
    label=st.sampled_from(["drop", "broken-weft", "Broken Weft", "hole 2"]),
)
def test_boxes_round_trip_through_text_within_half_a_bin(width, height, coords, label):
    boxes = []
    for a, b, c, d in coords:
        (x1, x2), (y1, y2) = sorted((a * width, c * width)), sorted((b * height, d * height))
        # at least two bins wide, so both ends never share a bin
        if x2 - x1 >= 2 * width / 1000 and y2 - y1 >= 2 * height / 1000:
            boxes.append(Box(label, x1, y1, x2, y2))
    parsed, dropped = parse_text(boxes_to_text(boxes, width, height), width, height)
    assert dropped == 0 and len(parsed) == len(boxes)
    key = lambda b: (quantize(b.y1, height), quantize(b.x1, width), quantize(b.y2, height), quantize(b.x2, width))  # noqa: E731
    for original, back in zip(sorted(boxes, key=key), parsed, strict=True):
        assert back.label == original.label
        for a, b, size in ((original.x1, back.x1, width), (original.x2, back.x2, width),
                           (original.y1, back.y1, height), (original.y2, back.y2, height)):
            assert abs(a - b) <= 0.5 * size / 1000 + 1e-9


@given(width=st.integers(1, 5000), x1=st.floats(0, 1), x2=st.floats(0, 1))
def test_flip_twice_is_identity_and_matches_the_seeds_1000_minus_rule_within_a_bin(width, x1, x2):
    lo, hi = sorted((x1 * width, x2 * width))
    assume(hi - lo > 1e-6 * width)  # narrower vanishes in float arithmetic: W - x1 == W - x2
    box = Box("drop", lo, 1, hi, 2)
    flipped = box.hflip(width)
    assert flipped.label == "drop" and (flipped.y1, flipped.y2) == (1, 2)
    twice = flipped.hflip(width)
    assert math.isclose(twice.x1, lo, abs_tol=1e-9 * width) and math.isclose(twice.x2, hi, abs_tol=1e-9 * width)
    # On the grid: x1' = 1000 - x2 and x2' = 1000 - x1, up to the floor (and the clamp at 999);
    # a value within float error of a bin edge may floor to either side of it, once per side.
    def slack(*values: float) -> int:
        return sum(abs(v / width * 1000 - round(v / width * 1000)) < 1e-9 for v in values)

    assert abs(quantize(flipped.x1, width) - (1000 - quantize(hi, width))) <= 1 + slack(flipped.x1, hi)
    assert abs(quantize(flipped.x2, width) - (1000 - quantize(lo, width))) <= 1 + slack(flipped.x2, lo)


def test_text_a_tag_ends_before_any_loc_is_no_part_of_the_next_label():
    boxes, dropped = parse_text("drop</s>hole<loc_1><loc_2><loc_3><loc_4>", 1000, 1000)
    assert [b.label for b in boxes] == ["hole"] and dropped == 1
    assert parse_text("<loc_\u0663><loc_2><loc_3><loc_4>", 1000, 1000, default_label="d")[0] == []  # not a digit 0-9


def test_a_polygon_label_before_its_poly_tag_is_kept():
    from loomlens.data.florence_text import parse_polygons

    polygons, dropped = parse_polygons("drop<poly><loc_1><loc_2><loc_300><loc_2><loc_300><loc_600></poly>", 1000, 1000)
    assert [p.label for p in polygons] == ["drop"] and dropped == 0
