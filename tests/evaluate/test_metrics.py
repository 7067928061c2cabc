"""COCO metrics against hand-made cases whose AP is known by hand."""

from dataclasses import replace

import pytest

from loomlens.data.records import Box
from loomlens.evaluate.metrics import coco_metrics, evaluate_coco


def box(label="drop", x=10.0, y=10.0, w=40.0, h=40.0, score=None):
    return Box(label, x, y, x + w, y + h, score)


def test_perfect_predictions_score_one():
    gt = [[box()], [box("wrinkle", 100, 50)], []]
    pred = [[replace(b, score=0.9) for b in boxes] for boxes in gt]
    m = coco_metrics(gt, pred, ["drop", "wrinkle"])
    assert m["map50"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx(1.0)
    assert m["per_class"]["wrinkle"]["ap50"] == pytest.approx(1.0)
    assert m["negative_images"] == 1 and m["gt_boxes"] == 2 and m["predicted_boxes"] == 2


def test_shifted_box_counts_only_thresholds_below_its_iou():
    # A 40x40 box shifted by 10 px in x: IoU = 30*40 / (50*40) = 0.6, which passes the
    # thresholds 0.50, 0.55, 0.60 of ten: mAP50-95 = 0.3, mAP50 = 1, mAP75 = 0.
    m = coco_metrics([[box()]], [[box(x=20.0, score=0.8)]], ["drop"])
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map50_95"] == pytest.approx(0.3)


def test_false_positive_on_a_negative_image_lowers_precision():
    gt = [[box()], []]
    clean = coco_metrics(gt, [[box(score=0.9)], []], ["drop"])
    fp_ranked_first = coco_metrics(gt, [[box(score=0.5)], [box(score=0.9)]], ["drop"])
    fp_ranked_last = coco_metrics(gt, [[box(score=0.9)], [box(score=0.5)]], ["drop"])
    assert clean["map50"] == pytest.approx(1.0)
    # The false positive outranks the only true positive: precision 1/2 at recall 1.
    assert fp_ranked_first["map50"] == pytest.approx(0.5)
    assert fp_ranked_first["predicted_on_negatives"] == 1
    # Ranked below it, it costs nothing: AP rewards a good ranking.
    assert fp_ranked_last["map50"] == pytest.approx(1.0)


def test_false_positive_of_a_class_without_truth_in_the_split_does_not_count_in_map():
    gt = [[box()], []]
    m = coco_metrics(gt, [[box(score=0.5)], [box("wrinkle", score=0.9)]], ["drop", "wrinkle"])
    # No wrinkle is true anywhere: its AP is undefined and left out of the mean, whatever its rank.
    assert m["map50"] == pytest.approx(1.0) and m["per_class"]["wrinkle"]["ap50"] is None
    assert m["per_class"]["wrinkle"]["predicted"] == 1 and m["predicted_on_negatives"] == 1


def test_all_scores_one_gives_a_different_and_wrong_ap():
    # The seed's mistake: with every score = 1 the ranking falls to image order. The false
    # positive sits on the first (negative) image, so it is ranked first: AP 0.5, although
    # the model's own scores rank it last (AP 1.0).
    gt = [[], [box()], [box("wrinkle")]]
    scored = [[box(score=0.2)], [box(score=0.9)], [box("wrinkle", score=0.8)]]
    all_ones = [[replace(b, score=1.0) for b in boxes] for boxes in scored]
    real = coco_metrics(gt, scored, ["drop", "wrinkle"])
    seed = coco_metrics(gt, all_ones, ["drop", "wrinkle"])
    assert real["per_class"]["drop"]["ap50"] == pytest.approx(1.0)
    assert seed["per_class"]["drop"]["ap50"] == pytest.approx(0.5)
    assert real["map50"] > seed["map50"]


def test_wrong_class_is_a_miss_and_a_false_positive():
    m = coco_metrics([[box("drop")]], [[box("wrinkle", score=0.9)]], ["drop", "wrinkle"])
    assert m["per_class"]["drop"]["ap50"] == 0.0
    assert m["per_class"]["wrinkle"]["ap50"] is None  # no ground truth: undefined, not 0
    assert m["map50"] == 0.0


def test_class_unseen_in_training_is_reported_not_a_crash():
    gt = [[box("drop")], [box("hole")]]
    pred = [[box("drop", score=0.9)], []]
    m = coco_metrics(gt, pred, ["drop", "wrinkle"])
    assert m["unseen_classes"] == ["hole"]
    assert m["per_class"]["hole"]["ap50"] == 0.0
    assert m["map50"] == pytest.approx(0.5)  # mean of drop (1.0) and hole (0.0)


def test_no_predictions_and_no_ground_truth_do_not_crash():
    assert coco_metrics([[box()]], [[]], ["drop"])["map50"] == 0.0
    empty = coco_metrics([[], []], [[box(score=0.3)], []], ["drop"])
    assert empty["map50"] == 0.0 and empty["predicted_on_negatives"] == 1
    assert coco_metrics([], [], [])["images"] == 0


def test_pr_curve_of_each_class_with_ground_truth():
    ev = evaluate_coco([[box()], []], [[box(score=0.9)], [box(score=0.95)]], ["drop", "wrinkle"])
    recall, precision = ev.pr_curves["drop"]
    assert "wrinkle" not in ev.pr_curves
    assert len(recall) == len(precision) == 101
    assert precision[0] == pytest.approx(0.5) and precision[-1] == pytest.approx(0.5)


def test_located_metrics_set_names_aside_and_count_a_place_once():
    from loomlens.evaluate.metrics import located_metrics

    truth = [[box("drop")], [box("wrinkle", 100, 50)], []]
    renamed = [[box("wrinkle", score=0.9)], [box("wrinkle", 100, 50, score=0.8)], []]
    assert coco_metrics(truth, renamed, ["drop", "wrinkle"])["map50"] == pytest.approx(0.25)
    assert located_metrics(truth, renamed)["map50"] == pytest.approx(1.0)  # found and placed, one misnamed
    # One box also given under another class (evaluation's other labels) is one find, not a false one:
    # counted twice, the lower copy would rank above the true find of the second frame.
    twice = [[box("drop", score=0.9), box("wrinkle", score=0.6)], [box("wrinkle", 100, 50, score=0.5)], []]
    assert located_metrics(truth, twice)["map50"] == pytest.approx(1.0)
    misplaced = [[box("drop", 200, 200, score=0.9)], [], []]
    assert located_metrics(truth, misplaced) == {"map50_95": 0.0, "map50": 0.0, "map75": 0.0}
