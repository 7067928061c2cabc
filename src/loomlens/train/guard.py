"""Watching a run that has gone wrong: collapse and a plateau at validation, an exploded
train loss at every step.

On real fabric a LoRA recipe can learn the defects, then fall into answering "no defect"
everywhere (defect-free frames make that answer nearly always right) while its val loss
climbs. Left alone, such a run spends most of its budget collapsed and ends with a `last`
adapter that finds nothing. After each evaluation the guard says what to do:

- `rollback`: the run collapsed after having learned something: go back to the best
  checkpoint (adapter and optimizer) and continue at a lower learning rate;
- `collapsed`: it collapsed again after `max_rollbacks` rollbacks: stop;
- `plateau`: it made no progress for `patience` evaluations: stop (early stopping);
- `continue` otherwise.

A collapse is either of: nearly every val frame that holds a defect answered with no box
(`empty_share`), or the val loss rising over `rising` evaluations in a row while the train
loss fell over the same stretch (over-fitting, the same run's other symptom).

Between evaluations, a train loss over `explode` times the largest of the run's first
`EARLY` losses means the weights have blown up (too high a learning rate): finite, so the NaN
check lets them through, and useless. The caller rolls back as for a NaN step, but to weights
from before the blow-up: a checkpoint older than the last sound loss (`sound_step`). The
factor sits far above a sound run's spread (docs/training.md, "The default recipe": the guard).

The guard's state is a plain dict, saved with each checkpoint so a resumed run judges the
same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: How many of a run's first train losses set the scale an exploded loss is measured against.
EARLY = 10
#: Nats per token no exploded loss is under: a uniform guess over Florence-2's 51,289 tokens.
#: A run that starts near 0 (continued from a model already fine-tuned on its data) keeps
#: a sound loss of a few tenths from counting as ten times its start.
FLOOR = math.log(51_289)


@dataclass(frozen=True)
class Evaluation:
    """What one validation measured: the selection score (higher is better), the val loss, the
    mean train loss since the previous evaluation, and the share of defect frames answered
    with nothing (None when not measured)."""

    step: int
    score: float
    val_loss: float
    train_loss: float | None = None
    empty_on_defects: float | None = None


@dataclass(frozen=True)
class Verdict:
    """`action`: continue, rollback, collapsed or plateau (the last two stop the run); `reason`:
    one line for the log and metrics.csv."""

    action: str
    reason: str = ""


@dataclass
class Guard:
    """Judges each evaluation and each train loss in turn (see the module docstring);
    `history`, `rollbacks`, `early` and `sound_step` are its whole state."""

    patience: int = 0
    rising: int = 3
    empty_share: float = 0.9
    max_rollbacks: int = 2
    explode: float = 10.0
    history: list[Evaluation] = field(default_factory=list)
    rollbacks: int = 0
    early: list[float] = field(default_factory=list)  # the run's first EARLY train losses that did not explode
    sound_step: int = 0  # the last step whose train loss did not explode

    @property
    def best(self) -> Evaluation | None:
        """The best evaluation so far (the earliest among equals)."""
        return max(self.history, key=lambda e: e.score, default=None)

    def judge(self, e: Evaluation) -> Verdict:
        """Record `e` and say what the run should do next."""
        best = self.best
        self.history.append(e)
        collapse = self._collapse(e, best)
        if collapse:
            if self.rollbacks >= self.max_rollbacks:
                return Verdict("collapsed", f"{collapse}, after {self.rollbacks} rollback(s): stopping")
            self.rollbacks += 1
            self.history = [h for h in self.history if h.step <= best.step]
            return Verdict("rollback", collapse)  # the caller says where it went back to
        improved = best is None or e.score > best.score
        since = 0 if improved else len([h for h in self.history if h.step > self.best.step])
        if self.patience and since >= self.patience:
            return Verdict("plateau", f"no better score for {since} evaluations (best at step {self.best.step})")
        return Verdict("continue")

    def exploded(self, loss: float, *, step: int) -> str:
        """Why the finite train loss `loss` of `step` is an explosion (over `explode` times the
        scale and over `FLOOR`), or "" when it is not (0 `explode`: never). A sound one becomes
        `sound_step`, and among the run's first `EARLY` it is recorded as the scale."""
        if self.explode and self.early and loss > max(self.explode * max(self.early), FLOOR):
            return f"train loss {loss:.4g}, over {self.explode:g}x the run's first ones (at most {max(self.early):.4g})"
        self.sound_step = step
        if len(self.early) < EARLY:
            self.early.append(loss)
        return ""

    def _collapse(self, e: Evaluation, best: Evaluation | None) -> str:
        """Why `e` is a collapse, or "" when it is not; only a run that has learned something
        (a best with a positive score) can collapse."""
        if best is None or best.score <= 0 or e.score >= best.score:
            return ""
        if e.empty_on_defects is not None and e.empty_on_defects >= self.empty_share:
            return f"collapse at step {e.step}: no box on {e.empty_on_defects:.0%} of val frames with a defect"
        recent = self.history[-(self.rising + 1):]
        if len(recent) == self.rising + 1 and all(b.val_loss > a.val_loss for a, b in zip(recent, recent[1:])):
            losses = [h.train_loss for h in recent]
            if None not in losses and losses[-1] < losses[0]:
                return (f"collapse at step {e.step}: val loss rose {self.rising} evaluations in a row "
                        f"({recent[0].val_loss:.3f} -> {e.val_loss:.3f}) while the train loss fell")
        return ""

    def state(self) -> dict:
        """The guard's state as JSON-ready data, for a checkpoint."""
        return {"history": [asdict(h) for h in self.history], "rollbacks": self.rollbacks, "early": self.early,
                "sound_step": self.sound_step, "patience": self.patience}

    def restore(self, state: dict) -> None:
        """Take back a `state()`."""
        self.history = [Evaluation(**h) for h in state.get("history", [])]
        self.rollbacks = int(state.get("rollbacks", 0))
        self.early = [float(x) for x in state.get("early", [])]
        self.sound_step = int(state.get("sound_step", 0))
