"""The one task registry: every token, the offered and convertible views, prompts and regions."""

import pytest

from loomlens.data.tasks import CONVERTIBLE, REGISTRY, TASK_TOKENS, TASKS, get_task, prompt, region_text


def test_task_tokens_are_all_there():
    assert len(TASK_TOKENS) == 14 == len(set(TASK_TOKENS))
    assert {"<OD>", "<DENSE_REGION_CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>", "<OCR_WITH_REGION>",
            "<REGION_PROPOSAL>", "<REFERRING_EXPRESSION_SEGMENTATION>"} <= set(TASK_TOKENS)


def test_offered_and_convertible_tasks_are_views_of_the_registry():
    assert list(TASKS) == ["od", "caption", "detailed_caption", "more_detailed_caption", "dense_region_caption",
                           "phrase_grounding", "referring_expression_segmentation", "region_to_segmentation",
                           "region_to_category", "ocr", "ocr_with_region"]
    assert set(CONVERTIBLE) == {name for name, t in REGISTRY.items() if t.samples is not None}
    assert CONVERTIBLE[0] == "od" and all(REGISTRY[n].offered for n in CONVERTIBLE)
    assert get_task("<CAPTION_TO_PHRASE_GROUNDING>").name == "phrase_grounding"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("region_proposal")  # a Florence-2 task loomlens does not offer


def test_region_text_from_pixels_or_locs():
    assert region_text("0,0,160,90", 320, 180) == "<loc_0><loc_0><loc_500><loc_500>"
    assert region_text(" <loc_1> <loc_2><loc_3><loc_4> ", 10, 10) == "<loc_1><loc_2><loc_3><loc_4>"
    with pytest.raises(ValueError):
        region_text("a box please", 10, 10)
    assert prompt(get_task("<OD>"), "ignored", 1, 1) == "<OD>"


