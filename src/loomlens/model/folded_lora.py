"""LoRA layers that train in the cheapest exact form for their shapes and precision.

peft computes a LoRA layer as `base(x) + B(A(x)) * s`: two thin matmuls and three
elementwise passes over the layer's output, forward and backward. With `D = s B A` formed per
call (a small product), the same function is

- folded, `linear(x, W + D)`: one matmul. Used in fp32, where it is exact (a test checks
  loss and gradients against peft's). Under bf16/fp16 autocast the sum W + D is rounded to
  8 (11) bits before the matmul, which trained measurably worse, so it is not used there;
- dense, `linear(x, W) + linear(x, D)`: D is rounded on its own and the two outputs are
  summed, as in peft's form; used under autocast;
- low-rank, `linear(x, W) + linear(linear(x, A), s B)`: peft's own form under autocast, less
  its input casts: peft casts x to A's dtype (fp32) and autocast casts it back, two passes
  over a bf16 input (the output of GELU, of attention) per layer. Same loss and gradients.

With the frozen base stored in bf16 (`speed.precision: bf16-base`, `lower_frozen`) and the adapter
in fp32, no autocast runs: each call casts A and B (or D, formed in fp32) to the base's dtype,
a weight-sized cast. The forms are chosen as under autocast (dense or low-rank).

Autograd gives A and B the gradients they get the other way. Which form is cheaper depends on
the shapes, so each call decides (`lora_form`): wide activations over narrow layers (the tiny
model's first DaViT stage) fold in fp32 and take the dense form in bf16; few tokens over wide
layers (lm_head over a short answer, Florence-2-base at r=8) keep the low-rank form.
`python -m bench.lora_forms` times every form per shape; the figures and the training-quality
comparison are in docs/training.md. The adapter's weights, what peft saves and loads, are the
same whatever the form.

peft has no such mode (its `merge_adapter` is for inference: it stops gradients to A and B),
hence this module. The training recipe uses it (`speed.fold_lora: true`); prediction merges the
adapter once instead.
"""

from __future__ import annotations

import types
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ELEMENT_COST", "fold_lora", "lora_form"]

#: Time of one elementwise pass over one output element, in multiply-adds: fitted so that
#: `lora_form` picks the faster form of each layer `bench/lora_forms.py` times (the tiny
#: model's DaViT, encoder and lm_head layers, Florence-2-base's at r=8); the fit's range is in
#: docs/training.md.
ELEMENT_COST = 20
#: Elementwise passes over the output that peft's form makes beyond the base layer's,
#: forward and backward (B's output, the scaling, the sum; their gradients).
_PASSES = 8


def lora_form(tokens: int, fan_in: int, fan_out: int, rank: int, rounded: bool) -> Literal["fold", "dense", "peft"]:
    """The cheapest exact form of a LoRA layer for `tokens` rows of `fan_in` features into
    `fan_out` at rank `rank`, forward+backward: `fold` (fp32 only), `dense` (where matmuls
    round to bf16/fp16: under autocast or with a low-precision base) or `peft` (low-rank).

    peft's form costs three thin matmuls each way plus elementwise passes over the output.
    Folded, the weight's gradient costs a full matmul, and D is formed and differentiated per
    call. Dense costs a full matmul each way and for D's gradient; it is chosen only where that
    is no more multiply-adds than peft's thin ones (its saved elementwise passes are the margin)."""
    product = 3 * fan_in * fan_out * rank
    thin = 3 * tokens * rank * (fan_in + fan_out)
    if rounded:
        return "dense" if 3 * tokens * fan_in * fan_out + product <= thin else "peft"
    folded = tokens * fan_in * fan_out + product
    return "fold" if folded < thin + ELEMENT_COST * _PASSES * tokens * fan_out else "peft"


def _plain_adapter(layer: nn.Module) -> str | None:
    """The active adapter of a peft LoRA `layer` if folding it is exact: plain LoRA (not DoRA,
    no dropout, no LoRA bias) on an unquantised `nn.Linear`, the only adapter active, stored
    in the base weight's dtype or in fp32 over a bf16/fp16 base (`lower_frozen`), not merged.
    None otherwise."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or type(layer.base_layer) is not nn.Linear or layer.fan_in_fan_out:
        return None
    if len(layer.active_adapters) != 1 or layer.disable_adapters or layer.merged:
        return None
    name = layer.active_adapters[0]
    plain = (
        name in layer.lora_A and name not in layer.lora_variant and not layer.lora_bias.get(name, False)
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and layer.lora_A[name].weight.dtype in (layer.base_layer.weight.dtype, torch.float32)
    )
    return name if plain else None


def _folded_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's forward, computed folded, dense or low-rank where that is exact and cheaper
    (`lora_form`), under autocast or in the base's dtype over a low-precision base; bound to
    one layer."""
    name = None if args or kwargs else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    A, B, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    low = base.weight.dtype != A.dtype  # a bf16/fp16 base under an fp32 adapter: no autocast
    rounded = low or torch.is_autocast_enabled(x.device.type)
    form = lora_form(x.numel() // max(x.shape[-1], 1), self.in_features, self.out_features, self.r[name], rounded)
    if form == "fold":
        return F.linear(x, base.weight + (B @ A) * scale, base.bias)
    if not rounded:
        return type(self).forward(self, x)
    # Rounded forms: autocast casts (or, over a low-precision base, we cast) the small weights;
    # the input is cast only where it is not low-precision already (peft's forward would cast
    # a bf16 input to fp32 for A, and autocast back: two passes over it, per layer).
    dtype = base.weight.dtype if low else torch.get_autocast_dtype(x.device.type)
    if low:
        x = x.to(dtype)
    out = F.linear(x, base.weight, base.bias)
    if form == "peft":  # low-rank, the scale folded into B
        return out + F.linear(F.linear(x, A.to(dtype)), (B * scale).to(dtype))
    return out + F.linear(x, ((B @ A) * scale).to(dtype))


def fold_lora(model: nn.Module) -> int:
    """Make every plain LoRA layer of `model` compute in its cheapest exact form (`lora_form`); returns
    how many layers may fold. The layers stay so (their weights, saving and merging are
    peft's as before); a layer whose adapter stops being plain (merged, disabled, another
    adapter active) runs peft's own forward."""
    layers = [m for m in model.modules() if _plain_adapter(m) is not None]
    for layer in layers:
        layer.forward = types.MethodType(_folded_forward, layer)
    return len(layers)
