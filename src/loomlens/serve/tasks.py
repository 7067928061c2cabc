"""The Florence-2 tasks the server offers, what each needs from the user, and request options.

The task list is a view of the one registry (`loomlens.data.tasks`); only the title and the
input hint are presentation, kept here. Validation lives here so the API and the page reject
the same things with the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loomlens.data.tasks import TASKS as OFFERED
from loomlens.data.tasks import parse_region
from loomlens.serve.errors import InputError


@dataclass(frozen=True)
class TaskInfo:
    """How the page and the API present one of the registry's offered tasks."""

    name: str
    title: str
    #: None: takes no text; "phrase": free text; "region": a box (4 loc tokens or 4 pixels).
    text: str | None
    #: What the answer mostly is: "boxes", "polygons" or "text" (the page uses it for layout).
    output: str
    hint: str = ""


_REGION_HINT = "a region: <loc_x1><loc_y1><loc_x2><loc_y2> (0..999) or x1,y1,x2,y2 in pixels"
_PRESENTATION = {  # title and input hint, by registry name; the task list itself is the registry's
    "od": ("Object detection", ""),
    "caption": ("Caption", ""),
    "detailed_caption": ("Detailed caption", ""),
    "more_detailed_caption": ("More detailed caption", ""),
    "dense_region_caption": ("Dense region caption", ""),
    "phrase_grounding": ("Phrase grounding", "a phrase to find, e.g. broken-weft"),
    "referring_expression_segmentation": ("Referring expression segmentation", "what to outline, e.g. broken-weft"),
    "region_to_segmentation": ("Region to segmentation", _REGION_HINT),
    "region_to_category": ("Region to category", _REGION_HINT),
    "ocr": ("OCR", ""),
    "ocr_with_region": ("OCR with region", ""),
}
TASKS: dict[str, TaskInfo] = {
    name: TaskInfo(
        name,
        _PRESENTATION.get(name, (name, ""))[0],
        {"text": "phrase", "region": "region", None: None}[task.needs],
        "boxes" if task.answer == "quads" else task.answer,
        _PRESENTATION.get(name, (name, ""))[1],
    )
    for name, task in OFFERED.items()
}

TILE_MODES = ("auto", "on", "off")
MAX_TEXT_CHARS = 500



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
    as `x1,y1,x2,y2` pixels (returns them, checked against the image size when given)."""
    try:
        pixels = parse_region(text)
    except ValueError as err:
        raise InputError(422, "bad_region", f"{err} (0..999 for <loc_N>)") from None
    if pixels is not None and not all(math.isfinite(v) for v in pixels):
        raise InputError(422, "bad_region", "region needs finite numbers")
    if pixels is not None and width is not None and height is not None:
        x1, y1, x2, y2 = pixels
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise InputError(422, "bad_region",
                             f"region {x1:g},{y1:g},{x2:g},{y2:g} lies outside the {width}x{height} image")
    return pixels
