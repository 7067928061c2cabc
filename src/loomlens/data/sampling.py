"""Which samples an epoch shows, and with what mix: defect-free frames held to a share of every
batch, rare classes repeated.

Real fabric is mostly good fabric. Trained on the natural mix, a detector learns that "no
defect" is nearly always right and collapses to empty answers; trained without negatives, it
flags clean cloth. So each batch gets a fixed share of defect-free samples (the rest are
dropped for this epoch, other ones next epoch), and an image holding a rare class is shown
more often by repeat-factor sampling (LVIS, Gupta et al. 2019, section 3.2: an image repeats
`max(1, sqrt(t / f(c)))` times for its rarest class c, where f(c) is the share of images with
c; fractional repeats are drawn).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: A sample's classes; None for a sample whose answer is not boxes (a caption): never a negative.
Labels = frozenset[str] | None


@dataclass(frozen=True)
class Balance:
    """`negative_share`: the share of each batch given to defect-free samples (None: the data's
    own mix). `repeat_threshold`: t of repeat-factor sampling (0: no repeats)."""

    negative_share: float | None = 0.25
    repeat_threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.negative_share is not None and not 0 <= self.negative_share < 1:
            raise ValueError(f"negative_share must be in [0, 1) or null, got {self.negative_share}")
        if self.repeat_threshold < 0:
            raise ValueError(f"repeat_threshold must be >= 0, got {self.repeat_threshold}")


def repeat_factors(labels: Sequence[Labels], threshold: float) -> list[float]:
    """Repeat factor of each sample: `max(1, sqrt(threshold / f(c)))` over its classes c, 1 for
    samples without classes. f(c) counts every sample, negatives included."""
    if not threshold:
        return [1.0] * len(labels)
    counts = Counter(c for classes in labels if classes for c in classes)
    total = len(labels)
    return [max([1.0, *(math.sqrt(threshold * total / counts[c]) for c in classes)]) if classes else 1.0
            for classes in labels]


def _repeated(indices: list[int], factors: Sequence[float], rng: random.Random) -> list[int]:
    """Each index `floor(r)` times, plus once more with chance `r - floor(r)`."""
    out = []
    for i in indices:
        r = factors[i]
        out += [i] * (math.floor(r) + (rng.random() < r - math.floor(r)))
    return out


def balanced_batches(
    indices: Sequence[int], labels: Sequence[Labels], *, batch_size: int, balance: Balance, rng: random.Random
) -> list[list[int]]:
    """One epoch's batches over `indices` (positions into `labels`).

    Args:
        indices: the samples to draw from (one task's, or all).
        labels: classes of every sample of the dataset; `frozenset()` = defect-free.
        batch_size: samples per batch.
        balance: the negative share and the repeat threshold.
        rng: the epoch's generator (the plan stays a pure function of seed and epoch).

    Returns:
        Batches of sample indices; each full batch holds `round(batch_size * negative_share)`
        defect-free samples while there are enough. The last batch may be short.
    """
    factors = repeat_factors(labels, balance.repeat_threshold)
    negatives = [i for i in indices if labels[i] == frozenset()]
    others = _repeated([i for i in indices if labels[i] != frozenset()], factors, rng)
    rng.shuffle(negatives)
    rng.shuffle(others)
    if balance.negative_share is None or not others or not negatives:
        pool = others + negatives
        rng.shuffle(pool)
        return [pool[j : j + batch_size] for j in range(0, len(pool), batch_size)]
    per_negative = min(batch_size - 1, round(batch_size * balance.negative_share))
    per_other = batch_size - per_negative
    batches = []
    for b in range(math.ceil(len(others) / per_other)):
        batch = others[b * per_other : (b + 1) * per_other] + negatives[b * per_negative : (b + 1) * per_negative]
        rng.shuffle(batch)
        batches.append(batch)
    return batches
