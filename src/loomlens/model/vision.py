"""The image path of a Florence-2 cut in two after its first DaViT stages.

Training with the first stages frozen, their output is the same every epoch: computing it once
per image and running only the rest each step saves most of the vision side's work (the early
stages run at the highest resolution; docs/training.md measures the tiny model).
`transformers` runs the stages in one loop (`Florence2VisionBackbone.forward`), so this module
replays that loop in two parts over the same submodules (LoRA-wrapped or not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Module-name prefixes of DaViT stage `i`'s layers: its patch embedding and its blocks.
STAGE_PREFIXES = ("model.vision_tower.convs.{i}.", "model.vision_tower.blocks.{i}.")


def stage_count(model: nn.Module) -> int:
    """Number of DaViT stages of a Florence-2 (plain or peft-wrapped)."""
    return len(_backbone(model).blocks)


def stage_of(name: str) -> int | None:
    """The DaViT stage a module or parameter name belongs to, None outside the stages."""
    name = name.removeprefix("base_model.model.")
    for prefix in STAGE_PREFIXES:
        head = prefix.split("{i}")[0]
        if name.startswith(head):
            return int(name[len(head):].split(".", 1)[0])
    return None


def split_image_path(model: nn.Module, stages: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                               Callable[[torch.Tensor], torch.Tensor]]:
    """`(head, tail)` with `tail(head(pixels)) == model.get_image_features(pixels).pooler_output`
    (the image features the text encoder reads): `head` runs the first `stages` DaViT stages
    on pixels (B, 3, H, W), `tail` the remaining stages and the projector. Raises ValueError
    unless 1 <= `stages` < the number of stages (with every stage frozen, cache the whole
    path instead)."""
    backbone = _backbone(model)
    projector = _florence(model).multi_modal_projector
    pairs = list(zip(backbone.convs, backbone.blocks))
    if not 1 <= stages < len(pairs):
        raise ValueError(f"can split after 1..{len(pairs) - 1} of the {len(pairs)} DaViT stages, not {stages}")

    def run(hidden: torch.Tensor, part: list) -> torch.Tensor:
        for conv, block in part:
            hidden = conv(hidden)
            for layer in block:
                hidden = layer(hidden)
        return hidden

    def head(pixels: torch.Tensor) -> torch.Tensor:
        return run(pixels.to(backbone.convs[0].conv.weight.dtype), pairs[:stages])

    def tail(hidden: torch.Tensor) -> torch.Tensor:
        return projector(run(hidden, pairs[stages:]))

    return head, tail


def _florence(model: nn.Module) -> nn.Module:
    """The `Florence2Model` inside a `Florence2ForConditionalGeneration` (plain or peft-wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _backbone(model: nn.Module) -> nn.Module:
    return _florence(model).vision_tower
