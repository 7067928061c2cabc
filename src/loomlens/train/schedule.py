"""Learning-rate schedules: linear warmup, then cosine or linear decay to zero (or constant).

The schedule is a pure function of where the run is, so it needs no state of its own to
resume. With a time budget the run is paced by time as well as by steps: the schedule's
position is whichever of the two is further along, so the rate reaches its end when the
budget does instead of being cut off mid-decay on a slow (or busy) machine. Time counts only
after the budget's first `GRACE`: the first steps are slow for one-off reasons (kernels
built, images processed on first use), and pacing on them moved the warmup by a
wall-clock-dependent amount, so two runs of the same seed on the same machine trained
differently (docs/training.md, "Time budgets"). A run that makes its steps within the budget
follows its steps alone, identically every time. Pretraining paces its schedule the same way.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` as a number of steps: a fraction of `total_steps` if below 1, else steps."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


#: The share of a time budget spent before time paces the schedule.
GRACE = 0.1


def position(step: int, seconds: float, total_steps: int, time_budget: float | None = None) -> float:
    """Where the run is on the schedule, in steps: `step`, or further when the `seconds`
    spent after the first `GRACE` of a `time_budget` run ahead of the steps (the schedule
    then ends with the budget)."""
    if not time_budget:
        return float(step)
    grace = GRACE * time_budget
    return max(float(step), total_steps * (seconds - grace) / (time_budget - grace))


def lr_factor(step: float, warmup: int, total: int, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate at schedule position `step` (0-based, may be
    fractional)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
