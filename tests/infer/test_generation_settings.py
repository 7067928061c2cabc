"""Generation never takes a checkpoint's settings, and padded vocabulary rows never reach an answer."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from loomlens.infer.generation import VocabMask, generate, generation_settings
from loomlens.infer.parsing import align_boxes, token_pieces
from loomlens.infer.scoring import scored_boxes

#: The real Florence-2-base-ft's generation_config.json (a transformers 4.46 save: its
#: bos/eos/pad ids are swapped to 2/1/0), copied value for value.
REAL_GENERATION_CONFIG = {
    "bos_token_id": 2, "decoder_start_token_id": 2, "early_stopping": True, "eos_token_id": 1,
    "forced_bos_token_id": 0, "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 3,
    "pad_token_id": 0,
}


class Force(LogitsProcessor):
    """Adds a large bias to the next token of `answer` (then `</s>`): the answer comes out
    unless another processor has banned one of its tokens (-inf stays -inf)."""

    def __init__(self, answer: list[int], eos: int):
        self.answer, self.eos = answer, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - 1  # decoder-start excluded
        token = self.answer[step] if step < len(self.answer) else self.eos
        biased = scores.clone()
        biased[:, token] += 1e4
        return biased


@pytest.fixture
def image():
    return Image.new("RGB", (200, 100), (90, 80, 70))


def with_real_config(model):
    """A copy of `model` whose generation_config carries the real checkpoint's settings."""
    twin = copy.deepcopy(model)
    twin.generation_config = GenerationConfig(**REAL_GENERATION_CONFIG)
    return twin


def test_a_checkpoint_generation_config_changes_no_answer(tiny, image):
    model, processor = tiny
    for beams in (1, 2):
        plain = generate(model, processor, [image], ["<OD>"], max_new_tokens=30, num_beams=beams)
        real = generate(with_real_config(model), processor, [image], ["<OD>"], max_new_tokens=30, num_beams=beams)
        assert [g.token_ids for g in real] == [g.token_ids for g in plain]
        assert real[0].token_logprobs == pytest.approx(plain[0].token_logprobs, abs=1e-5)


def test_two_boxes_of_a_long_class_name_come_out_whole(tiny, image):
    model, processor = tiny
    tok = processor.tokenizer
    name = tok("broken-weft", add_special_tokens=False).input_ids
    assert len(name) >= 3  # long enough for a 3-gram ban to bite
    loc = tok.convert_tokens_to_ids
    answer = [tok.bos_token_id]
    for box in ((10, 20, 300, 400), (500, 600, 700, 800)):
        answer += name + loc([f"<loc_{v}>" for v in box])
    force = LogitsProcessorList([Force(answer, tok.eos_token_id)])
    (gen,) = generate(with_real_config(model), processor, [image], ["<OD>"], max_new_tokens=40, logits_processor=force)
    assert gen.token_ids == [*answer, tok.eos_token_id]
    boxes, dropped = scored_boxes(tok, gen, 200, 100)
    assert [b.label for b in boxes] == ["broken-weft", "broken-weft"] and dropped == 0


def test_settings_are_explicit_and_ids_come_from_the_tokenizer(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    settings = generation_settings(with_real_config(model), tok, max_new_tokens=50, num_beams=1)
    assert settings["no_repeat_ngram_size"] == 0 and settings["num_beams"] == 1 and settings["do_sample"] is False
    assert (settings["eos_token_id"], settings["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id) == (2, 1)
    with pytest.raises(ValueError, match="num_beams"):
        generation_settings(model, tok, max_new_tokens=5, num_beams=0)


def test_a_setting_with_no_neutral_value_is_refused_by_name(tiny, image):
    model, processor = tiny
    twin = copy.deepcopy(model)
    twin.generation_config = GenerationConfig(suppress_tokens=[5, 6])
    with pytest.raises(ValueError, match="suppress_tokens.*generation_config.json"):
        generate(twin, processor, [image], ["<OD>"], max_new_tokens=4)


def test_padded_rows_are_masked_out_of_generation(tiny, image):
    """A model whose lm_head has 64 rows past the tokenizer, the padded rows favoured: the
    answer holds only real tokens."""
    model, processor = tiny
    size = len(processor.tokenizer)
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(size + 64)
    with torch.no_grad():
        padded.lm_head.weight[size:] = padded.lm_head.weight[:size].abs().max() * 50
    assert padded.lm_head.weight.shape[0] == size + 64
    (gen,) = generate(padded, processor, [image], ["<OD>"], max_new_tokens=10)
    assert gen.token_ids and all(t < size for t in gen.token_ids)
    scores = torch.zeros(1, size + 64)
    assert torch.isinf(VocabMask(size)(None, scores)[0, size:]).all()


def test_parser_skips_ids_past_the_tokenizer(tiny):
    tok = tiny[1].tokenizer
    size = len(tok)
    ids = tok("drop", add_special_tokens=False).input_ids + tok.convert_tokens_to_ids(
        ["<loc_100>", "<loc_200>"]) + [size + 3] + tok.convert_tokens_to_ids(["<loc_300>", "<loc_400>"])
    pieces = token_pieces(tok, ids)
    assert pieces[len(ids) - 3] == ""
    (found,), dropped = align_boxes(pieces, 1000, 1000)
    assert found.box.label == "drop" and dropped == 0 and found.loc_tokens == [1, 2, 4, 5]
    assert align_boxes([None, *pieces], 1000, 1000)[0][0].box == found.box
