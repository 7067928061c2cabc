"""One-to-one matching of predicted to true boxes in an image, and what it adds up to: the
confusion matrix with its missed/false row and column, and the best operating threshold.

COCO's AP needs no matching of ours (faster-coco-eval does it); these serve the pictures a
person reads: which defect was called what, which were missed, which were invented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loomlens.data.records import Box
from loomlens.evaluate.thresholds import short_cut


@dataclass
class ImageMatch:
    """`pairs`: (true index, predicted index) matched; `missed`: true boxes left unmatched;
    `false`: predicted boxes left unmatched. Indices into the lists given to `match_image`."""

    pairs: list[tuple[int, int]]
    missed: list[int]
    false: list[int]


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """IoU of every box of `a` (rows) with every box of `b` (columns)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    pa = np.array([[x.x1, x.y1, x.x2, x.y2] for x in a])[:, None, :]
    pb = np.array([[x.x1, x.y1, x.x2, x.y2] for x in b])[None, :, :]
    w = np.clip(np.minimum(pa[..., 2], pb[..., 2]) - np.maximum(pa[..., 0], pb[..., 0]), 0, None)
    h = np.clip(np.minimum(pa[..., 3], pb[..., 3]) - np.maximum(pa[..., 1], pb[..., 1]), 0, None)
    inter = w * h
    area = lambda p: (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])  # noqa: E731
    return inter / (area(pa) + area(pb) - inter)


def match_image(
    truth: Sequence[Box], predicted: Sequence[Box], iou: float = 0.5, same_class: bool = True
) -> ImageMatch:
    """Greedy matching as COCO does it: predictions by descending score, each takes the free
    true box it overlaps most (IoU >= `iou`; of the same label unless `same_class` is off,
    which lets a confusion between classes show as a pair)."""
    overlaps = iou_matrix(truth, predicted)
    if same_class:
        same = np.array([[t.label == p.label for p in predicted] for t in truth], dtype=bool)
        overlaps = np.where(same.reshape(overlaps.shape), overlaps, 0.0)
    order = sorted(range(len(predicted)), key=lambda j: -(predicted[j].score if predicted[j].score is not None else 1.0))
    free = set(range(len(truth)))
    pairs, false = [], []
    for j in order:
        best = max(free, key=lambda i: overlaps[i, j], default=None)
        if best is not None and overlaps[best, j] >= iou:
            pairs.append((best, j))
            free.remove(best)
        else:
            false.append(j)
    return ImageMatch(pairs, sorted(free), sorted(false))


def match_for_confusion(truth: Sequence[Box], predicted: Sequence[Box], iou: float = 0.5) -> ImageMatch:
    """`match_image` of same-class pairs first, as AP counts them, then of the boxes left over
    regardless of class: a confusion shows as a pair, yet a wrong-class box scored higher never
    takes the true box from a right one (which would show a hit as a confusion and a false box)."""
    same = match_image(truth, predicted, iou)
    rest = match_image([truth[i] for i in same.missed], [predicted[j] for j in same.false], iou, same_class=False)
    return ImageMatch(same.pairs + [(same.missed[i], same.false[j]) for i, j in rest.pairs],
                      [same.missed[i] for i in rest.missed], [same.false[j] for j in rest.false])


def above(boxes: Sequence[Box], threshold: float) -> list[Box]:
    """The boxes scoring at least `threshold` (a box without a score always passes)."""
    return [b for b in boxes if b.score is None or b.score >= threshold]


def confusion_matrix(
    truth: Sequence[Sequence[Box]],
    predicted: Sequence[Sequence[Box]],
    classes: Sequence[str],
    iou: float = 0.5,
    threshold: float = 0.0,
) -> np.ndarray:
    """Counts over all images, shape (K+1, K+1) for the K `classes`: rows are the true class
    and a last "FP" row (predicted where nothing was), columns the predicted class and a last
    "FN" column (missed), boxes matched by `match_for_confusion`. Predictions under
    `threshold` are ignored. Labels outside `classes` must be added to `classes` by the caller."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    matrix = np.zeros((k + 1, k + 1), dtype=int)
    for gt, pred in zip(truth, predicted):
        pred = above(pred, threshold)
        m = match_for_confusion(gt, pred, iou)
        for i, j in m.pairs:
            matrix[index[gt[i].label], index[pred[j].label]] += 1
        for i in m.missed:
            matrix[index[gt[i].label], k] += 1
        for j in m.false:
            matrix[k, index[pred[j].label]] += 1
    return matrix


def best_threshold(
    truth: Sequence[Sequence[Box]], predicted: Sequence[Sequence[Box]], iou: float = 0.5
) -> tuple[float, float]:
    """The score threshold with the highest F1 over all classes (same-class matches at `iou`),
    as `(threshold, f1)`: a starting point for the line's per-class thresholds. The threshold
    is a short decimal (`thresholds.short_cut`, the kept score rounded down) that keeps, with
    `score >= it`, exactly the boxes the best cut keeps."""
    # Whether a prediction is a true positive does not depend on the cut: greedy matching by
    # score keeps the same pairs among the boxes above any threshold.
    scored = []
    for gt, pred in zip(truth, predicted):
        hits = {j for _, j in match_image(gt, pred, iou).pairs}
        scored += [(1.0 if b.score is None else b.score, j in hits) for j, b in enumerate(pred)]
    scored.sort(key=lambda s: -s[0])
    n_true = sum(len(gt) for gt in truth)
    best = (0.0, 0.0, 0.0)  # the lowest score kept, the next lower one (0 below all), F1
    tp = 0
    for rank, (score, hit) in enumerate(scored, start=1):
        tp += hit
        if rank < len(scored) and scored[rank][0] == score:
            continue  # a threshold keeps all tied scores or none
        f1 = 2 * tp / (rank + n_true)
        if f1 > best[2]:
            best = (score, scored[rank][0] if rank < len(scored) else 0.0, f1)
    kept, dropped, f1 = best
    return (short_cut(dropped, kept, near_high=True) if dropped < kept else kept), f1


#: Where `placement` puts a true box, from the best outcome down.
PLACEMENT_BANDS = ("named", "renamed", "near", "centred", "missed")
#: Pixels a true box is grown by before `placement` asks whether a box's centre lies on it:
#: defects a few pixels wide are labelled to the pixel, and a centre one pixel off is on them.
CENTRE_SLACK = 2.0


def placement(truth: Sequence[Sequence[Box]], predicted: Sequence[Sequence[Box]], *, threshold: float = 0.0,
              slack: float = CENTRE_SLACK) -> dict[str, int]:
    """Where each true box lands against the predicted boxes of its frame scoring at least
    `threshold`: what mAP50 loses to naming, to the boxes' edges and to misses, which the AP
    alone does not say. On defects a few pixels wide one pixel of size is a quarter of the box,
    so a box found on the spot can still miss IoU 0.5; `centred` counts those apart from misses.

    Args:
        truth: per image, its true boxes (pixels).
        predicted: per image, its predicted boxes (pixels, scored or not).
        threshold: the lowest score counted (0: every box the model gave).
        slack: pixels each true box is grown by for the `centred` test.

    Returns:
        Counts of true boxes per `PLACEMENT_BANDS` band: `named` (a box of its class at IoU
        >= 0.5), `renamed` (only another class's there), `near` (the closest at IoU 0.3-0.5),
        `centred` (less overlap, but a box's centre lies on the true box grown by `slack`)
        and `missed`.
    """
    counts = dict.fromkeys(PLACEMENT_BANDS, 0)
    for true, found in zip(truth, predicted):
        found = above(found, threshold)
        overlaps = iou_matrix(true, found)
        for i, box in enumerate(true):
            own = max((o for o, f in zip(overlaps[i], found) if f.label == box.label), default=0.0)
            closest = max(overlaps[i], default=0.0)
            centred = any(box.x1 - slack <= (f.x1 + f.x2) / 2 <= box.x2 + slack
                          and box.y1 - slack <= (f.y1 + f.y2) / 2 <= box.y2 + slack for f in found)
            band = ("named" if own >= 0.5 else "renamed" if closest >= 0.5 else "near" if closest >= 0.3
                    else "centred" if centred else "missed")
            counts[band] += 1
    return counts
