"""LoRA/DoRA set-up on the native tiny Florence-2: presets, bad names, freezing, the lm_head tie."""

import copy

import pytest
import torch

from loomlens.model import lora
from loomlens.model.lora import (
    LoraSettings,
    LoraTargetError,
    apply_lora,
    load_adapter,
    lower_frozen,
    resolve_targets,
    trainable_by_tower,
)


@pytest.fixture(scope="module")
def built():
    from loomlens.model.tiny import build_tiny

    model, processor, _ = build_tiny(seed=0)
    return model, processor


@pytest.fixture
def model(built):
    return copy.deepcopy(built[0])


@pytest.fixture(scope="module")
def inputs(built):
    from PIL import Image

    processor = built[1]
    image = Image.new("RGB", (80, 60), (90, 40, 20))
    batch = processor(text=["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>drop"], images=[image] * 2,
                      return_tensors="pt", padding=True)
    return {**batch, "decoder_input_ids": torch.tensor([[2, 0, 30, 40, 1500], [2, 0, 50, 1600, 1700]])}


def test_presets_resolve_to_real_module_names(model):
    seed = resolve_targets(model, "seed")
    assert "lm_head" in seed
    assert "model.language_model.encoder.layers.0.self_attn.q_proj" in seed
    assert "model.language_model.decoder.layers.1.encoder_attn.v_proj" in seed
    assert "model.vision_tower.blocks.0.0.spatial_block.ffn.fc1" in seed  # as in the original remote code
    assert not any(n.endswith("out_proj") for n in seed)

    attention = resolve_targets(model, "attention")
    assert {n.rsplit(".", 1)[-1] for n in attention} == {"q_proj", "k_proj", "v_proj", "out_proj"}

    language = resolve_targets(model, "language")
    assert {n.rsplit(".", 1)[-1] for n in language} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(n.startswith("model.language_model.") for n in language)

    everything = resolve_targets(model, "all-linear")
    assert {n.rsplit(".", 1)[-1] for n in everything if "vision_tower" in n} == {"qkv", "proj", "fc1", "fc2"}
    assert set(language) < set(everything) and "lm_head" not in everything
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(everything) == sorted(linear)
    assert resolve_targets(model, ["language", "lm_head"]) == [*language, "lm_head"]  # presets mix with names


@pytest.mark.parametrize("bad", ["linear", "Conv2d", "o_proj", "lm-head"])
def test_a_target_matching_nothing_is_named_in_the_error(model, bad):
    with pytest.raises(LoraTargetError, match=f"'{bad}'"):
        apply_lora(model, LoraSettings(targets=["q_proj", bad]))


@pytest.mark.parametrize(
    ("freeze", "vision", "language"), [("none", True, True), ("vision", False, True), ("language", True, False)]
)
def test_freeze_stops_one_tower(model, freeze, vision, language):
    peft_model = apply_lora(model, LoraSettings(targets="all-linear", freeze=freeze))
    counts = trainable_by_tower(peft_model)
    assert (counts["vision"] > 0, counts["language"] > 0) == (vision, language)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_lora_on_lm_head_leaves_the_input_embeddings_alone(model, inputs):
    embeddings = model.get_input_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4))
    base = peft_model.get_base_model()
    shared = base.model.language_model.shared.weight
    assert base.lm_head.base_layer.weight is not shared  # untied: its own copy
    assert base.model.language_model.encoder.embed_tokens.weight is shared  # encoder/decoder still tied
    assert base.config.tie_word_embeddings is False
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        peft_model(**inputs).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert base.lm_head.lora_B["default"].weight.abs().sum() > 0  # lm_head's adapter did train
    assert torch.equal(shared, embeddings)
    merged = peft_model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    assert not torch.equal(merged.lm_head.weight, embeddings)


def test_untouched_lm_head_stays_tied(model):
    base = apply_lora(model, LoraSettings(targets="attention")).get_base_model()
    assert base.lm_head.weight is base.model.language_model.shared.weight


def test_lower_frozen_stores_the_base_in_bf16_and_keeps_the_adapter_fp32(model, inputs):
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4))
    base = peft_model.get_base_model()
    assert lower_frozen(peft_model, torch.bfloat16) > 0
    assert lower_frozen(peft_model, torch.bfloat16) == 0  # nothing left to cast
    for name, param in peft_model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.dtype == torch.float32)
    shared = base.model.language_model.shared.weight
    assert base.model.language_model.encoder.embed_tokens.weight is shared  # still one tensor
    pixels = inputs["pixel_values"].to(torch.bfloat16)
    logits = peft_model(**{**inputs, "pixel_values": pixels}).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)  # peft's own forward, mixed dtypes


def test_dora_on_lm_head_with_a_zero_pad_row_is_finite(model, inputs, monkeypatch):
    assert (model.lm_head.weight.norm(dim=1) == 0).any()  # the pad row: the hazard is real
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings(targets="seed", dora=True))
    logits = peft_model(**inputs).logits
    logits.logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in peft_model.parameters() if p.grad is not None)

    monkeypatch.setattr(lora, "lift_zero_rows", lambda *args: None)  # without the fix: NaN
    assert not torch.isfinite(apply_lora(model, LoraSettings(targets="seed", dora=True))(**inputs).logits).all()


@pytest.mark.parametrize("dora", [False, True])
def test_load_adapter_reproduces_base_plus_adapter(built, inputs, tmp_path, dora):
    trained = apply_lora(copy.deepcopy(built[0]), LoraSettings(targets="seed", r=4, dora=dora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.05)
    trained.save_pretrained(tmp_path, save_embedding_layers=False)
    loaded = load_adapter(copy.deepcopy(built[0]), tmp_path)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_pickled_adapter_is_refused_with_a_clear_message(model, tmp_path):
    apply_lora(copy.deepcopy(model), LoraSettings()).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle.*reads only safetensors adapters.*re-save"):
        load_adapter(model, tmp_path)


def test_an_adapter_cut_short_or_missing_is_named_with_the_fix(model, tmp_path):
    apply_lora(copy.deepcopy(model), LoraSettings()).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy to the line PC that broke off
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors are damaged .*copy the run folder again"):
        load_adapter(model, tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors \(a copy cut short\?\)"):
        load_adapter(model, tmp_path)
