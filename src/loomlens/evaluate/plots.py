"""The evaluation's pictures, one function each, written as PNG files.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot): no global state, no
GUI backend, safe to call from a training loop or a server thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from loomlens.data.records import Box
from loomlens.evaluate.matching import above, match_image
from loomlens.evaluate.thresholds import threshold_text


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], ap50: dict[str, float | None], path: Path) -> Path:
    """Precision against recall at IoU 0.5, one line per class, AP50 in the legend."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.add_subplot()
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP50 {ap50.get(name) or 0:.3f})")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, threshold: float) -> Path:
    """The confusion matrix as the seed drew it: true classes and an FP row down, predicted
    classes and an FN column across, counts written in the cells, empty cells white."""
    k = len(classes)
    fig = Figure(figsize=(2.2 * (k + 1) + 2, 1.9 * (k + 1) + 1.5))
    ax = fig.add_subplot()
    shown = np.ma.masked_equal(matrix, 0)
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    fig.colorbar(image, ax=ax)
    for (r, c), v in np.ndenumerate(matrix):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() * 0.6 else "black")
    ax.set_xticks(range(k + 1), [*classes, "FN"], rotation=90)
    ax.set_yticks(range(k + 1), [*classes, "FP"])
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion at IoU 0.5, score >= {threshold_text(threshold)}")
    return _save(fig, path)


def plot_reliability(
    truth: Sequence[Sequence[Box]], predicted: Sequence[Sequence[Box]], path: Path, bins: int = 10
) -> Path:
    """Reliability of the scores: predictions binned by score, the fraction of each bin that
    is a true positive (same class, IoU >= 0.5) against the bin's mean score. A calibrated
    score lies on the diagonal; bar heights below give the number of predictions per bin."""
    scores, hits = [], []
    for gt, pred in zip(truth, predicted):
        matched = {j for _, j in match_image(gt, pred).pairs}
        scores += [1.0 if b.score is None else b.score for b in pred]
        hits += [j in matched for j in range(len(pred))]
    scores_arr, hits_arr = np.array(scores, dtype=float), np.array(hits, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores_arr, edges) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    mean_score = np.bincount(which, weights=scores_arr, minlength=bins)[filled] / counts[filled]
    precision = np.bincount(which, weights=hits_arr, minlength=bins)[filled] / counts[filled]

    fig = Figure(figsize=(6, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    top.plot(mean_score, precision, "o-", label="loomlens scores")
    top.set(ylabel="Precision in bin", ylim=(0, 1.02), title="Score reliability")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar((edges[:-1] + edges[1:]) / 2, counts, width=1 / bins * 0.9)
    bottom.set(xlabel="Score", ylabel="Predictions", xlim=(0, 1))
    return _save(fig, path)


def _draw_boxes(ax, boxes: Sequence[Box], colour: str, style: str, scored: bool) -> None:
    for b in boxes:
        ax.add_patch(Rectangle((b.x1, b.y1), b.width, b.height, fill=False, edgecolor=colour, linestyle=style, lw=1.5))
        text = f"{b.label} {b.score:.2f}" if scored and b.score is not None else b.label
        ax.text(b.x1, b.y1, text, color="white", fontsize=7, va="bottom", clip_on=True,  # a box out of the view
                bbox={"facecolor": colour, "pad": 1, "lw": 0})


#: A frame longer than this many times its height (or the reverse) is shown, in the gallery,
#: as a window around its errors: a 4096x256 line-scan strip drawn whole in one panel shows a
#: 4 px defect as less than a pixel.
LONG_FRAME = 2.0


def error_view(width: int, height: int, boxes: Sequence[Box]) -> tuple[int, int, int, int]:
    """The part of a frame the gallery shows, as (x1, y1, x2, y2) pixels: the whole frame unless
    it is longer than `LONG_FRAME` times its short side, then a window `LONG_FRAME` short sides
    long (or as long as `boxes` span, plus a margin) centred on `boxes` (its errors)."""
    long_x = width >= height
    length, short = (width, height) if long_x else (height, width)
    if length <= LONG_FRAME * short or not boxes:
        return 0, 0, width, height
    lo = min(b.x1 if long_x else b.y1 for b in boxes)
    hi = max(b.x2 if long_x else b.y2 for b in boxes)
    span = min(length, math.ceil(max(LONG_FRAME * short, hi - lo + short / 2)))
    start = min(max(0, math.floor((lo + hi - span) / 2)), length - span)  # whole pixels: the crop's own
    return (start, 0, start + span, height) if long_x else (0, start, width, start + span)


def plot_gallery(
    items: Sequence[tuple[str, Image.Image, Sequence[Box], Sequence[Box]]],
    path: Path,
    threshold: float,
    columns: int = 4,
) -> Path:
    """The images with the most errors, each drawn once: matched predictions green, missed
    true boxes orange (dashed), false predictions red. `items` are (title, image, true boxes,
    predicted boxes), already chosen and ordered by the caller. A long frame (a line-scan
    strip) is shown as the window around its errors that `error_view` picks, its span in the title."""
    rows = max(1, -(-len(items) // columns))
    fig = Figure(figsize=(4 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (title, image, gt, pred) in zip(axes, items):
        pred = above(pred, threshold)
        m = match_image(gt, pred)
        x1, y1, x2, y2 = error_view(*image.size, [gt[i] for i in m.missed] + [pred[j] for j in m.false])
        ax.imshow(image.crop((x1, y1, x2, y2)), extent=(x1, x2, y2, y1))
        _draw_boxes(ax, [pred[j] for _, j in m.pairs], "tab:green", "-", True)
        _draw_boxes(ax, [gt[i] for i in m.missed], "tab:orange", "--", False)
        _draw_boxes(ax, [pred[j] for j in m.false], "tab:red", "-", True)
        ax.set(xlim=(x1, x2), ylim=(y2, y1))
        part = "" if (x2 - x1, y2 - y1) == image.size else f", x {x1}-{x2} y {y1}-{y2} shown"
        ax.set_title(f"{title}\nmissed {len(m.missed)}, false {len(m.false)}{part}", fontsize=8)
    fig.suptitle(f"Worst images (score >= {threshold_text(threshold)}): green found, orange missed, red false")
    return _save(fig, path)
