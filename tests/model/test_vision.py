"""The image path cut after the first DaViT stages computes what the whole path computes."""

import pytest
import torch

from loomlens.model import load_model
from loomlens.model.lora import LoraSettings, LoraTargetError, apply_lora
from loomlens.model.vision import split_image_path, stage_count, stage_of


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny")
    return model


def test_head_then_tail_equals_the_whole_image_path(tiny):
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny.model.get_image_features(pixels).pooler_output
        for stages in range(1, stage_count(tiny)):
            head, tail = split_image_path(tiny, stages)
            torch.testing.assert_close(tail(head(pixels)), whole, rtol=0, atol=1e-6)
    for stages in (0, stage_count(tiny)):
        with pytest.raises(ValueError, match="can split after"):
            split_image_path(tiny, stages)


def test_stage_of_names():
    assert stage_of("model.vision_tower.blocks.2.0.spatial_block.ffn.fc1") == 2
    assert stage_of("base_model.model.model.vision_tower.convs.0.conv.weight") == 0
    assert stage_of("model.vision_tower.blocks.10.0.channel_block.ffn.fc2") == 10
    assert stage_of("model.language_model.encoder.layers.0.fc1") is None
    assert stage_of("model.multi_modal_projector.image_projection") is None


def test_frozen_stages_get_no_adapters():
    model, _ = load_model("tiny")
    peft = apply_lora(model, LoraSettings(targets="seed", r=2), vision_frozen_stages=2)
    adapted = {n.split(".lora_")[0] for n, _ in peft.named_parameters() if "lora_A" in n}
    assert {stage_of(n) for n in adapted} == {None, 2}  # the text side and the last stage only
    assert any("language_model" in n for n in adapted)
    with pytest.raises(LoraTargetError, match="has 3 stages"):
        apply_lora(load_model("tiny")[0], LoraSettings(targets="seed"), vision_frozen_stages=4)
    with pytest.raises(LoraTargetError, match="nothing would train"):
        apply_lora(load_model("tiny")[0], LoraSettings(targets=["model.vision_tower.blocks.0.0.spatial_block.ffn.fc1"]),
                                        vision_frozen_stages=1)
