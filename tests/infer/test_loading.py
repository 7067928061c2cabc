"""Inference set-up: the precision `auto` picks, and a merged, cast model that computes what
base + adapter computes."""

import pytest
import torch
from PIL import Image

from loomlens.model import load_model
from loomlens.infer import loading
from loomlens.infer.loading import ready_for_inference, resolve_precision
from loomlens.model.lora import LoraSettings, apply_lora


def test_precision_auto_follows_the_hardware(monkeypatch):
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "mps") == "fp32"  # only CPUs and CUDA are probed
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4")


def adapted_model():
    """The tiny model with a seed-preset LoRA (vision MLPs, BART, lm_head) whose updates are
    not zero, as after training."""
    model, processor = load_model("tiny")
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return peft_model.eval(), processor


@torch.no_grad()
def test_merged_model_computes_what_the_adapter_computes():
    peft_model, processor = adapted_model()
    inputs = processor(text=["<OD>"], images=[Image.new("RGB", (90, 50), (30, 60, 90))], return_tensors="pt")
    decoder = torch.tensor([[2, 0, 40, 900, 1600, 1700]])
    expected = peft_model(**inputs, decoder_input_ids=decoder).logits
    untouched = load_model("tiny")[0].eval()(**inputs, decoder_input_ids=decoder).logits
    assert (expected - untouched).abs().max() > 1e-2  # the adapter changes the answer

    merged = ready_for_inference(peft_model, "fp32")
    assert not merged.training
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged(**inputs, decoder_input_ids=decoder).logits, expected, rtol=0, atol=1e-4)

    cast = ready_for_inference(merged, "bf16")
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    pixels = inputs["pixel_values"].to(torch.bfloat16)
    logits = cast(input_ids=inputs["input_ids"], pixel_values=pixels, decoder_input_ids=decoder).logits.float()
    # bf16 keeps ~3 significant digits: logits of ~17 move by up to ~0.5; the probabilities of
    # fp32's choices (what a box's score is made of) barely, and confident choices stay.
    chosen = expected.argmax(-1, keepdim=True)
    p_cast, p_fp32 = (x.softmax(-1).gather(-1, chosen) for x in (logits, expected))
    torch.testing.assert_close(p_cast, p_fp32, rtol=0, atol=0.03)
    confident = p_fp32.squeeze(-1) > 0.5
    assert confident.sum() >= 2 and torch.equal(logits.argmax(-1)[confident], expected.argmax(-1)[confident])


def test_a_cpu_model_loaded_to_answer_keeps_freed_memory(monkeypatch):
    """`eval`, `predict`, the demo and the benchmarks all load through here: each gets the
    fewer page faults of `keep_freed_memory` on a CPU (model/runtime.py)."""
    calls = []
    monkeypatch.setattr(loading, "keep_freed_memory", lambda: calls.append("kept") or True)
    loading.load_for_inference(model="tiny", precision="fp32")
    assert calls == ["kept"]


def test_a_run_whose_base_folder_is_not_on_this_machine_takes_it_from_model_and_says_so_without(tmp_path):
    """A run copied from the training machine, its base recorded as a folder there: eval and
    predict said "Repo id must be in the form 'repo_name'" without --model, and "drop --model"
    with it, so the run could not be loaded here at all (merge took --model)."""
    import yaml

    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets=["q_proj"], r=2)).save_pretrained(tmp_path / "run" / "checkpoints" / "best")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": "/elsewhere/florence-base"}))
    with pytest.raises(FileNotFoundError, match=r"trained on the base model folder /elsewhere/florence-base, which is "
                                                r"not on this machine: give where that base is here with --model"):
        loading.load_for_inference(adapter=tmp_path / "run")
    loaded = loading.load_for_inference(adapter=tmp_path / "run", model="tiny")  # the base, found elsewhere here
    assert loaded.base == "tiny" and loaded.adapter == tmp_path / "run" / "checkpoints" / "best"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": "tiny"}))
    with pytest.raises(ValueError, match=r"trained on base 'tiny', not 'tiny-hr'.*Drop --model"):
        loading.load_for_inference(adapter=tmp_path / "run", model="tiny-hr")
