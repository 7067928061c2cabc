"""The one task registry: every Florence-2 task by loomlens name, with its task token, what its
prompt takes, what it answers and what `convert` can make of it.

In: a task name (`od`) or token (`<OD>`). Out: a frozen `Task`, and `prompt` builds the text the
model reads. Everything else that speaks of tasks (convert, the dataset's task order, the
Predictor, serve, the run's trained tasks) is a view of `REGISTRY`. Torch-free, like all of data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from loomlens.data.florence_text import quantize

Needs = Literal["text", "region"]
Answer = Literal["boxes", "polygons", "quads", "text"]
#: What `convert` writes for a task: `boxes` (one sample, all boxes; a negative answers empty),
#: `boxes_if_any` (one sample when there are boxes), `per_class` (one sample per class present,
#: the class in the prompt) or `caption` (a template caption).
Samples = Literal["boxes", "boxes_if_any", "per_class", "caption"]


@dataclass(frozen=True)
class Task:
    """One Florence-2 task. `needs`: None, "text" (a phrase) or "region" (a box) after the
    token; `answer`: "boxes" (label + 4 locs), "polygons" (label + pairs of locs), "quads"
    (text + 8 locs, OCR) or "text"; `samples`: what `convert` makes of an annotated image
    (None: nothing); `offered`: whether loomlens predicts and serves it."""

    name: str
    token: str
    needs: Needs | None
    answer: Answer
    samples: Samples | None = None
    offered: bool = True

    @property
    def lists_every_box(self) -> bool:
        """Whether a converted sample's answer holds every box of its frame (what one more
        pasted defect must join, `loomlens.data.paste`)."""
        return self.samples in ("boxes", "boxes_if_any")


#: Every task Florence-2 was trained on, the offered ones in the order the API lists them.
REGISTRY: dict[str, Task] = {
    t.name: t
    for t in (
        Task("od", "<OD>", None, "boxes", samples="boxes"),
        Task("caption", "<CAPTION>", None, "text", samples="caption"),
        Task("detailed_caption", "<DETAILED_CAPTION>", None, "text"),
        Task("more_detailed_caption", "<MORE_DETAILED_CAPTION>", None, "text"),
        Task("dense_region_caption", "<DENSE_REGION_CAPTION>", None, "boxes", samples="boxes_if_any"),
        Task("phrase_grounding", "<CAPTION_TO_PHRASE_GROUNDING>", "text", "boxes", samples="per_class"),
        Task("referring_expression_segmentation", "<REFERRING_EXPRESSION_SEGMENTATION>", "text", "polygons"),
        Task("region_to_segmentation", "<REGION_TO_SEGMENTATION>", "region", "polygons"),
        Task("region_to_category", "<REGION_TO_CATEGORY>", "region", "text"),
        Task("ocr", "<OCR>", None, "text"),
        Task("ocr_with_region", "<OCR_WITH_REGION>", None, "quads"),
        Task("region_to_description", "<REGION_TO_DESCRIPTION>", "region", "text", offered=False),
        Task("open_vocabulary_detection", "<OPEN_VOCABULARY_DETECTION>", "text", "boxes", offered=False),
        Task("region_proposal", "<REGION_PROPOSAL>", None, "boxes", offered=False),
    )
}
#: The tasks loomlens predicts and serves (the Prediction contract's task names).
TASKS: dict[str, Task] = {name: t for name, t in REGISTRY.items() if t.offered}
#: Every Florence-2 task token.
TASK_TOKENS: tuple[str, ...] = tuple(t.token for t in REGISTRY.values())
#: The tasks `convert` can make, in the `grouped` training order (the seed's best): OD, dense
#: region captions, grounding, captions.
CONVERTIBLE: tuple[str, ...] = ("od", "dense_region_caption", "phrase_grounding", "caption")

_LOCS = re.compile(r"^\s*(?:<loc_\d{1,3}>\s*){4}$")
_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_PIXELS = re.compile(rf"^\s*\(?{_NUMBER}[, ]{_NUMBER}[, ]{_NUMBER}[, ]{_NUMBER}\)?\s*$")


def get_task(name: str) -> Task:
    """The offered task called `name` (`od`) or with token `name` (`<OD>`); ValueError
    otherwise, listing the names."""
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
