"""The Florence-2 text format: the 0..999 location grid, boxes <-> text.

Florence-2 writes a box as `label<loc_x1><loc_y1><loc_x2><loc_y2>`, each coordinate put in one
of 1000 bins per axis, and several boxes back to back with no separator. The grid follows the
Florence-2 processor exactly: `floor(v / size * 1000)` clamped to 0..999 one way, bin centres
`(q + 0.5) * size / 1000` the other, so a round trip is off by at most half a bin (up to a
whole bin for a box edge pair in one bin, decoded at that bin's edges: `_axis`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable

from loomlens.data.records import Box, Polygon

BINS = 1000
#: Float error, in bins, that `quantize` forgives: a box carried to another picture size by
#: multiplying (a frame squeezed to the model's input) lands a hair under a bin edge it sat on
#: (1 coordinate in 1000: x * (256 / w) / 256 * 1000 < floor(x * 1000 / w)), which no label means.
FLOAT_SLACK = 1e-9

_TAG = re.compile(r"<[^<>]*>")
_LOC = re.compile(r"<loc_([0-9]+)>")
# Florence separates the polygons of one object with these; in box text they never occur.
_POLYGON_SEPARATORS = frozenset({"<sep>", "<poly>", "</poly>"})


class LabelError(ValueError):
    """A class name that cannot survive the trip to Florence-2 text and back."""


def validate_label(name: str) -> str:
    """Check that `name` round-trips through `boxes_to_text` -> `parse_text`; return it with
    surrounding whitespace removed (the parser strips it too) and in Unicode NFC form (so "Ö"
    typed on two systems is one class). Any printable text passes: Florence-2's tokenizers are
    byte-level and spell any UTF-8 ("Ölfleck", "破损"). Raises `LabelError` for an empty name,
    control or invisible characters, and `<` or `>` (they would read as tokens)."""
    clean = unicodedata.normalize("NFC", name.strip())
    if not clean:
        raise LabelError("empty class name; give every box a label such as 'drop'")
    bad = sorted({c for c in clean if not (c == " " or c.isprintable())})
    if bad:
        raise LabelError(
            f"class name {name!r} has control or invisible characters {bad}; "
            "use letters, digits, spaces and punctuation only, such as 'broken weft'"
        )
    if "<" in clean or ">" in clean:
        raise LabelError(
            f"class name {name!r} contains '<' or '>', which Florence-2 text reads as a token; "
            "rename the class"
        )
    return clean


def quantize(v: float, size: int) -> int:
    """Pixel coordinate `v` in an axis of `size` pixels -> bin `floor(v / size * 1000)` in 0..999.
    `v == size` (a box touching the far edge) gives 999, never 1000; a value `FLOAT_SLACK` under
    a bin edge is that bin's (float error of a rescaled box)."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return min(BINS - 1, max(0, math.floor(v / size * BINS + FLOAT_SLACK)))


def dequantize(q: float, size: int) -> float:
    """Bin `q` (0..999; a fractional mean bin too) in an axis of `size` pixels -> the pixel at
    the bin's centre."""
    return (q + 0.5) * size / BINS


def _quantized(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    return (
        quantize(box.x1, width),
        quantize(box.y1, height),
        quantize(box.x2, width),
        quantize(box.y2, height),
    )


def boxes_to_text(boxes: Iterable[Box], width: int, height: int) -> str:
    """Boxes in pixels of a `width` x `height` image -> `label<loc_x1><loc_y1><loc_x2><loc_y2>...`.

    Reading order, so that the same boxes always give the same text: top to bottom by the
    quantised y1, then left to right by the quantised x1 (ties: y2, x2, label). Raises
    `LabelError` for a label that would not parse back (see `validate_label`)."""
    keyed = []
    for box in boxes:
        qx1, qy1, qx2, qy2 = _quantized(box, width, height)
        keyed.append(((qy1, qx1, qy2, qx2, box.label), validate_label(box.label)))
    keyed.sort(key=lambda item: item[0])
    return "".join(
        f"{label}<loc_{qx1}><loc_{qy1}><loc_{qx2}><loc_{qy2}>"
        for (qy1, qx1, qy2, qx2, _), label in keyed
    )


def _loc_value(digits: str) -> int:
    # Anything over four digits is out of range anyway; int() of a huge string would raise.
    return int(digits) if len(digits) <= 4 else BINS


def _runs(
    text: str, default_label: str | None, polygons: bool
) -> tuple[list[tuple[str, list[int]]], int]:
    """Split model text into runs of (label, loc values).

    A run starts at a loc token and lasts while only loc tokens, whitespace and noise tags
    (`</s>`, `<s>`, `<pad>`, echoed task tokens) follow; its label is the text before it,
    stripped. A run with no text before it continues the previous label (Florence writes
    `<sep>` between the polygons of one object), else takes `default_label`, else stays empty
    for the caller to drop. Text that a tag ends before any loc (`drop</s>hole<loc_1>...`) is
    no label: a label never holds a tag. Returns the runs and a count of dropped parts (such
    text, and text left at the end with no locs after it).
    """
    runs: list[tuple[str, list[int]]] = []
    pending = ""  # text since the last run closed: the next run's label
    current: tuple[str, list[int]] | None = None
    pos, dropped = 0, 0
    for tag in _TAG.finditer(text + "<>"):  # the sentinel tag flushes the trailing text
        piece = text[pos : tag.start()]
        pos = tag.end()
        if piece.strip() and current is not None:
            runs.append(current)
            current = None
        pending += piece
        loc = _LOC.fullmatch(tag.group())
        if loc:
            if current is None:
                last = runs[-1][0] if runs else ""
                current = (pending.strip() or last or default_label or "", [])
                pending = ""
            current[1].append(_loc_value(loc.group(1)))
        elif polygons and tag.group() in _POLYGON_SEPARATORS and current is not None:
            runs.append(current)
            current = None
        elif current is None and pending.strip() and pos < len(text) and not (
                polygons and tag.group() in _POLYGON_SEPARATORS):  # a polygon's label precedes its <poly>
            dropped, pending = dropped + 1, ""
    if current is not None:
        runs.append(current)
    return runs, dropped + int(bool(pending.strip()))


def _axis(lo: int, hi: int, size: int) -> tuple[float, float]:
    """Decode one axis (`lo <= hi`) at bin centres; both ends in one bin (a box under a bin
    wide) decode to that bin's edges instead, so the box keeps a positive size."""
    if lo == hi:
        return lo * size / BINS, (lo + 1) * size / BINS
    return dequantize(lo, size), dequantize(hi, size)


def parse_text(
    text: str, width: int, height: int, default_label: str | None = None
) -> tuple[list[Box], int]:
    """Florence-2 box text -> (boxes in pixels of a `width` x `height` image, dropped count).

    Labels are the text before each group of four loc tokens, stripped; hyphens, spaces and
    capitals survive. Several groups after one label share it (`phrase<4 locs><4 locs>` is
    how grounding answers two boxes). `</s>`, `<s>`, `<pad>` and any other non-loc tag are
    ignored. Dropped and counted, never raised: a group of fewer than four locs, a loc above
    999, a reversed box (x2 < x1 or y2 < y1: Florence-2 writes the top-left corner first, the
    class grammar of `infer/grammar.py` forbids anything else, and Florence-2's own processor
    returns such a box reversed, which matches nothing), an empty label when no
    `default_label` is given (pass the phrase for grounding output), and trailing text with
    no locs. Never raises on any string.
    """
    runs, dropped = _runs(text, default_label, polygons=False)
    boxes: list[Box] = []
    for label, locs in runs:
        dropped += int(len(locs) % 4 > 0)
        for i in range(0, len(locs) - 3, 4):
            qx1, qy1, qx2, qy2 = locs[i : i + 4]
            if not label or max(qx1, qy1, qx2, qy2) >= BINS or qx2 < qx1 or qy2 < qy1:
                dropped += 1
                continue
            x1, x2 = _axis(qx1, qx2, width)
            y1, y2 = _axis(qy1, qy2, height)
            boxes.append(Box(label, x1, y1, x2, y2))
    return boxes, dropped


def parse_polygons(
    text: str, width: int, height: int, default_label: str | None = None
) -> tuple[list[Polygon], int]:
    """Florence-2 segmentation text -> (polygons in pixels, dropped count).

    Each polygon is a label followed by an even number (at least six) of loc tokens, read as
    x, y pairs; `<sep>`, `<poly>` and `</poly>` separate polygons, and one with no label of
    its own continues the previous label (or takes `default_label`, the referring phrase).
    An odd or too short run, a loc above 999 or a missing label is dropped and counted.
    Never raises on any string."""
    runs, dropped = _runs(text, default_label, polygons=True)
    polygons: list[Polygon] = []
    for label, locs in runs:
        if not label or len(locs) < 6 or len(locs) % 2 or max(locs) >= BINS:
            dropped += 1
            continue
        points = tuple(
            (dequantize(locs[i], width), dequantize(locs[i + 1], height))
            for i in range(0, len(locs), 2)
        )
        polygons.append(Polygon(label, points))
    return polygons, dropped
