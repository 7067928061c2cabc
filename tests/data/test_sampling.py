"""Balanced batches: a fixed share of defect-free samples, rare classes repeated, reproducible."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loomlens.data.sampling import Balance, balanced_batches, repeat_factors

E = frozenset()


def _labels() -> list:
    # 40 defect-free, 18 'hole', 2 'knot' (rare), 4 captions (no boxes: never negatives).
    return [E] * 40 + [frozenset({"hole"})] * 18 + [frozenset({"knot"})] * 2 + [None] * 4


def test_each_full_batch_holds_the_negative_share() -> None:
    labels = _labels()
    batches = balanced_batches(range(len(labels)), labels, batch_size=8, balance=Balance(0.25, 0.0),
                               rng=random.Random(0))
    full = [b for b in batches if len(b) == 8]
    assert full and all(sum(labels[i] == E for i in b) == 2 for b in full)
    shown = Counter(i for b in batches for i in b)
    assert all(shown[i] == 1 for i in range(40, 64))  # every positive and caption once, no repeats at t=0
    assert sum(shown[i] for i in range(40)) <= 2 * len(batches)  # most negatives wait for another epoch


def test_rare_classes_repeat() -> None:
    labels = _labels()
    factors = repeat_factors(labels, 0.1)
    assert factors[0] == 1.0 and factors[-1] == 1.0  # negatives and captions
    assert factors[40] == 1.0  # hole: in 18/64 samples, above t
    assert factors[58] == pytest.approx((0.1 * 64 / 2) ** 0.5)  # knot: sqrt(t / f) = 1.79
    shown = Counter()
    for epoch in range(200):
        for b in balanced_batches(range(len(labels)), labels, batch_size=8, balance=Balance(0.25, 0.1),
                                  rng=random.Random(epoch)):
            shown.update(b)
    assert shown[58] / 200 == pytest.approx(factors[58], abs=0.1)
    assert shown[40] == 200


def test_natural_mix_and_reproducibility() -> None:
    labels = _labels()
    natural = balanced_batches(range(len(labels)), labels, batch_size=8, balance=Balance(None, 0.0),
                               rng=random.Random(3))
    assert sorted(i for b in natural for i in b) == list(range(len(labels)))
    again = balanced_batches(range(len(labels)), labels, batch_size=8, balance=Balance(None, 0.0),
                             rng=random.Random(3))
    assert natural == again


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="negative_share"):
        Balance(negative_share=1.0)
    with pytest.raises(ValueError, match="repeat_threshold"):
        Balance(repeat_threshold=-1)
