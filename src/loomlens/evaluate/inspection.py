"""Image-level inspection metrics: is a frame defective (NG) or good (OK), and how many
defects are missed at a false-alarm rate the line can live with.

A frame's score is the model's own probability that it holds a defect, 1 - P(empty answer)
(`infer.generation.Generation.answer_probability`, the highest over a tiled frame's pieces),
where the prediction measured it; else its most confident box (0 when the model found
nothing). The first ranks frames better: a box's score also weighs how sure the model is of
where the box lies, which says little about whether the frame is good (docs/benchmarks.md,
"Real fabric"). A plant asks
"how many defects do we miss at N false stops per shift": that is the recall on defective
frames at the score threshold where at most a fraction `fpr` of good frames is flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loomlens.data.records import Box
from loomlens.evaluate.thresholds import short_cut, threshold_text

#: False-alarm rates reported by default: one good frame in a hundred, one in a thousand.
DEFAULT_FPRS = (0.01, 0.001)


def frame_score(boxes: Sequence[Box], answer_probability: float | None = None) -> float:
    """The frame's defect score: `answer_probability` (the model's probability that its answer
    is not empty) when measured, else the highest box score (a box without one counts as 1),
    else 0."""
    if answer_probability is not None:
        return float(answer_probability)
    return max((1.0 if b.score is None else float(b.score) for b in boxes), default=0.0)


def _auroc(scores: np.ndarray, defective: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both kinds of frame."""
    pos, neg = scores[defective], scores[~defective]
    if not pos.size or not neg.size:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _threshold_at(good: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    """The threshold (frames flagged when score >= it) that flags at most `fpr` of the good
    frames' scores `good` and as many of all frames' `scores` as that allows, as a short decimal
    (`thresholds.short_cut`) at most 1; None when none does (too many good frames score 1 or more)."""
    allowed = int(np.floor(fpr * good.size + 1e-9))
    ordered = np.sort(good)[::-1]
    if allowed >= ordered.size:
        return 0.0
    # Flag nothing at or below the (allowed+1)-th highest good score, everything above it.
    highest = float(ordered[allowed])
    higher = scores[scores > highest]
    cap = float(higher.min()) if higher.size else 1.0
    return short_cut(highest, cap) if highest < cap else None


def image_level(
    *, scores: Sequence[float], defective: Sequence[bool], fprs: Sequence[float] = DEFAULT_FPRS
) -> dict:
    """OK/NG metrics of frame scores.

    Args:
        scores: one defect score per frame (see `frame_score`), shape (N,).
        defective: whether each frame truly holds a defect, shape (N,).
        fprs: false-alarm rates (fractions of good frames flagged) to report recall at.

    Returns:
        `{"auroc": float | None, "recall_at_fpr": {fpr: recall | None},
        "threshold_at_fpr": {fpr: threshold | None}, "frames": N, "defective": n}`; a recall
        or threshold is None without good or defective frames to measure it on, a threshold
        also where no threshold up to 1 flags few enough good frames (recall 0 then). A
        threshold is a short decimal (`thresholds.short_cut`): `score >= it`, as written, flags
        the share of good and defective frames reported. Keys of the two mappings are the
        rates as strings (`"0.01"`), so the dict survives JSON.
    """
    s = np.asarray(scores, dtype=float)
    d = np.asarray(defective, dtype=bool)
    if s.shape != d.shape:
        raise ValueError(f"{s.size} scores for {d.size} frames")
    good = s[~d]
    recall: dict[str, float | None] = {}
    threshold: dict[str, float | None] = {}
    for fpr in fprs:
        key = f"{fpr:g}"
        if not good.size or not d.any():
            recall[key] = threshold[key] = None
            continue
        t = _threshold_at(good, s, fpr)
        threshold[key] = t
        recall[key] = 0.0 if t is None else float((s[d] >= t).mean())
    return {"auroc": _auroc(s, d), "recall_at_fpr": recall, "threshold_at_fpr": threshold,
            "frames": int(s.size), "defective": int(d.sum())}


def image_level_by_class(
    *, truth: Sequence[Sequence[Box]], predicted: Sequence[Sequence[Box]], fprs: Sequence[float] = DEFAULT_FPRS
) -> dict[str, dict]:
    """`image_level` per class: a frame is NG for class c when it truly holds a c box, and its
    score is its best c box; the good frames are those without any defect.

    Args:
        truth: true boxes per frame, length N.
        predicted: predicted boxes (with scores) per frame, length N.
        fprs: as in `image_level`.

    Returns:
        class -> the dict `image_level` returns, for every class with a defective frame.
    """
    classes = sorted({b.label for boxes in truth for b in boxes})
    clean = [not boxes for boxes in truth]
    out: dict[str, dict] = {}
    for c in classes:
        rows = [(frame_score([b for b in p if b.label == c]), any(b.label == c for b in t))
                for t, p, ok in zip(truth, predicted, clean, strict=True) if ok or any(b.label == c for b in t)]
        out[c] = image_level(scores=[r[0] for r in rows], defective=[r[1] for r in rows], fprs=fprs)
    return out


def summary_line(metrics: Mapping) -> str:
    """One line for a console or report: AUROC, and recall at each false-alarm rate with the
    score threshold that gives it, every digit shown (what a line sets, e.g. `loomlens watch
    --flag-threshold`)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"
    auroc = metrics.get("auroc")
    thresholds = metrics.get("threshold_at_fpr", {})
    parts = [f"AUROC {'-' if auroc is None else f'{auroc:.3f}'}"]
    for k, r in metrics["recall_at_fpr"].items():
        t = thresholds.get(k)
        if t is not None:
            cut = f" (score >= {threshold_text(t)})"
        else:  # nothing to measure on, or no threshold up to 1 flags so few good frames
            cut = "" if r is None else " (no threshold: too many good frames score 1)"
        parts.append(f"recall {pct(r)} at <= {pct(float(k))} false alarms{cut}")
    return ", ".join(parts)
