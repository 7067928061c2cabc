"""The Florence-2 tasks by loomlens name: their task token, what input they take, what they
answer, and the prompt they make."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from loomlens.data.florence_text import quantize


@dataclass(frozen=True)
class Task:
    """`needs`: None, "text" (a phrase) or "region" (a box); `answer`: "boxes" (label + 4
    locs), "polygons" (label + pairs of locs), "quads" (text + 8 locs, OCR) or "text"."""

    name: str
    token: str
    needs: Literal["text", "region"] | None
    answer: Literal["boxes", "polygons", "quads", "text"]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("od", "<OD>", None, "boxes"),
        Task("caption", "<CAPTION>", None, "text"),
        Task("detailed_caption", "<DETAILED_CAPTION>", None, "text"),
        Task("more_detailed_caption", "<MORE_DETAILED_CAPTION>", None, "text"),
        Task("dense_region_caption", "<DENSE_REGION_CAPTION>", None, "boxes"),
        Task("phrase_grounding", "<CAPTION_TO_PHRASE_GROUNDING>", "text", "boxes"),
        Task("referring_expression_segmentation", "<REFERRING_EXPRESSION_SEGMENTATION>", "text", "polygons"),
        Task("region_to_segmentation", "<REGION_TO_SEGMENTATION>", "region", "polygons"),
        Task("region_to_category", "<REGION_TO_CATEGORY>", "region", "text"),
        Task("ocr", "<OCR>", None, "text"),
        Task("ocr_with_region", "<OCR_WITH_REGION>", None, "quads"),
    )
}

_LOCS = re.compile(r"^\s*(?:<loc_\d{1,3}>\s*){4}$")
_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_PIXELS = re.compile(rf"^\s*\(?{_NUMBER}[, ]{_NUMBER}[, ]{_NUMBER}[, ]{_NUMBER}\)?\s*$")


def get_task(name: str) -> Task:
    """The task called `name` (`od`) or with token `name` (`<OD>`); ValueError otherwise."""
    for task in TASKS.values():
        if name in (task.name, task.token):
            return task
    raise ValueError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}")


def parse_region(text: str) -> tuple[float, float, float, float] | None:
    """Read a region: four `<loc_N>` tokens give None (already model text), a pixel box
    `x1,y1,x2,y2` gives its numbers; ValueError when it is neither or not x1 < x2, y1 < y2."""
    if _LOCS.match(text):
        values = [int(v) for v in re.findall(r"<loc_(\d+)>", text)]
        if not (values[0] < values[2] and values[1] < values[3]):
            raise ValueError(f"region {text!r} needs x1 < x2 and y1 < y2")
        return None
    m = _PIXELS.match(text)
    if not m:
        raise ValueError(f"cannot read a region from {text[:80]!r}: give x1,y1,x2,y2 in pixels or four <loc_N>")
    x1, y1, x2, y2 = (float(v) for v in m.groups())
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"region {text!r} needs x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def region_text(text: str, width: int, height: int) -> str:
    """A region as Florence-2 reads it: four `<loc_N>` tokens, passed through, or a pixel box
    `x1,y1,x2,y2` of a `width` x `height` image, quantised onto the 0..999 grid."""
    pixels = parse_region(text)
    if pixels is None:
        return "".join(text.split())
    x1, y1, x2, y2 = pixels
    if not (0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height):
        raise ValueError(f"region {text!r} is not a box inside the {width}x{height} image")
    return "".join(f"<loc_{quantize(v, s)}>" for v, s in ((x1, width), (y1, height), (x2, width), (y2, height)))


def prompt(task: Task, text: str | None, width: int, height: int) -> str:
    """The prompt for `task` on a `width` x `height` image: the task token, followed by the
    phrase or the region when the task needs one (ValueError when it is missing)."""
    if task.needs is None:
        return task.token
    if not text or not text.strip():
        raise ValueError(f"task {task.name!r} needs {'a phrase' if task.needs == 'text' else 'a region'} in `text`")
    return task.token + (text.strip() if task.needs == "text" else region_text(text, width, height))
