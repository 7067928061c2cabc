"""Generation with log-probs, scored detection and the `<OD>` grammar, on the tiny model."""

import math

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList

from loomlens.data.florence_text import parse_text
from loomlens.infer import detect
from loomlens.infer.grammar import BoxGrammar
from loomlens.infer.detection import detect_with_details
from loomlens.infer.generation import (
    LOC_SURE, LOC_WINDOW, RUNNERS_UP, box_token_budget, expected_bins, generate, label_token_count,
)
from loomlens.infer.parsing import token_pieces
from loomlens.model.tokenizer import loc_token_ids

CLASSES = ["drop", "wrinkle", "broken-weft"]


@pytest.fixture(scope="module")
def images():
    """A light square on a dark ground (the pretrained tiny finds it) and a plain frame."""
    square = Image.new("RGB", (320, 200), (40, 40, 40))
    ImageDraw.Draw(square).rectangle([80, 40, 220, 170], fill=(230, 230, 230))
    return [square, Image.new("RGB", (64, 96), (20, 200, 90))]


def test_budget_follows_the_box_count(tiny):
    tokenizer = tiny[1].tokenizer
    assert label_token_count(tokenizer, CLASSES) == len(tokenizer("broken-weft", add_special_tokens=False).input_ids)
    assert box_token_budget(20, 5) == 2 + 20 * 9
    assert box_token_budget(3) < box_token_budget(20)


def test_generate_returns_aligned_ids_and_logprobs(tiny, images):
    model, processor = tiny
    gens = generate(model, processor, images, ["<OD>", "<CAPTION>"], max_new_tokens=12)
    assert len(gens) == 2
    for g in gens:
        assert 0 < len(g.token_ids) == len(g.token_logprobs) <= 12
        assert all(lp <= 0 and math.isfinite(lp) for lp in g.token_logprobs[:-1])
        assert processor.tokenizer.pad_token_id not in g.token_ids


def test_batched_generation_equals_one_by_one(tiny, images):
    model, processor = tiny
    together = generate(model, processor, images, ["<OD>", "<OD>"], max_new_tokens=8)
    alone = [generate(model, processor, [im], ["<OD>"], max_new_tokens=8)[0] for im in images]
    assert len(together[0].token_ids) > 3  # the square's box, not an empty answer
    for a, b in zip(together, alone, strict=True):
        assert a.token_ids == b.token_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_beam_search_runs(tiny, images):
    model, processor = tiny
    gens = generate(model, processor, images[:1], ["<OD>"], max_new_tokens=8, num_beams=2)
    assert len(gens[0].token_ids) == len(gens[0].token_logprobs) > 0
    assert gens[0].token_entropies == [] and gens[0].mean_entropy() is None  # not measured under beams


def test_greedy_generation_measures_each_steps_entropy(tiny, images):
    model, processor = tiny
    vocab = len(processor.tokenizer)
    for g in generate(model, processor, images, ["<OD>", "<OD>"], max_new_tokens=10):
        assert len(g.token_entropies) == len(g.token_ids)
        assert all(-1e-4 <= e <= math.log(vocab) + 1e-4 for e in g.token_entropies)
        # Greedy picks the most likely token, and Shannon entropy is at least -log of the top
        # probability (the first token, <s>, and a last </s> at the budget are forced).
        for entropy, lp in list(zip(g.token_entropies, g.token_logprobs))[1:-1]:
            assert entropy >= -lp - 1e-4
        assert g.mean_entropy() == pytest.approx(sum(g.token_entropies) / len(g.token_entropies))


def test_the_answer_probability_is_one_minus_the_models_end_at_the_first_answer_step(tiny, images):
    """What the model itself gives `</s>` right after `<s>`, batched or not, greedy or with
    beams, and whatever a grammar forces: the raw distribution, over the tokenizer's tokens."""
    from loomlens.infer.pixels import model_inputs

    model, processor = tiny
    tok = processor.tokenizer
    with torch.no_grad():
        inputs = model_inputs(processor, images, ["<OD>", "<OD>"])
        start = torch.tensor([[tok.eos_token_id, tok.bos_token_id]] * len(images))
        logits = model(**inputs, decoder_input_ids=start).logits[:, -1, : len(tok)].float()
    expected = 1 - logits.softmax(-1)[:, tok.eos_token_id]
    greedy = generate(model, processor, images, ["<OD>", "<OD>"], max_new_tokens=8)
    beams = generate(model, processor, images, ["<OD>", "<OD>"], max_new_tokens=8, num_beams=3)  # rows per beam
    constrained = detect_with_details(model, processor, images, max_boxes=1, constrained=True, classes=CLASSES)
    for i in range(len(images)):
        for got in (greedy[i], beams[i], constrained[i].generation):
            assert got.answer_probability == pytest.approx(expected[i].item(), abs=1e-4)
    assert expected[0] > 0.5  # the square: the model means to answer
    assert generate(model, processor, images, ["<OD>", "<OD>"], max_new_tokens=1)[0].answer_probability is None


def test_a_coordinate_is_the_mean_bin_near_the_chosen_one():
    """The model's mass near its choice places the edge; a second peak further than the
    window (another defect's edge) does not move it."""
    logits = torch.full((3, 1000), -30.0)
    logits[:, 100], logits[:, 104] = 2.0, 2.0  # two equally likely neighbouring bins ...
    logits[:, 600] = 5.0  # ... and a more likely bin far away
    chosen = torch.tensor([100, 104, 600])
    means = expected_bins(logits, chosen, window=30)
    assert means[:2].tolist() == pytest.approx([102.0, 102.0], abs=1e-3)
    assert means[2].item() == pytest.approx(600.0, abs=1e-3)
    assert expected_bins(logits, chosen, window=0).tolist() == [100.0, 104.0, 600.0]


def test_greedy_answers_carry_the_mean_bin_of_each_loc_token(tiny, images):
    """Greedy search (and so every `<OD>` answer loomlens writes) keeps, for each `<loc_N>` it
    chose, the mean bin near N under the model's own distribution at that step."""
    from loomlens.infer.pixels import model_inputs

    model, processor = tiny
    tok = processor.tokenizer
    loc_ids = loc_token_ids(tok)
    gen = generate(model, processor, images[:1], ["<OD>"], max_new_tokens=12)[0]
    locs = [i for i, t in enumerate(gen.token_ids) if t in loc_ids]
    assert locs and sorted(gen.loc_bins) == locs
    with torch.no_grad():  # the distribution at the first loc step, recomputed by teacher forcing
        first = locs[0]
        decoder = torch.tensor([[tok.eos_token_id, *gen.token_ids[:first]]])
        logits = model(**model_inputs(processor, images[:1], ["<OD>"]), decoder_input_ids=decoder).logits[0, -1]
    chosen = loc_ids.index(gen.token_ids[first])
    expected = expected_bins(logits[None, loc_ids].float(), torch.tensor([chosen]))
    assert gen.loc_bins[first] == pytest.approx(expected.item(), abs=0.05)
    assert all(abs(gen.loc_bins[i] - loc_ids.index(gen.token_ids[i])) <= LOC_WINDOW for i in locs)
    # How sure the model is of the edge to a few bins: the probability (over the tokenizer's
    # tokens) of the bins near the chosen one, at least the chosen bin's own.
    probs = logits[: len(tok)].float().softmax(-1)
    near = probs[loc_ids[max(0, chosen - LOC_SURE): chosen + LOC_SURE + 1]].sum().item()
    assert gen.loc_near[first] == pytest.approx(near, abs=1e-3)
    assert sorted(gen.loc_near) == locs
    assert all(math.exp(gen.token_logprobs[i]) - 1e-5 <= gen.loc_near[i] <= 1 + 1e-5 for i in locs)
    beams = generate(model, processor, images[:1], ["<OD>"], max_new_tokens=12, num_beams=2)[0]
    assert beams.loc_bins == {} and beams.loc_near == {}  # a beam's steps are not row-aligned
    assert beams.runners_up == {}


def test_greedy_answers_carry_the_tokens_ranked_next_beside_each_word(tiny, images):
    """Each chosen token that is no `<loc_N>` keeps the `RUNNERS_UP` most likely other tokens
    under the model's raw distribution at that step, as teacher forcing reads them."""
    from loomlens.infer.pixels import model_inputs

    model, processor = tiny
    tok = processor.tokenizer
    loc_ids = set(loc_token_ids(tok))
    gen = generate(model, processor, images[:1], ["<OD>"], max_new_tokens=12)[0]
    words = [i for i, t in enumerate(gen.token_ids) if t not in loc_ids]
    assert words and sorted(gen.runners_up) == words
    step = words[1] if len(words) > 1 else words[0]
    with torch.no_grad():
        decoder = torch.tensor([[tok.eos_token_id, *gen.token_ids[:step]]])
        logits = model(**model_inputs(processor, images[:1], ["<OD>"]), decoder_input_ids=decoder).logits[0, -1]
    logprobs = logits[: len(tok)].float().log_softmax(-1)
    logprobs[gen.token_ids[step]] = float("-inf")
    top = logprobs.topk(RUNNERS_UP)
    assert [t for t, _ in gen.runners_up[step]] == top.indices.tolist()
    assert [lp for _, lp in gen.runners_up[step]] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_detect_contract(tiny, images):
    model, processor = tiny
    found = detect(model, processor, images, max_boxes=3, batch_size=1)
    assert len(found) == 2 and found[0]  # the square is found
    for boxes, image in zip(found, images, strict=True):
        assert len(boxes) <= 3
        for b in boxes:
            assert 0 <= b.score <= 1 and 0 <= b.x1 < b.x2 <= image.width and 0 <= b.y1 < b.y2 <= image.height


def _random_walk(grammar: BoxGrammar, vocab: int, steps: int, seed: int) -> list[int]:
    """Decode greedily from random logits under the grammar, as `generate` would."""
    gen = torch.Generator().manual_seed(seed)
    ids = [2]  # decoder start
    for _ in range(steps):
        scores = grammar(torch.tensor([ids]), torch.randn(1, vocab, generator=gen))
        ids.append(int(scores.argmax()))
        if ids[-1] == 2:
            break
    return ids[1:]


@pytest.mark.parametrize("seed", range(20))
def test_grammar_only_writes_well_formed_boxes_of_known_classes(tiny, seed):
    tokenizer = tiny[1].tokenizer
    budget = box_token_budget(4, label_token_count(tokenizer, CLASSES))
    ids = _random_walk(BoxGrammar(tokenizer, CLASSES, max_boxes=4, max_new_tokens=budget), len(tokenizer), budget, seed)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) <= budget
    text = "".join(token_pieces(tokenizer, ids))
    boxes, dropped = parse_text(text, 1000, 1000)
    assert dropped == 0 and len(boxes) <= 4
    assert {b.label for b in boxes} <= set(CLASSES)
    locs = [int(t[5:-1]) for t in tokenizer.convert_ids_to_tokens(ids) if t.startswith("<loc_")]
    for i in range(0, len(locs), 4):
        assert locs[i + 2] >= locs[i] and locs[i + 3] >= locs[i + 1]


def test_grammar_spells_class_names_beyond_ascii(tiny):
    tokenizer = tiny[1].tokenizer
    classes = ["Ölfleck", "Oberfläche", "破损"]
    budget = box_token_budget(4, label_token_count(tokenizer, classes))
    seen = set()
    for seed in range(10):
        ids = _random_walk(BoxGrammar(tokenizer, classes, 4, budget), len(tokenizer), budget, seed)
        boxes, dropped = parse_text("".join(token_pieces(tokenizer, ids)), 1000, 1000)
        assert dropped == 0
        seen |= {b.label for b in boxes}
    assert seen == set(classes)  # each name spelt whole at least once, nothing else


def test_grammar_stops_before_a_box_that_cannot_fit(tiny):
    tokenizer = tiny[1].tokenizer
    grammar = BoxGrammar(tokenizer, CLASSES, max_boxes=20, max_new_tokens=6)
    assert grammar.allowed((tokenizer.bos_token_id,)) == [tokenizer.eos_token_id]


def test_constrained_detection_on_the_model(tiny, images):
    model, processor = tiny
    classes = [*CLASSES, "square"]  # the run's names; the grammar lets only these through
    found = detect_with_details(model, processor, images, max_boxes=2, constrained=True, classes=classes)
    assert [b.label for b in found[0].boxes][:1] == ["square"]
    for d in found:
        assert d.dropped == 0 and {b.label for b in d.boxes} <= set(classes)
    with pytest.raises(ValueError):
        detect(model, processor, images, task="<CAPTION>", constrained=True, classes=CLASSES)
    with pytest.raises(ValueError):
        LogitsProcessorList([BoxGrammar(processor.tokenizer, [], 2, 20)])


def test_other_labels_add_boxes_at_the_same_places_under_other_classes(tiny, images, monkeypatch):
    """With `other_labels`, the boxes as written come first and unchanged, and each box after
    them repeats one of their places under another of the run's classes, scoring 0.5 at most;
    off, nothing is added."""
    from loomlens.infer import scoring

    model, processor = tiny
    classes = [*CLASSES, "square"]
    monkeypatch.setattr(scoring, "OTHER_LABEL_FLOOR", 0.0)  # every class the runners-up start counts
    plain = detect_with_details(model, processor, images, max_boxes=3, constrained=True, classes=classes)
    more = detect_with_details(model, processor, images, max_boxes=3, constrained=True, classes=classes,
                               other_labels=True)
    assert sum(len(d.boxes) for d in more) > sum(len(d.boxes) for d in plain)
    for p, m in zip(plain, more, strict=True):
        assert m.boxes[: len(p.boxes)] == p.boxes
        places = {(b.x1, b.y1, b.x2, b.y2): b.label for b in p.boxes}
        for extra in m.boxes[len(p.boxes):]:
            assert extra.label in classes and places[(extra.x1, extra.y1, extra.x2, extra.y2)] != extra.label
            assert 0 <= extra.score <= 0.5 + 1e-6  # the search took the likelier token where the names part


def test_a_doubtful_empty_answer_is_read_again_with_an_answer_forced(tiny, monkeypatch):
    """An empty `<OD>` answer given with a defect as likely as a picture worth mirrors
    (`MIRROR_GATE`) is read again with `</s>` forbidden first: boxes the model half believed in, none scoring above the belief it
    gave a defect, which stays as measured; `reread_upto` leaves larger images as they were."""
    from loomlens.infer import tta

    model, processor = tiny
    plain = [Image.new("RGB", (64, 96), (20, 200, 90)), Image.new("RGB", (256, 256), (128, 128, 128))]
    first = detect_with_details(model, processor, plain, constrained=True, classes=CLASSES)
    assert [d.boxes for d in first] == [[], []]  # the untrained tiny sees nothing in plain frames
    monkeypatch.setattr(tta, "MIRROR_GATE", 0.0)  # every empty answer is in doubt
    again = detect_with_details(model, processor, plain, constrained=True, classes=CLASSES)
    for before, after in zip(first, again, strict=True):
        believed = before.generation.answer_probability
        assert after.boxes and all(b.label in CLASSES and b.score <= believed + 1e-6 for b in after.boxes)
        assert after.generation.answer_probability == pytest.approx(believed, abs=1e-6)
    upto = detect_with_details(model, processor, plain, constrained=True, classes=CLASSES, reread_upto=96)
    assert [bool(d.boxes) for d in upto] == [True, False]
    monkeypatch.setattr(tta, "MIRROR_GATE", 1.0)
    assert [d.boxes for d in detect_with_details(model, processor, plain, constrained=True, classes=CLASSES)] == [[], []]
