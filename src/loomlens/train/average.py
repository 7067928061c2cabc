"""A moving average of the adapter's weights: what a run evaluates, keeps and ships.

At a learning rate high enough to learn a CPU budget's worth, the weights of any one step sit
on the noise of its last few batches. Their exponential moving average (Polyak & Juditsky 1992;
the `ModelEMA` of YOLOv5 onward) lies nearer the middle of where the steps wander, and the
average, not the last step, is what validation scores, `best/` and `last/` hold and `predict`
runs. The raw weights go on training underneath; checkpoints keep them too, so a resume goes on
exactly. The decay ramps up as `min(decay, (1 + n) / (10 + n))` after n steps (TensorFlow's
`ExponentialMovingAverage` with `num_updates`), so early in a run the average spans about the
last tenth of the steps and never drags in the untrained start.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


def decay_at(decay: float, step: int) -> float:
    """The weight the average keeps at optimizer step `step` (1-based): the ramp, capped at `decay`."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The moving average of `params` (the adapter's trainable weights), kept in float32 beside
    them.

    Args:
        params: name -> weight, the names a checkpoint stores the raw weights under.
        decay: the most the average keeps of itself per step, in (0, 1).
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = dict(params), decay
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights of optimizer step `step` in (after `optimizer.step()`)."""
        keep = decay_at(self.decay, step)
        for name, p in self.params.items():
            self.shadow[name].mul_(keep).add_(p.detach().float(), alpha=1 - keep)

    @torch.no_grad()
    def restart(self) -> None:
        """Make the average the weights as they are now (after a rollback or a load)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach().float())

    @torch.no_grad()
    def install(self) -> None:
        """Make the weights the average for good (a run's end: the model then is the one saved)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """Put the average into the weights for the block (evaluate, save); yield copies of the
        raw weights by name, which are put back after it, also on an error."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        self.install()
        try:
            yield raw
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    @torch.no_grad()
    def load_raw(self, raw: Mapping[str, torch.Tensor] | None) -> None:
        """After a checkpoint's (averaged) adapter was loaded: take it as the average and put the
        raw weights it was saved with back into the weights; with none (a checkpoint saved
        without averaging), training goes on from the adapter. Raises ValueError when the saved
        names are not this adapter's."""
        self.restart()
        if not raw:
            return
        if raw.keys() != self.params.keys():
            missing = sorted(self.params.keys() - raw.keys())[:3]
            raise ValueError(f"the checkpoint's raw weights are not this adapter's ({len(raw)} saved, "
                             f"{len(self.params)} here; missing e.g. {missing}): resume with the settings it was "
                             "trained with")
        for name, p in self.params.items():
            p.copy_(raw[name].to(p.dtype))
