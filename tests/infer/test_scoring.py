"""Score-aligned parsing: each box gets its own tokens, and nothing ever crashes."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loomlens.data.florence_text import parse_text
from loomlens.infer.generation import Generation
from loomlens.infer.parsing import align_boxes, token_pieces
from loomlens.infer.scoring import OTHER_LABEL_FLOOR, box_score, class_spellings, other_labels, scored_boxes


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1].tokenizer


def generation(tokenizer, text, logprob=-0.1):
    ids = tokenizer(text, add_special_tokens=True).input_ids
    return Generation(text, ids, [logprob] * len(ids))


def test_each_box_owns_its_label_and_loc_tokens(tokenizer):
    text = "drop<loc_10><loc_20><loc_30><loc_40>broken-weft<loc_500><loc_510><loc_600><loc_620>"
    gen = generation(tokenizer, text)
    pieces = token_pieces(tokenizer, gen.token_ids)
    aligned, dropped = align_boxes(pieces, 1000, 1000)
    assert dropped == 0
    assert [t.box.label for t in aligned] == ["drop", "broken-weft"]
    assert ["".join(pieces[i] for i in t.label_tokens) for t in aligned] == ["drop", "broken-weft"]
    assert [pieces[i] for i in aligned[1].loc_tokens] == ["<loc_500>", "<loc_510>", "<loc_600>", "<loc_620>"]


def test_a_character_split_over_byte_tokens_comes_back_whole(tokenizer):
    # Byte-level BPE spells "Ö" and "破" in several tokens; each box keeps its label whole, with
    # every token of it (the first byte's choice is part of the label's score).
    text = "Ölfleck<loc_1><loc_2><loc_30><loc_40>破损<loc_5><loc_6><loc_70><loc_80>"
    gen = generation(tokenizer, text)
    pieces = token_pieces(tokenizer, gen.token_ids)
    assert "".join(pieces) == "<s>" + text + "</s>"
    aligned, dropped = align_boxes(pieces, 1000, 1000)
    assert dropped == 0 and [t.box.label for t in aligned] == ["Ölfleck", "破损"]
    assert aligned[0].label_tokens == list(range(1, aligned[0].loc_tokens[0]))
    assert "".join(pieces[i] for i in aligned[1].label_tokens) == "破损"


def test_stray_bytes_stay_replacement_characters(tokenizer):
    # A lone first byte of "Ö" (an unconstrained model may write one) never merges into a loc.
    lead = tokenizer("Ö", add_special_tokens=False).input_ids[:1]
    ids = [tokenizer.bos_token_id, *lead, *tokenizer("drop<loc_1><loc_2><loc_3><loc_4>", add_special_tokens=False).input_ids]
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == "<s>\ufffddrop<loc_1><loc_2><loc_3><loc_4>"
    assert pieces[-4:] == ["<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>"]


def test_shared_label_and_prompt_label(tokenizer):
    two = generation(tokenizer, "knot<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>")
    aligned, _ = align_boxes(token_pieces(tokenizer, two.token_ids), 100, 100)
    assert len(aligned) == 2 and aligned[0].label_tokens == aligned[1].label_tokens != []
    grounded = generation(tokenizer, "<loc_1><loc_2><loc_3><loc_4>")
    aligned, _ = align_boxes(token_pieces(tokenizer, grounded.token_ids), 100, 100, default_label="drop")
    assert aligned[0].box.label == "drop" and aligned[0].label_tokens == []


@pytest.mark.parametrize(("text", "kept"), [
    ("drop<loc_1><loc_2><loc_3><loc_4>wrinkle<loc_5><loc_6>", "drop"),  # a partial box
    ("drop<loc_30><loc_40><loc_10><loc_20>wrinkle<loc_10><loc_20><loc_30><loc_40>", "wrinkle"),  # a reversed one
])
def test_malformed_box_is_dropped_and_counted(tokenizer, text, kept):
    boxes, dropped = scored_boxes(tokenizer, generation(tokenizer, text), 1000, 1000)
    assert [b.label for b in boxes] == [kept] and dropped == 1


def test_no_box_under_a_pixel_comes_out(tokenizer):
    # On a 200 px image one bin is 0.2 px: one bin wide is no box; six bins (1.2 px) is one.
    gen = generation(tokenizer, "drop<loc_10><loc_10><loc_11><loc_90>knot<loc_10><loc_10><loc_16><loc_90>")
    boxes, dropped = scored_boxes(tokenizer, gen, 200, 200)
    assert [b.label for b in boxes] == ["knot"] and dropped == 1
    assert all(b.width >= 1 and b.height >= 1 for b in boxes)


def test_a_box_sharing_its_label_with_a_dropped_box_keeps_the_label_tokens(tokenizer):
    # `drop<reversed box><box>`: the second box's label is the run's `drop`, and its score
    # holds the label's probability even though the box before it was dropped.
    gen = generation(tokenizer, "drop<loc_30><loc_40><loc_10><loc_20><loc_10><loc_20><loc_30><loc_40>")
    pieces = token_pieces(tokenizer, gen.token_ids)
    (box,), dropped = align_boxes(pieces, 1000, 1000)
    assert dropped == 1 and "".join(pieces[i] for i in box.label_tokens) == "drop"
    for i in box.label_tokens:
        gen.token_logprobs[i] = math.log(0.1)
    (scored,), _ = scored_boxes(tokenizer, gen, 1000, 1000)
    assert scored.score == pytest.approx(0.1 * math.exp(-0.1))


@pytest.mark.parametrize("text", [
    "drop<loc_353><loc_156><loc_363><loc_177>",
    "wrinkle<loc_232><loc_340><loc_328><loc_381>wrinkle<loc_220><loc_520><loc_378><loc_593>",
    "broken-weft<loc_0><loc_614><loc_999><loc_645>drop<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><loc_80>",
])
def test_boxes_are_the_ones_florence2s_processor_reads(tiny, tokenizer, text):
    # The same tokens, read by loomlens and by the processor's post_process_generation: the same
    # labels and boxes, loomlens at the bin centres the processor computes before it casts them
    # to whole pixels (so within a pixel).
    processor = tiny[1]
    gen = generation(tokenizer, text)
    ours, dropped = scored_boxes(tokenizer, gen, 512, 288)
    theirs = processor.post_process_generation(processor.batch_decode([gen.token_ids], skip_special_tokens=False)[0],
                                               task="<OD>", image_size=(512, 288))["<OD>"]
    assert dropped == 0 and [b.label for b in ours] == theirs["labels"]
    for box, bbox in zip(ours, theirs["bboxes"]):
        assert all(0 <= mine - their < 1 for mine, their in zip((box.x1, box.y1, box.x2, box.y2), bbox))


def test_score_formulas():
    lp = [math.log(0.5), math.log(0.8), math.log(0.8), math.log(0.8), math.log(0.8)]
    assert box_score(lp, [0], [1, 2, 3, 4], "product") == pytest.approx(0.5 * 0.8)
    assert box_score(lp, [0], [1, 2, 3, 4], "mean") == pytest.approx((0.5 * 0.8**4) ** (1 / 5))
    assert box_score(lp, [], [1, 2, 3, 4], "product") == pytest.approx(0.8)
    assert box_score(lp, [0], [1, 2, 3, 4], "label") == pytest.approx(0.5)
    assert box_score(lp, [], [1, 2, 3, 4], "label") == 1.0
    with pytest.raises(ValueError):
        box_score(lp, [0], [1, 2, 3, 4], "max")


def test_edges_sit_at_the_mean_bins_the_generation_measured(tokenizer):
    gen = generation(tokenizer, "drop<loc_100><loc_200><loc_300><loc_400>drop<loc_500><loc_500><loc_501><loc_501>")
    locs = [i for i, p in enumerate(token_pieces(tokenizer, gen.token_ids)) if p.startswith("<loc_")]
    gen.loc_bins = dict(zip(locs, [100.5, 199.0, 302.25, 400.0, 500.9, 500.0, 500.1, 501.0]))
    (first, second), _ = scored_boxes(tokenizer, gen, 1000, 2000)
    assert (first.x1, first.y1, first.x2, first.y2) == pytest.approx((101.0, 399.0, 302.75, 801.0))
    # Edges that would come within a pixel of each other stay where the chosen bins put them.
    assert (second.x1, second.x2) == pytest.approx((500.5, 501.5))
    del gen.loc_bins[locs[0]]  # a coordinate without its mean: the box as chosen
    first, _ = scored_boxes(tokenizer, gen, 1000, 2000)[0]
    assert (first.x1, first.y1, first.x2, first.y2) == pytest.approx((100.5, 401.0, 300.5, 801.0))


def test_a_coordinate_scores_by_the_probability_near_it_where_measured(tokenizer):
    gen = generation(tokenizer, "drop<loc_100><loc_200><loc_300><loc_400>", logprob=math.log(0.2))
    locs = [i for i, p in enumerate(token_pieces(tokenizer, gen.token_ids)) if p.startswith("<loc_")]
    label = [i for i, p in enumerate(token_pieces(tokenizer, gen.token_ids)) if p.strip() and not p.startswith("<")]
    assert scored_boxes(tokenizer, gen, 1000, 1000)[0][0].score == pytest.approx(0.2 ** len(label) * 0.2)
    gen.loc_near = dict(zip(locs, [0.9, 0.9, 0.6, 0.6]))
    assert scored_boxes(tokenizer, gen, 1000, 1000)[0][0].score == pytest.approx(0.2 ** len(label) * math.sqrt(0.54))


def test_a_box_is_also_given_under_the_classes_the_model_nearly_wrote(tokenizer):
    classes = ["slub", "pinhole", "broken-end", "broken-pick"]
    spellings = class_spellings(tokenizer, classes)
    spelt = {name: list(ids) for ids, name in spellings.items()}
    assert len(spelt["broken-end"]) > 1 and spelt["broken-end"][0] == spelt["broken-pick"][0]
    gen = generation(tokenizer, "broken-end<loc_100><loc_200><loc_300><loc_400>", logprob=math.log(0.5))
    label = [i for i, t in enumerate(gen.token_ids) if t in spelt["broken-end"]]
    for i in label:
        gen.token_logprobs[i] = math.log(0.9)
    locs = [i for i, p in enumerate(token_pieces(tokenizer, gen.token_ids)) if p.startswith("<loc_")]
    parts = next(a for a, b in zip(spelt["broken-end"], spelt["broken-pick"]) if a != b)  # where the names part
    diverge = label[spelt["broken-end"].index(parts)]
    gen.runners_up = {
        label[0]: [(spelt["slub"][0], math.log(0.3)), (spelt["pinhole"][0], math.log(0.01))],  # pinhole under the floor
        diverge: [(spelt["broken-pick"][spelt["broken-end"].index(gen.token_ids[diverge])], math.log(0.5))],
        locs[0]: [(spelt["pinhole"][0], math.log(0.4))],  # a coordinate's runner-up names nothing
    }
    found = other_labels(gen, label, spellings)
    assert sorted(found) == ["broken-pick", "slub"] and found["slub"] == [math.log(0.3)]
    assert math.exp(sum(found["broken-pick"])) == pytest.approx(0.9 ** label.index(diverge) * 0.5)
    boxes, dropped = scored_boxes(tokenizer, gen, 1000, 1000, spellings=spellings)
    assert dropped == 0 and [b.label for b in boxes] == ["broken-end", "slub", "broken-pick"]
    assert len({(b.x1, b.y1, b.x2, b.y2) for b in boxes}) == 1  # one place, three names
    assert [b.score for b in boxes] == pytest.approx([0.9 ** len(label) * 0.5, 0.3 * 0.5,
                                                      0.9 ** label.index(diverge) * 0.5 * 0.5])
    assert [b.label for b in scored_boxes(tokenizer, gen, 1000, 1000)[0]] == ["broken-end"]  # no classes: as written
    assert 0.01 < OTHER_LABEL_FLOOR <= 0.3


def test_less_likely_box_scores_lower(tokenizer):
    gen = generation(tokenizer, "drop<loc_1><loc_2><loc_3><loc_4>drop<loc_50><loc_50><loc_60><loc_60>")
    # Make the second label's tokens unlikely.
    pieces = token_pieces(tokenizer, gen.token_ids)
    second = [i for i, p in enumerate(pieces) if i > pieces.index("<loc_4>") and not p.startswith("<")]
    for i in second:
        gen.token_logprobs[i] = math.log(0.1)
    boxes, _ = scored_boxes(tokenizer, gen, 1000, 1000)
    assert boxes[0].score > boxes[1].score > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_strings_never_crash_and_match_the_parser(tokenizer, data):
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=60))
    # Bias towards structure: loc tokens and label words are most of what a model writes.
    locs = tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in (0, 5, 500, 999)])
    words = tokenizer("drop broken-weft", add_special_tokens=False).input_ids
    ids += data.draw(st.lists(st.sampled_from(locs + words + [0, 2]), max_size=60))
    ids = data.draw(st.permutations(ids))
    logprobs = data.draw(st.lists(st.floats(-30, 0), min_size=len(ids), max_size=len(ids)))
    w, h = data.draw(st.integers(1, 4000)), data.draw(st.integers(1, 4000))
    gen = Generation("", list(ids), logprobs)
    boxes, dropped = scored_boxes(tokenizer, gen, w, h)
    parsed, expected_dropped = parse_text("".join(token_pieces(tokenizer, gen.token_ids)), w, h)
    expected = [b for b in parsed if b.width >= 1 and b.height >= 1]  # sub-pixel boxes are dropped too
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in boxes] == [
        (b.label, b.x1, b.y1, b.x2, b.y2) for b in expected
    ]
    assert dropped == expected_dropped + len(parsed) - len(expected)
    assert all(0.0 <= b.score <= 1.0 for b in boxes)
