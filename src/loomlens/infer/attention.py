"""Attention kernels chosen per call shape, for inference on a CPU.

In: a Florence-2 model. Out: the same model with every attention layer routed through
`shape_aware`. Florence-2 runs three kinds of attention and no one CPU kernel is fastest for all:
DaViT window attention (64-token windows, narrow heads) and BART's attention run fastest on SDPA;
DaViT channel attention, whose "head dim" is the number of image tokens over a small score
matrix, runs fastest on the plain matmul-softmax-matmul ("math") path, since SDPA's CPU kernel
tiles along that long axis (timings in docs/benchmarks.md).

`shape_aware` sends heads wider than `WIDE_HEAD` to the math path and the rest to SDPA; it is
registered with transformers' `AttentionInterface`, so the native Florence-2 classes call it,
and with its `AttentionMaskInterface` as SDPA's masks: transformers builds no mask at all for
an attention name it has no mask function for, and a batch whose prompts pad differently then
attended to its padding.
Training keeps its own choice (`train.recipe.attention_implementation`): eager on a CPU,
where SDPA's bf16 backward on the windows is slow.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["NAME", "WIDE_HEAD", "shape_aware", "use_shape_aware_attention"]

#: The name the kernel is registered under (`model.config._attn_implementation`).
NAME = "loomlens_shape_aware"
#: Head dims above this take the math path: DaViT's channel attention in every Florence-2 size.
WIDE_HEAD = 128


def _math_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **_):
    """softmax(q k^T * scale + mask) v, returned as (batch, tokens, heads, dim) like SDPA's."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA's kind: True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def shape_aware(module, query, key, value, attention_mask=None, **kwargs):
    """transformers' attention signature: math for heads wider than `WIDE_HEAD`, else SDPA."""
    if query.shape[-1] > WIDE_HEAD:
        return _math_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_shape_aware_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make every attention layer of `model` (vision and text) run through `shape_aware`, with
    the masks transformers builds for SDPA."""
    AttentionInterface.register(NAME, shape_aware)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model
