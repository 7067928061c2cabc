"""The embedded tiny model: it loads offline with plain transformers and answers <OD>."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image, ImageDraw

from loomlens.data.florence_text import parse_text
from loomlens.model import ModelLoadError, load_model
from loomlens.model.loader import TINY_DIR


def test_plain_transformers_loads_the_asset_and_runs_od(caplog) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    with caplog.at_level(logging.WARNING):
        model = Florence2ForConditionalGeneration.from_pretrained(TINY_DIR, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(TINY_DIR)
    noisy = [r.getMessage() for r in caplog.records if "newly initialized" in r.getMessage() or "missing" in r.getMessage().lower()]
    assert not noisy, noisy
    # A light square on a dark ground: the pretrained tiny names and places it (random weights
    # would not), through the processor and generate alone.
    image = Image.new("RGB", (300, 200), (40, 40, 40))
    ImageDraw.Draw(image).rectangle([60, 50, 180, 150], fill=(230, 230, 230))
    inputs = processor(text=["<OD>"], images=[image], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    boxes, dropped = parse_text(text, 300, 200)
    assert dropped == 0 and len(boxes) == 1, text
    box = boxes[0]
    assert box.label == "square" and abs(box.x1 - 60) < 6 and abs(box.y1 - 50) < 6, text
    assert abs(box.x2 - 181) < 6 and abs(box.y2 - 151) < 6, text


def test_load_model_tiny_is_fp32_eval_and_offline() -> None:
    model, processor = load_model("tiny")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert processor.tokenizer.convert_tokens_to_ids("<loc_999>") != processor.tokenizer.unk_token_id


def test_unreachable_hub_id_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model tiny"):
        load_model("florence-community/Florence-2-base")


def test_folder_without_config_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
