"""Learning-rate schedules: linear warmup, then cosine or linear decay to zero (or constant)."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` as a number of steps: a fraction of `total_steps` if below 1, else steps."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepping `lr_factor` once per optimizer step (its state saves and resumes)."""
    lr_factor(0, warmup, total, kind)  # fail on a bad kind now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, kind))
