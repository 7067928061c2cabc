"""Plain data shared by every floor: pixel boxes, annotated images, polygons and problems.

Coordinates are pixels in the image's own size, origin top-left, x to the right, y down;
a box spans the continuous interval [x1, x2) x [y1, y2), so a box touching the right edge
has x2 == width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Box:
    """One labelled box in pixels: `x1 < x2`, `y1 < y2`, all finite; `score` is optional."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None

    def __post_init__(self) -> None:
        # Fail where a bad box is made, not three floors later in a metric.
        coords = (self.x1, self.y1, self.x2, self.y2)
        if not all(math.isfinite(c) for c in coords):
            raise ValueError(f"Box {self.label!r} has a non-finite coordinate: {coords}")
        if not (self.x1 < self.x2 and self.y1 < self.y2):
            raise ValueError(f"Box {self.label!r} needs x1 < x2 and y1 < y2, got {coords}")

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def hflip(self, image_width: float) -> Box:
        """The same box in the horizontally mirrored image: x1' = W - x2, x2' = W - x1."""
        return replace(self, x1=image_width - self.x2, x2=image_width - self.x1)

    def vflip(self, image_height: float) -> Box:
        """The same box in the vertically mirrored image: y1' = H - y2, y2' = H - y1."""
        return replace(self, y1=image_height - self.y2, y2=image_height - self.y1)

    def scaled(self, sx: float, sy: float) -> Box:
        """The same box in the image resized by `sx` across and `sy` down."""
        return replace(self, x1=self.x1 * sx, y1=self.y1 * sy, x2=self.x2 * sx, y2=self.y2 * sy)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two pixel boxes (0 when they do not overlap)."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a.width * a.height + b.width * b.height - inter)


@dataclass
class ImageRecord:
    """An annotated image. `image` is relative to the dataset root; no boxes = a negative,
    unless `dropped` (boxes its annotation held that a reader refused) says it had some.
    `split` ("train" | "val" | "test") is the dataset's own split when its format records one
    (a data.yaml's lists, a CVAT subset, VOC's ImageSets/Main lists); None leaves it to the
    folders or the shuffle."""

    image: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    source: str = ""
    dropped: int = 0
    split: str | None = None


@dataclass(frozen=True)
class Polygon:
    """A labelled polygon in pixels, as `[(x, y), ...]` with at least three points."""

    label: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Something wrong in the input, reported instead of raised so one bad file never aborts
    a conversion: `file` (relative to the dataset root), `line` (1-based, when known), what is
    wrong (`message`) and what to do about it (`fix`); `image`, the image file it skipped, when
    it skipped one (so that image is not reported again as unannotated)."""

    file: str
    line: int | None = None
    message: str
    fix: str = ""
    image: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class ReadResult:
    """What an annotation reader returns: the good records, the problems met, the class
    names the annotations declare, in their own order (YOLO classes.txt, COCO categories), and
    what gave records their `split` (VOC's `ImageSets/Main` folders, the data.yaml's path,
    "CVAT subsets"), for the report to say where the dataset's own split came from."""

    records: list[ImageRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    split_from: list[str] = field(default_factory=list)

    def add(self, part: ReadResult) -> None:
        """Take in what one more file gave: its records and problems, and its classes not
        already known (so the first file's class order leads)."""
        self.records += part.records
        self.problems += part.problems
        self.classes += [c for c in part.classes if c not in self.classes]
