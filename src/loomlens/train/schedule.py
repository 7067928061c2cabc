"""Learning-rate schedules: linear warmup, then cosine or linear decay to zero (or constant),
over a number of steps planned once from the measured step rate when the run has a time budget.

The schedule is a pure function of where the run is, so it needs no state of its own to
resume. With a time budget the run is paced by time as well as by steps: the schedule's
position is whichever of the two is further along, so the rate reaches its end when the
budget does instead of being cut off mid-decay on a slow (or busy) machine. Time counts only
after the budget's first `GRACE`: the first steps are slow for one-off reasons (kernels
built, images processed on first use), and pacing on them moved the warmup by a
wall-clock-dependent amount, so two runs of the same seed on the same machine trained
differently (docs/training.md, "Time budgets"). A run that makes its steps within the budget
follows its steps alone, identically every time. Pretraining paces its schedule the same way.

Fine-tuning does not pace by time: it turns a time budget into a number of steps before the
first one (`plan_steps`: the budget divided by the measured seconds per step, rounded down to
two significant figures so that the jitter of one measurement rarely changes the plan), and
plans again after an evaluation, with the evaluations' measured cost, when the budget holds
notably more or fewer steps (`recipe.keep_to_budget`).
Warmup is then a share of the steps the run will really make, never of a nominal count it
cannot reach. Pretraining paces by time with `position`.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` as a number of steps: a fraction of `total_steps` if below 1, else steps."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


#: The share of a time budget spent before time paces the schedule.
GRACE = 0.1
#: The share of a time budget the planned steps may fill before an evaluation has been timed:
#: evaluations and saves take the rest.
PLAN_SHARE = 0.85
#: The share a plan made with timed evaluations fills (steps, evaluations and a final one): the
#: rest absorbs a machine's jitter.
TIMED_SHARE = 0.97


def plan_steps(*, nominal: int | None, time_budget: float | None, seconds_per_step: float,
               done_steps: int = 0, done_seconds: float = 0.0,
               evaluation: tuple[float, int] | None = None) -> int:
    """The steps a run will make: `nominal` (max_steps or epochs; None = no cap), or fewer when
    what is left of `time_budget` at `seconds_per_step` holds fewer (at least `done_steps + 1`).
    Without `evaluation` the steps fill `PLAN_SHARE` of it, rounded down to two significant
    figures so that one measurement's jitter rarely changes the plan; with `evaluation` =
    (seconds one takes, steps between two) they fill `TIMED_SHARE` with those evaluations and a
    final one, rounded down to three (the caller replans only past a threshold). Raises
    ValueError when neither a cap nor a budget is given."""
    if not time_budget:
        if nominal is None:
            raise ValueError("a run needs max_steps, epochs or a time_budget")
        return nominal
    left = max(0.0, time_budget - done_seconds)
    if evaluation is None:
        room, figures = left * PLAN_SHARE / max(seconds_per_step, 1e-9), 2
    else:
        eval_seconds, every = evaluation
        per_step = seconds_per_step + (eval_seconds / every if every else 0.0)
        room, figures = max(0.0, left * TIMED_SHARE - eval_seconds) / max(per_step, 1e-9), 3
    fits = done_steps + int(room)
    digits = max(0, len(str(fits)) - figures)
    fits = max(done_steps + 1, fits // 10**digits * 10**digits)
    return fits if nominal is None else min(nominal, fits)


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
