"""COCO detection metrics through faster-coco-eval, from plain lists of boxes.

Every image takes part, including those with no defect: a box predicted on a clean image is a
false positive of its class. COCO averages AP over the classes with a true box in the split, so
such a box lowers precision (and mAP) only where its class has a true box somewhere in the
split; the false boxes of a class with none count nowhere in mAP (that class's AP is None), and
show only in its `predicted` count, `predicted_on_negatives` and the best F1, which counts
every box. Detections are ranked by their
`score` (a missing score counts as 1.0, which is what the seed did for all of them, and which
leaves the ranking to file order). A class found in the ground truth but absent from
`classes` (never seen in training) is evaluated and listed under `unseen_classes`, not an error.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from loomlens.data.records import Box

#: Index of IoU 0.50 and 0.75 in COCO's thresholds 0.50:0.05:0.95.
_IOU50, _IOU75 = 0, 5


@dataclass
class CocoEvaluation:
    """`metrics`: the dict `coco_metrics` returns. `pr_curves`: class -> (recall, precision)
    at IoU 0.5 on COCO's 101 recall points, for classes with ground truth."""

    metrics: dict
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _categories(ground_truth, predictions, classes: Sequence[str]) -> list[str]:
    """`classes` first, in order, then labels met only in the ground truth or predictions."""
    names = list(dict.fromkeys(classes))
    met = {b.label for boxes in (*ground_truth, *predictions) for b in boxes}
    return names + sorted(met - set(names))


def _coco_annotation(box: Box, image_id: int, cat_id: int, ann_id: int) -> dict:
    w, h = box.x2 - box.x1, box.y2 - box.y1
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": [box.x1, box.y1, w, h],
            "area": w * h, "iscrowd": 0}


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of COCO precision entries, skipping the -1 of 'no ground truth'; None if none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def evaluate_coco(
    ground_truth: Sequence[Sequence[Box]], predictions: Sequence[Sequence[Box]], classes: Sequence[str] = ()
) -> CocoEvaluation:
    """COCO bbox evaluation of `predictions[i]` against `ground_truth[i]` (image i; pixel boxes).

    Returns the metrics dict (see `coco_metrics`) and the per-class PR curves.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} predicted")
    names = _categories(ground_truth, predictions, classes)
    cat_id = {name: i + 1 for i, name in enumerate(names)}
    images = [{"id": i + 1, "width": 1, "height": 1} for i in range(len(ground_truth))]
    gt_flat = [(i + 1, b) for i, boxes in enumerate(ground_truth) for b in boxes]
    dt_flat = [(i + 1, b) for i, boxes in enumerate(predictions) for b in boxes]
    gt_anns = [_coco_annotation(b, i, cat_id[b.label], n + 1) for n, (i, b) in enumerate(gt_flat)]
    dt_anns = [
        {**_coco_annotation(b, i, cat_id[b.label], n + 1), "score": 1.0 if b.score is None else float(b.score)}
        for n, (i, b) in enumerate(dt_flat)
    ]
    gt_count = Counter(b.label for boxes in ground_truth for b in boxes)
    pred_count = Counter(b.label for boxes in predictions for b in boxes)
    negatives = [i for i, boxes in enumerate(ground_truth) if not boxes]
    counts = {
        "images": len(ground_truth),
        "negative_images": len(negatives),
        "gt_boxes": sum(gt_count.values()),
        "predicted_boxes": sum(pred_count.values()),
        "predicted_on_negatives": sum(len(predictions[i]) for i in negatives),
        "unseen_classes": sorted(set(gt_count) - set(classes)) if classes else [],
        "unknown_predicted_classes": sorted(set(pred_count) - set(gt_count) - set(classes)),
    }

    precision = np.full((10, 101, len(names), 4, 3), -1.0)
    recall_points = np.linspace(0, 1, 101)
    if gt_anns and dt_anns:
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns,
                      "categories": [{"id": cat_id[n], "name": n} for n in names]}
        gt.createIndex()
        dt = gt.loadRes(dt_anns)
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *_: None)
        ev.params.maxDets = [1, 10, max(100, max(len(p) for p in predictions))]
        with contextlib.redirect_stdout(io.StringIO()):  # the C++ side prints timings
            ev.evaluate()
            ev.accumulate()
        precision = np.asarray(ev.eval["precision"])
        recall_points = np.asarray(ev.params.recThrs)
    elif gt_anns:  # ground truth but no prediction at all: nothing found, precision 0
        for name in gt_count:
            precision[:, :, cat_id[name] - 1] = 0.0

    everything = precision[:, :, :, 0, -1]  # area "all", the largest maxDets
    per_class = {}
    curves = {}
    for name in names:
        k = cat_id[name] - 1
        per_class[name] = {
            "ap50": _mean_valid(everything[_IOU50, :, k]),
            "ap75": _mean_valid(everything[_IOU75, :, k]),
            "ap": _mean_valid(everything[:, :, k]),
            "gt": gt_count.get(name, 0),
            "predicted": pred_count.get(name, 0),
        }
        if gt_count.get(name):
            curves[name] = (recall_points, np.clip(everything[_IOU50, :, k], 0, None))
    metrics = {
        # No ground truth at all: nothing to find, reported as 0 rather than COCO's -1.
        "map50_95": _mean_valid(everything) or 0.0,
        "map50": _mean_valid(everything[_IOU50]) or 0.0,
        "map75": _mean_valid(everything[_IOU75]) or 0.0,
        "per_class": per_class,
        **counts,
    }
    return CocoEvaluation(metrics, curves)


def coco_metrics(
    ground_truth: Sequence[Sequence[Box]], predictions: Sequence[Sequence[Box]], classes: Sequence[str] = ()
) -> dict:
    """COCO metrics of per-image predicted boxes against per-image ground truth.

    Returns `map50_95`, `map50`, `map75` (floats in [0, 1]), `per_class` (class -> `ap50`,
    `ap75`, `ap`, `gt`, `predicted`; an AP is None for a class with no ground truth), and the
    counts `images`, `negative_images`, `gt_boxes`, `predicted_boxes`,
    `predicted_on_negatives`, `unseen_classes` (in the ground truth, not in `classes`) and
    `unknown_predicted_classes`.
    """
    return evaluate_coco(ground_truth, predictions, classes).metrics


#: The one class every box becomes in `located_metrics`.
ANY_DEFECT = "defect"


def _once_per_place(boxes: Sequence[Box]) -> list[Box]:
    """`boxes` with those at the same place (one box also given under other classes,
    `infer/scoring.other_labels`) kept once, at the highest score (a missing score counts as 1)."""
    best: dict[tuple[float, float, float, float], Box] = {}
    for b in boxes:
        place, kept = (b.x1, b.y1, b.x2, b.y2), best.get((b.x1, b.y1, b.x2, b.y2))
        if kept is None or (1.0 if b.score is None else b.score) > (1.0 if kept.score is None else kept.score):
            best[place] = b
    return list(best.values())


def located_metrics(ground_truth: Sequence[Sequence[Box]], predictions: Sequence[Sequence[Box]]) -> dict:
    """COCO metrics with every box's name set aside (ultralytics' `single_cls` view): how well
    the defects are found and placed, whatever they are called, which a line that stops for any
    defect asks first. The boxes are pooled, so each defect weighs the same, where mAP averages
    the classes and a class with one true box weighs as much as the commonest.

    Args:
        ground_truth: per image, its true boxes (pixels).
        predictions: per image, its predicted boxes; one place under several classes counts once.

    Returns:
        `map50_95`, `map50`, `map75` (floats in [0, 1]) of the boxes all under `ANY_DEFECT`.
    """
    truth = [[replace(b, label=ANY_DEFECT) for b in boxes] for boxes in ground_truth]
    found = [[replace(b, label=ANY_DEFECT) for b in _once_per_place(boxes)] for boxes in predictions]
    metrics = evaluate_coco(truth, found, [ANY_DEFECT]).metrics
    return {key: metrics[key] for key in ("map50_95", "map50", "map75")}
