"""Test-time augmentation: detect on mirrored copies of a picture and fuse what each copy saw.

In: a picture, the mirrors to look at it through (`views`), and the boxes found in each mirrored
copy. Out: one list of boxes in the picture's own pixels.

A small model places a box edge to within a few pixels, and its error differs from one mirrored
copy to the next; averaging the coordinates of the boxes the copies agree on cancels part of
it, and a box that only one copy saw keeps a fraction of its score. The fusion is weighted boxes
fusion (Solovyev et al., "Weighted boxes fusion: ensembling boxes from different object
detection models", arXiv:1910.13302, section 2): clusters of same-label boxes at IoU >=
`FUSE_IOU`, coordinates averaged by score, score summed over the views. A small defect's boxes
from different views can overlap too little to cluster; a fused box lying mostly inside a
better one of its label is then dropped (`DUPLICATE_OVERLAP`), so a defect gets one box. Written
here rather than taken from `ensemble-boxes`, which needs pandas and numba for these lines and
works in normalised coordinates. Only the mirrors a run was trained on are used (`Run.views`): a
model that never saw a picture upside down answers worse on one; and only for a picture whose
first look may hold a defect (`worth_mirrors`): most tiles of a tiled frame are plain cloth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from loomlens.data.records import Box, iou as box_iou
from loomlens.infer.tiling import mean_edges, smaller_overlap

#: The views `tta="on"` uses: the picture as it is, mirrored left-right, top-bottom, and both.
ALL_VIEWS: tuple[str, ...] = ("", "h", "v", "hv")
#: What `tta` takes: auto (the mirrors the run was trained on), on (all four views) or off.
TTA_MODES = ("auto", "on", "off")
#: A picture the first view gives under this probability of holding a defect (its answer's
#: `answer_probability`) is not looked at through the other mirrors: an empty tile of a large
#: frame, most of them (docs/evaluate-and-predict.md, "Mirrors fused": a third to a half of
#: the looks saved on tiled cloth, the same mAP). One given at least this that answered
#: nothing is also read again with an answer forced (`detection.worth_rereading`).
MIRROR_GATE = 0.3
#: Same-label boxes from different views at this IoU or more are one defect. Below the paper's
#: 0.55: a small defect's boxes from two views overlap less than a large one's
#: (docs/benchmarks.md, "Mirrors fused": 0.3 and 0.4 level on mAP, 0.3 with fewer boxes).
FUSE_IOU = 0.3
#: A fused box with this share of its area inside a better-scored fused box of its label is a
#: duplicate of that defect, and dropped.
DUPLICATE_OVERLAP = 0.5


def check_tta(mode: str) -> str:
    """`mode` if it is one of `TTA_MODES`, else a ValueError naming the option and its choices."""
    if mode not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    return mode


def choose_views(mode: str, trained: Sequence[str]) -> tuple[str, ...]:
    """The views a `--tta` mode looks through.

    Args:
        mode: auto (the run's own mirrors), on (all four views) or off (once, as it is).
        trained: the views the run was trained on (`Run.views`); empty or ("",) for a bare model.

    Returns:
        The views, "" (as it is) first. Raises ValueError for another mode.
    """
    return {"auto": tuple(trained) or ("",), "on": ALL_VIEWS, "off": ("",)}[check_tta(mode)]


def worth_mirrors(probability: float | None) -> bool:
    """Whether a picture whose first look gave `probability` that it holds a defect (None: not
    measured) is looked at through the other mirrors too (`MIRROR_GATE`)."""
    return probability is None or probability >= MIRROR_GATE


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """`views` as a tuple if it is a non-empty sequence of distinct `ALL_VIEWS`, else ValueError."""
    views = tuple(views)
    if not views or len(set(views)) != len(views) or not set(views) <= set(ALL_VIEWS):
        raise ValueError(f"views must be distinct ones of {ALL_VIEWS}, got {views!r}")
    return views


def mirrored(image: Image.Image, view: str) -> Image.Image:
    """`image` seen through `view` ("", "h", "v" or "hv"); "" returns it unchanged."""
    if "h" in view:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "v" in view:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def unmirrored(box: Box, view: str, width: float, height: float) -> Box:
    """A box found in the `view` copy of a `width` x `height` picture, in the picture's pixels."""
    if "h" in view:
        box = box.hflip(width)
    if "v" in view:
        box = box.vflip(height)
    return box


def fuse_boxes(views: Sequence[Sequence[Box]], iou: float = FUSE_IOU) -> list[Box]:
    """Weighted boxes fusion of the boxes each view found (already in the picture's pixels).

    Args:
        views: one list of boxes per view; a box without a score counts as 1.
        iou: same-label boxes at this IoU or more with a cluster's fused box join it.

    Returns:
        One box per cluster, by descending score, less those lying `DUPLICATE_OVERLAP` inside a
        better one of their label: coordinates averaged by score, score the sum of its boxes'
        scores over max(len(views), the cluster's size), so a box every view agrees on keeps its
        mean score and one seen by a single view of four a quarter of it.
    """
    ordered = sorted((b for found in views for b in found), key=lambda b: -(1.0 if b.score is None else b.score))
    clusters: list[list[Box]] = []
    fused: list[Box] = []
    for box in ordered:
        overlaps = [(box_iou(f, box), i) for i, f in enumerate(fused) if f.label == box.label]
        best, at = max(overlaps, default=(0.0, -1))
        if best >= iou:
            clusters[at].append(box)
        else:
            at = len(clusters)
            clusters.append([box])
            fused.append(box)
        members = clusters[at]
        x1, y1, x2, y2 = mean_edges(members)
        score = sum(1.0 if b.score is None else b.score for b in members)
        fused[at] = replace(members[0], x1=x1, y1=y1, x2=x2, y2=y2, score=float(score / max(len(views), len(members))))
    kept: list[Box] = []
    for box in sorted(fused, key=lambda b: -(b.score or 0.0)):
        same = [[k.x1, k.y1, k.x2, k.y2] for k in kept if k.label == box.label]
        if not same or smaller_overlap(box, np.array(same)).max() < DUPLICATE_OVERLAP:
            kept.append(box)
    return kept
