"""A loaded model made ready to answer: its adapter merged into the weights, the weights in the
precision the machine computes fastest, and on a CPU each attention call on its fastest kernel
(`model/attention.py`).

Merging matters on a CPU: an unmerged LoRA layer computes x A B beside x W, and on the tiny
model's vision MLPs (32 -> 128 at rank 32) that is more work than the layer itself. bf16 weights
matter where the hardware has bf16 (AMX or AVX512-BF16 on a CPU, any recent GPU): on the demo's
val split (164 frames, batch 8, 2 cores with AMX, 2026-12-02) the merged model in bf16 took
22.5 ms an image against 30.0 ms merged in fp32 and 37.9 ms unmerged in fp32 (bf16 autocast
over fp32 weights: 24.3 ms). mAP50 moved by rounding only: 0.474 and, with the attention and
pixel changes of the same day, 0.453, against 0.464 in fp32 both times. The model was trained
under bf16 autocast, so bf16 is not a new condition for it.
"""

from __future__ import annotations

from typing import Literal

import torch

from loomlens.model.attention import use_shape_aware_attention
from loomlens.model.runtime import cpu_has_bf16

__all__ = ["PRECISIONS", "Precision", "ready_for_inference", "resolve_precision"]

#: What an inference `precision` may be: `auto` resolves to one of the other two.
PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["fp32", "bf16"]


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> Precision:
    """The weights' precision for `precision` on `device`: `fp32` and `bf16` as given; `auto`
    is bf16 on a CUDA GPU that supports it and on a CPU with bf16 instructions, else fp32
    (elsewhere bf16 is emulated and slower). Raises ValueError for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"


def ready_for_inference(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """`model` in eval mode with any peft adapter merged into its weights (the peft wrapper
    removed), its weights cast to `precision` and, on a CPU, shape-aware attention (measured
    there only). Returns the model to use from then on."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if next(model.parameters()).device.type == "cpu":
        use_shape_aware_attention(model)
    return model.eval()
