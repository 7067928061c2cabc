"""The tiny tokenizer: labels are whole words after a <loc_N>, and every class name round-trips."""

from __future__ import annotations

import pytest

from loomlens.data.fabric_scenes import CHROMATIC, FABRIC_CLASSES
from loomlens.data.shapes import SHAPE_CLASSES
from loomlens.model.loader import TINY_DIR
from loomlens.model.tokenizer import build_tokenizer, loc_token_ids

LOOM_CLASSES = ("wrinkle", "drop", "broken-weft")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("name", LOOM_CLASSES + SHAPE_CLASSES + FABRIC_CLASSES)
def test_a_label_after_a_loc_token_is_a_few_whole_word_tokens(tokenizer, name) -> None:
    ids = tokenizer(f"<loc_5>{name}<loc_7>", add_special_tokens=False).input_ids
    label = ids[1:-1]
    assert len(label) == name.count("-") * 2 + 1  # "broken-weft": broken, -, weft
    assert tokenizer.decode(ids) == f"<loc_5>{name}<loc_7>"


def test_loc_tokens_are_contiguous_and_decode_exactly(tokenizer) -> None:
    ids = loc_token_ids(tokenizer)
    assert ids == list(range(ids[0], ids[0] + 1000))
    assert tokenizer.decode(ids[:3]) == "<loc_0><loc_1><loc_2>"


def test_any_ascii_class_name_still_round_trips(tokenizer) -> None:
    name = "Weird_class-42 (v2)"
    assert tokenizer.decode(tokenizer(name, add_special_tokens=False).input_ids) == name


@pytest.mark.parametrize("word", CHROMATIC + ("dark", "light"))
def test_fabric_colour_words_are_one_token_before_a_class(tokenizer, word) -> None:
    """`<DENSE_REGION_CAPTION>` answers `<loc_N>dark hole...`: the colour word is one token."""
    ids = tokenizer(f"<loc_5>{word} hole<loc_7>", add_special_tokens=False).input_ids
    assert len(ids) == 4


def test_the_built_tokenizer_is_the_shipped_models(tokenizer) -> None:
    """The BPE is retrained from its corpus on every build, and the embedded models' embedding
    rows follow its ids: a change to the corpus (a new class word, say) would move them. New
    pretraining classes therefore use words the corpus already has."""
    from transformers import AutoTokenizer

    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(TINY_DIR).get_vocab()
