"""Image-level OK/NG metrics: AUROC and recall at a false-alarm rate."""

from __future__ import annotations

import json
import re

import pytest

from loomlens.data.records import Box
from loomlens.evaluate.inspection import frame_score, image_level, image_level_by_class, summary_line


def test_frame_score_is_best_box_or_zero() -> None:
    assert frame_score([]) == 0.0
    assert frame_score([Box("drop", 0, 0, 1, 1, 0.2), Box("drop", 0, 0, 1, 1, 0.7)]) == 0.7
    assert frame_score([Box("drop", 0, 0, 1, 1)]) == 1.0  # unscored boxes count as certain


def test_the_models_answer_probability_scores_the_frame_when_measured() -> None:
    assert frame_score([Box("drop", 0, 0, 1, 1, 0.2)], 0.93) == 0.93
    assert frame_score([], 0.4) == 0.4  # an empty answer the model was unsure of still ranks
    assert frame_score([Box("drop", 0, 0, 1, 1, 0.2)], None) == 0.2


def test_the_summary_line_gives_the_score_to_set_for_each_false_alarm_rate() -> None:
    line = summary_line(image_level(scores=[0.9, 0.8, 0.3, 0.1], defective=[True, True, False, False]))
    assert "recall 100.0 % at <= 1.0 % false alarms (score >= 0.4)" in line  # above the best good frame
    # Good frames that all score 0: a short number above it, not 4.941e-324.
    line = summary_line(image_level(scores=[0.9, 0.0, 0.0], defective=[True, False, False]))
    assert "false alarms (score >= 0.1)" in line


def _flagged_as_printed(scores: list[float], defective: list[bool], fpr: float) -> tuple[float, float, float]:
    """(claimed recall, false alarms and recall of `score >= t` for t as the summary line prints it)."""
    m = image_level(scores=scores, defective=defective, fprs=(fpr,))
    printed = float(re.search(r"\(score >= ([^)]+)\)", summary_line(m)).group(1))
    good = [s >= printed for s, d in zip(scores, defective) if not d]
    found = [s >= printed for s, d in zip(scores, defective) if d]
    return m["recall_at_fpr"][f"{fpr:g}"], sum(good) / len(good), sum(found) / len(found)


@pytest.mark.parametrize(("scores", "defective", "fpr"), [
    # 99 good frames tie at 0.2, one at 0.9 (the 1 % allowed): "score >= 0.2" flagged them all.
    ([0.2] * 99 + [0.9, 0.5, 0.95], [False] * 100 + [True] * 2, 0.01),
    # the cut just above 0.87654321, a defect at 0.88: printed as 0.8765, it flagged two good frames.
    ([i / 245 for i in range(98)] + [0.87654321, 0.9, 0.8765, 0.88, 0.95, 0.3], [False] * 100 + [True] * 4, 0.01),
    # good and defective frames tied at the cut
    ([0.5] * 10 + [0.5] * 5 + [0.7], [False] * 10 + [True] * 6, 0.1),
    ([0.123456789] * 3 + [0.1234568, 0.123456789], [False] * 3 + [True] * 2, 0.001),
])
def test_the_printed_threshold_gives_the_claimed_rates(scores, defective, fpr) -> None:
    recall, false_alarms, found = _flagged_as_printed(scores, defective, fpr)
    assert false_alarms <= fpr
    assert found == recall


def test_a_threshold_never_exceeds_a_probability() -> None:
    # Nothing scores above the cut: at most 1, which `watch --flag-threshold` takes.
    m = image_level(scores=[0.9999991, 0.2, 0.5], defective=[False, False, True], fprs=(0.01,))
    assert m["threshold_at_fpr"]["0.01"] == 1.0 and m["recall_at_fpr"]["0.01"] == 0.0
    # Good frames scoring 1: no threshold up to 1 keeps them unflagged, and the line says so.
    m = image_level(scores=[1.0, 0.2, 1.0], defective=[False, False, True], fprs=(0.01,))
    assert m["threshold_at_fpr"]["0.01"] is None and m["recall_at_fpr"]["0.01"] == 0.0
    assert "recall 0.0 % at <= 1.0 % false alarms (no threshold: too many good frames score 1)" in summary_line(m)


def test_perfect_separation() -> None:
    m = image_level(scores=[0.9, 0.8, 0.1, 0.0, 0.2], defective=[True, True, False, False, False])
    assert m["auroc"] == 1.0
    assert m["recall_at_fpr"]["0.01"] == 1.0
    # The threshold flags no good frame: the shortest decimal above the best good score 0.2.
    assert m["threshold_at_fpr"]["0.01"] == 0.3


def test_recall_at_fpr_counts_only_allowed_false_alarms() -> None:
    good = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    defect = [0.995, 0.985, 0.5]
    m = image_level(scores=good + defect, defective=[False] * 100 + [True] * 3, fprs=(0.01, 0.001, 0.05))
    # 1 % of 100 good frames = one false alarm allowed: the threshold passes 0.99 but not 0.98.
    assert m["threshold_at_fpr"]["0.01"] > 0.98
    assert m["recall_at_fpr"]["0.01"] == pytest.approx(2 / 3)
    # 0.1 % of 100 = none allowed: only scores above 0.99.
    assert m["recall_at_fpr"]["0.001"] == pytest.approx(1 / 3)
    # 5 %: five allowed, threshold above 0.94: still misses the 0.5 frame.
    assert m["recall_at_fpr"]["0.05"] == pytest.approx(2 / 3)
    flagged = sum(s >= m["threshold_at_fpr"]["0.05"] for s in good)
    assert flagged <= 5


def test_ties_between_good_and_defective_are_not_rewarded() -> None:
    m = image_level(scores=[0.0, 0.0, 0.0], defective=[True, False, False])
    assert m["auroc"] == 0.5
    assert m["recall_at_fpr"]["0.01"] == 0.0  # a miss scored 0 is never found without false alarms


def test_missing_kinds_give_none_and_survive_json() -> None:
    m = image_level(scores=[0.3, 0.4], defective=[True, True])
    assert m["auroc"] is None and m["recall_at_fpr"]["0.01"] is None
    assert json.loads(json.dumps(m)) == m


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 scores for 3 frames"):
        image_level(scores=[0.1, 0.2], defective=[True, False, True])


def test_by_class_scores_each_class_against_clean_frames() -> None:
    truth = [[Box("hole", 0, 0, 5, 5)], [Box("knot", 0, 0, 5, 5)], [], []]
    predicted = [[Box("hole", 0, 0, 5, 5, 0.9)], [Box("hole", 0, 0, 5, 5, 0.8)], [Box("knot", 0, 0, 5, 5, 0.1)], []]
    per = image_level_by_class(truth=truth, predicted=predicted)
    assert set(per) == {"hole", "knot"}
    assert per["hole"]["recall_at_fpr"]["0.01"] == 1.0
    assert per["knot"]["frames"] == 3  # the knot frame and the two clean ones, not the hole frame
    assert per["knot"]["recall_at_fpr"]["0.01"] == 0.0  # found no knot (its best knot score is 0)
    assert "recall" in summary_line(per["hole"])
