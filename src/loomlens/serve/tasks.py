"""The Florence-2 tasks the server offers, what each needs from the user, and request options.

Names match `loomlens.predict` (the Prediction contract in docs/architecture.md). Validation
lives here so the API and the page reject the same things with the same words.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loomlens.serve.errors import InputError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    title: str
    #: None: takes no text; "phrase": free text; "region": a box (4 loc tokens or 4 pixels).
    text: str | None
    #: What the answer mostly is: "boxes", "polygons" or "text" (the page uses it for layout).
    output: str
    hint: str = ""


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("od", "Object detection", None, "boxes"),
        TaskInfo("caption", "Caption", None, "text"),
        TaskInfo("detailed_caption", "Detailed caption", None, "text"),
        TaskInfo("more_detailed_caption", "More detailed caption", None, "text"),
        TaskInfo("dense_region_caption", "Dense region caption", None, "boxes"),
        TaskInfo("phrase_grounding", "Phrase grounding", "phrase", "boxes",
                 "a phrase to find, e.g. broken-weft"),
        TaskInfo("referring_expression_segmentation", "Referring expression segmentation",
                 "phrase", "polygons", "what to outline, e.g. broken-weft"),
        TaskInfo("region_to_segmentation", "Region to segmentation", "region", "polygons",
                 "a region: <loc_x1><loc_y1><loc_x2><loc_y2> (0..999) or x1,y1,x2,y2 in pixels"),
        TaskInfo("region_to_category", "Region to category", "region", "text",
                 "a region: <loc_x1><loc_y1><loc_x2><loc_y2> (0..999) or x1,y1,x2,y2 in pixels"),
        TaskInfo("ocr", "OCR", None, "text"),
        TaskInfo("ocr_with_region", "OCR with region", None, "boxes"),
    )
}

TILE_MODES = ("auto", "on", "off")
MAX_TEXT_CHARS = 500

_LOC_REGION = re.compile(r"^\s*(?:<loc_(\d{1,3})>\s*){4}$")
_LOC = re.compile(r"<loc_(\d{1,3})>")
_PIXEL_REGION = re.compile(r"^\s*\(?\s*([-+0-9.eE]+)\s*[, ]\s*([-+0-9.eE]+)\s*[, ]\s*"
                           r"([-+0-9.eE]+)\s*[, ]\s*([-+0-9.eE]+)\s*\)?\s*$")


@dataclass(frozen=True)
class Options:
    """One request's options, validated. Requests with equal options can share a batch."""

    task: str = "od"
    text: str | None = None
    tile: str = "auto"
    score_threshold: float = 0.0


def parse_options(task, text, tile, score_threshold) -> Options:
    """Validate raw request fields (strings or None from a form or JSON) into `Options`.
    Raises `InputError` (422) with a message that names the field and the allowed values."""
    task = "od" if task is None or str(task).strip() == "" else str(task).strip()
    if task not in TASKS:
        raise InputError(422, "unknown_task",
                         f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    info = TASKS[task]
    text = None if text is None else str(text)
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise InputError(422, "text_too_long", f"text is longer than {MAX_TEXT_CHARS} characters")
    if text is not None and not text.strip():
        text = None
    if info.text is not None and text is None:
        raise InputError(422, "missing_text", f"task {task!r} needs text: {info.hint}")
    if info.text == "region":
        region_pixels(text)  # the format now; the bounds once the image size is known
    if info.text is None:
        text = None  # ignored by tasks that take none; keeps batching keys equal
    tile = "auto" if tile is None or str(tile).strip() == "" else str(tile).strip().lower()
    if tile not in TILE_MODES:
        raise InputError(422, "bad_tile", f"tile must be one of {', '.join(TILE_MODES)}, got {tile!r}")
    if score_threshold is None or str(score_threshold).strip() == "":
        score = 0.0
    else:
        try:
            score = float(score_threshold)
        except (TypeError, ValueError):
            raise InputError(422, "bad_score_threshold",
                             f"score_threshold must be a number in 0..1, got {score_threshold!r}") from None
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise InputError(422, "bad_score_threshold",
                             f"score_threshold must be in 0..1, got {score_threshold!r}")
    return Options(task=task, text=text, tile=tile, score_threshold=score)


def region_pixels(text: str, width: int | None = None, height: int | None = None
                  ) -> tuple[float, float, float, float] | None:
    """Recognise a region given as four `<loc_N>` tokens (returns None: already model text) or
    as `x1,y1,x2,y2` pixels (returns them, checked against the image size)."""
    if _LOC_REGION.match(text):
        values = [int(v) for v in _LOC.findall(text)]
        if any(v > 999 for v in values):
            raise InputError(422, "bad_region", "loc tokens run from <loc_0> to <loc_999>")
        if not (values[0] < values[2] and values[1] < values[3]):
            raise InputError(422, "bad_region", "region needs x1 < x2 and y1 < y2")
        return None
    m = _PIXEL_REGION.match(text)
    if not m:
        raise InputError(422, "bad_region",
                         f"cannot read a region from {text[:80]!r}; give "
                         "<loc_x1><loc_y1><loc_x2><loc_y2> (0..999) or x1,y1,x2,y2 in pixels")
    try:
        x1, y1, x2, y2 = (float(v) for v in m.groups())
    except ValueError:
        raise InputError(422, "bad_region", f"region {text[:80]!r} has a part that is not a number") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or not (x1 < x2 and y1 < y2):
        raise InputError(422, "bad_region", "region needs finite x1 < x2 and y1 < y2")
    if width is not None and height is not None and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
        raise InputError(422, "bad_region",
                         f"region {x1:g},{y1:g},{x2:g},{y2:g} lies outside the {width}x{height} image")
    return x1, y1, x2, y2
