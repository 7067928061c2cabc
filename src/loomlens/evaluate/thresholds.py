"""Operating thresholds a person copies from a report into the line's settings.

A cut found on scores lies anywhere between two of them; written as a rounded number it can
land on the wrong side of one (`score >= 0.2` flags every frame scoring 0.2 where the cut was
just above it). So a threshold is chosen as the decimal with the fewest digits that still
makes the same cut, and printed with every digit it has: `score >= printed` is `score >=
threshold`, the cut that was measured.
"""

from __future__ import annotations

import math
from fractions import Fraction


def short_cut(low: float, high: float, *, near_high: bool = False) -> float:
    """A threshold t with `low < t <= high` (`low < high`) written with the fewest decimal
    places: `score >= t` keeps exactly the scores above `low` of a set with none strictly
    between the two. Of the shortest, `low` rounded up, or with `near_high` `high` rounded down.
    """
    # Exact arithmetic: a decimal above this midpoint reads back as a float above `low`.
    middle = (Fraction(low) + Fraction(math.nextafter(low, math.inf))) / 2
    top = Fraction(high)
    places = 0
    while True:
        scale = 10**places
        if near_high:
            decimal = Fraction(math.floor(top * scale), scale)
        else:
            decimal = Fraction(math.floor(middle * scale) + 1, scale)
        if low < float(decimal) <= high:
            return float(decimal)
        places += 1


def threshold_text(threshold: float) -> str:
    """`threshold` as text that reads back as exactly it: six significant digits where they
    do (as `short_cut`'s thresholds mostly are), else all its digits."""
    text = f"{threshold:.6g}"
    return text if float(text) == threshold else repr(float(threshold))
