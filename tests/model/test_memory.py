"""Gradient checkpointing recomputes (same gradients) on each tower; the micro-batch search halves on OOM."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from loomlens.config import LoraSettings
from loomlens.model.lora import apply_lora
from loomlens.model.memory import MicroBatch, enable_gradient_checkpointing, find_micro_batch
from loomlens.train.loss import LossSpec, batch_loss


def lora_model():
    from loomlens.model import load_model

    model, processor = load_model("tiny")
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4, dropout=0.0))  # foldable
    with torch.no_grad():  # non-zero B, so every adapter gets a gradient
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return peft_model.train(), processor


def grads_and_calls(model, processor):
    """The adapters' gradients after one step, and how often the insides of the first vision
    block and of the first encoder layer ran (twice each when checkpointed: forward + recompute;
    the recompute calls the layer's own forward, so the hooks sit on a submodule)."""
    from transformers.models.bart.modeling_bart import BartEncoderLayer
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBlock

    calls = {"vision": 0, "language": 0}
    block = next(m for m in model.modules() if isinstance(m, Florence2VisionBlock)).spatial_block
    layer = next(m for m in model.modules() if isinstance(m, BartEncoderLayer)).self_attn
    hooks = [block.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
             layer.register_forward_hook(lambda *a: calls.__setitem__("language", calls["language"] + 1))]
    batch = dict(processor(text=["<OD>"], images=[Image.new("RGB", (60, 40), (200, 10, 10))], return_tensors="pt"))
    batch["labels"] = processor.tokenizer(["drop<loc_1><loc_2><loc_3><loc_4>"], return_tensors="pt").input_ids
    loss_sum, tokens = batch_loss(model, batch, LossSpec(decoder_start_token_id=2, pad_token_id=1))
    (loss_sum / tokens).backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


@pytest.mark.parametrize("folded", [False, True])
def test_checkpointing_recomputes_each_tower_and_keeps_the_gradients(folded):
    """Also over LoRA layers in their folded form (`speed.fold_lora`, the recipe's default)."""
    from loomlens.model.folded_lora import fold_lora

    plain_model, processor = lora_model()
    model, _ = lora_model()
    if folded:
        assert fold_lora(plain_model) == fold_lora(model) > 0
    expected, plain_calls = grads_and_calls(plain_model, processor)
    counts = enable_gradient_checkpointing(model, vision=True, language=True)
    assert counts["vision"] > 0 and counts["language"] > 0
    assert enable_gradient_checkpointing(model) == counts  # again: harmless
    got, calls = grads_and_calls(model, processor)
    assert plain_calls == {"vision": 1, "language": 1} and calls == {"vision": 2, "language": 2}
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_one_tower_only():
    model, processor = lora_model()
    assert enable_gradient_checkpointing(model, vision=True, language=False)["language"] == 0
    assert grads_and_calls(model, processor)[1] == {"vision": 2, "language": 1}


def test_cpu_keeps_the_requested_batch_untried():
    def never(size):
        raise AssertionError("a CPU batch is not tried")

    assert find_micro_batch(never, 8, "cpu") == MicroBatch(8, 1)


def test_out_of_memory_halves_to_a_divisor_and_accumulates_the_rest():
    tried = []

    def fits_three(size):
        tried.append(size)
        if size > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert find_micro_batch(fits_three, 12, "cuda") == MicroBatch(3, 4)
    assert tried == [12, 6, 3]


def test_nothing_fits_says_what_to_lower():
    def never_fits(size):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="one sample does not fit.*gradient checkpointing"):
        find_micro_batch(never_fits, 4, "cuda")
    with pytest.raises(ValueError, match="1 or more"):
        find_micro_batch(never_fits, 0, "cuda")
