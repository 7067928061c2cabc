"""Thresholds chosen as short decimals: the same cut as the scores give, printed exactly."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from loomlens.evaluate.thresholds import short_cut, threshold_text


def test_the_shortest_decimal_that_makes_the_same_cut() -> None:
    assert short_cut(0.87654321, 0.88) == 0.88  # rounded up at two places, not printed as 0.8765
    assert short_cut(0.2, 0.5) == 0.3
    assert short_cut(0.0, 0.9) == 0.1  # just above good frames scoring 0, said as 0.1, not 5e-324
    assert short_cut(0.4321, 0.87654321, near_high=True) == 0.8  # the kept score rounded down
    assert short_cut(0.5, 1.0) == 1.0


def test_scores_a_hair_apart_keep_every_digit() -> None:
    next_up = math.nextafter(0.3, 1.0)
    assert short_cut(0.3, next_up) == short_cut(0.3, next_up, near_high=True) == next_up
    assert threshold_text(next_up) == "0.30000000000000004"
    assert threshold_text(0.88) == "0.88" and threshold_text(1.0) == "1"


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans())
def test_the_cut_lies_between_and_reads_back_exactly(a: float, b: float, near_high: bool) -> None:
    low, high = min(a, b), max(a, b)
    if low == high:
        return
    t = short_cut(low, high, near_high=near_high)
    assert low < t <= high
    assert float(threshold_text(t)) == t
