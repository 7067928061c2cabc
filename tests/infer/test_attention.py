"""Shape-aware attention: the math path for wide heads, SDPA for the rest, same results."""

import pytest
import torch

from loomlens.model import load_model
from loomlens.infer import attention
from loomlens.infer.attention import NAME, WIDE_HEAD, shape_aware
from loomlens.infer.loading import ready_for_inference

_real_math = attention._math_attention


@pytest.mark.parametrize("head_dim", [16, 4096])  # a DaViT window head, a channel-attention "head"
def test_each_path_computes_attention(head_dim, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, head_dim) for _ in range(3))
    module = torch.nn.Module().eval()
    module.is_causal = False  # as Florence-2's attention modules say
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1).transpose(1, 2)
    used = []
    monkeypatch.setattr(attention, "_math_attention",
                        lambda *a, **kw: used.append("math") or _real_math(*a, **kw))
    out, _ = shape_aware(module, q, k, v, None, scaling=0.1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert used == (["math"] if head_dim > WIDE_HEAD else [])


@torch.no_grad()
def test_ready_model_uses_it_everywhere_and_answers_the_same():
    model, processor = load_model("tiny")
    model.eval()
    inputs = processor(text=["<OD>"], images=[torch.zeros(3, 64, 64)], return_tensors="pt")
    decoder = torch.tensor([[2, 0, 40, 900]])
    expected = model(**inputs, decoder_input_ids=decoder).logits
    ready = ready_for_inference(model, "fp32")
    assert ready.config._attn_implementation == NAME
    assert ready.config.vision_config._attn_implementation == NAME
    torch.testing.assert_close(ready(**inputs, decoder_input_ids=decoder).logits, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_a_batch_that_pads_is_masked_as_sdpa_masks_it():
    """Two prompts of different lengths pad the shorter one: its padding must stay out of the
    encoder's attention and the decoder's cross-attention, as on SDPA."""
    model, processor = load_model("tiny")
    model.eval()
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a broken weft across the loom"]
    inputs = processor(text=prompts, images=[torch.zeros(3, 64, 64)] * 2, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    decoder = torch.tensor([[2, 0, 40, 900]] * 2)
    model.set_attn_implementation("sdpa")
    expected = model(**inputs, decoder_input_ids=decoder).logits
    ready = ready_for_inference(model, "fp32")
    assert ready.config._attn_implementation == NAME
    torch.testing.assert_close(ready(**inputs, decoder_input_ids=decoder).logits, expected, rtol=0, atol=1e-4)
