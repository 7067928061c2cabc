"""Training memory: gradient checkpointing per tower, and the largest micro-batch that fits.

In: a (possibly peft-wrapped) native Florence-2. Out: the same model recomputing activations in
backward instead of keeping them (`enable_gradient_checkpointing`), or the micro-batch size and
gradient-accumulation count that keep a requested effective batch on a device's memory
(`find_micro_batch`).

The language side's BART layers are transformers `GradientCheckpointingLayer`s and switch on
through `gradient_checkpointing_enable`; the DaViT vision blocks are plain modules, so each block's
forward is wrapped in `torch.utils.checkpoint` here (module names and weights unchanged, so
adapters, checkpoints and merges are unaffected). Non-reentrant checkpointing is used throughout:
it needs no `requires_grad` on the inputs, which a frozen base with adapters does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, wraps

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MicroBatch", "enable_gradient_checkpointing", "find_micro_batch", "smaller_micro_batch"]

_MARK = "_loomlens_checkpointed"


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vision_blocks(model: nn.Module) -> list[nn.Module]:
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBlock

    return [m for m in _base(model).model.vision_tower.modules() if isinstance(m, Florence2VisionBlock)]


def _checkpoint_forward(module: nn.Module) -> None:
    """Make `module` recompute its forward in backward while training with gradients on."""
    if getattr(module, _MARK, False):
        return
    original = module.forward

    @wraps(original)
    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    module.forward = forward
    setattr(module, _MARK, True)


def enable_gradient_checkpointing(model: nn.Module, *, vision: bool = True, language: bool = True) -> dict[str, int]:
    """Recompute activations in backward on the chosen towers of a Florence-2.

    Args:
        model: a native `Florence2ForConditionalGeneration`, or a peft model wrapping one.
        vision: checkpoint every DaViT block (spatial + channel attention pair).
        language: checkpoint every BART encoder and decoder layer.

    Returns:
        How many layers of each tower now recompute: `{"vision": n, "language": m}`.
        Calling it again is harmless. Gradients are unchanged; activation memory falls at the
        cost of a second forward through each checkpointed layer.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    counts = {"vision": 0, "language": 0}
    if vision:
        blocks = _vision_blocks(model)
        for block in blocks:
            _checkpoint_forward(block)
        counts["vision"] = len(blocks)
    if language:
        text = _base(model).model.language_model
        layers = [m for m in text.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        counts["language"] = len(layers)
    return counts


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch `size` and the `accumulation` steps that make `size * accumulation` equal
    the requested effective batch."""

    size: int
    accumulation: int


def smaller_micro_batch(size: int, batch_size: int) -> int | None:
    """The next micro-batch to try after `size` samples ran out of memory: the largest divisor
    of `batch_size` at most half of `size`, or None when `size` is already one sample."""
    return next((d for d in range(size // 2, 0, -1) if batch_size % d == 0), None)


def find_micro_batch(step: Callable[[int], None], requested: int, device: str | torch.device) -> MicroBatch:
    """The largest micro-batch that trains on `device` without running out of memory.

    Args:
        step: runs one forward + backward at a given batch size (and clears the gradients);
            raising `torch.cuda.OutOfMemoryError` means that size does not fit.
        requested: the effective batch (samples per optimizer step).
        device: where training runs. On a CPU the requested batch is returned untried (memory
            there is the system's and an oversize batch swaps rather than failing).

    Returns:
        `MicroBatch(size, accumulation)` with `size` a divisor of `requested` (tried from
        `requested` down, at most half the previous size each time) and
        `size * accumulation == requested`. RuntimeError, saying what to lower, when not even
        one sample fits.
    """
    if requested < 1:
        raise ValueError(f"the batch must be 1 or more, got {requested}")
    if torch.device(device).type != "cuda":
        return MicroBatch(requested, 1)
    size = requested
    while True:
        try:
            step(size)
            return MicroBatch(size, requested // size)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            smaller = smaller_micro_batch(size, requested)
            if smaller is None:
                raise RuntimeError(
                    f"one sample does not fit in the memory of {device}: lower the image size or the LoRA rank, "
                    "turn on gradient checkpointing, or use a larger GPU"
                ) from None
            size = smaller
