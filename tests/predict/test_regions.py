"""Region rules from YAML: per-class regions and thresholds."""

import pytest

from loomlens.data.records import Box
from loomlens.predict.regions import RegionRules, load_rules, save_rules

RULES = """
min_score: 0.2
classes:
  broken-weft:
    min_score: 0.5
    regions:
      - [[0, 0], [0.45, 0], [0.45, 1], [0, 1]]
"""


def test_rules_filter_by_region_and_threshold(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    rules = load_rules(path)
    left = Box("broken-weft", 10, 10, 50, 50, 0.9)
    right = Box("broken-weft", 900, 10, 950, 50, 0.9)
    weak = Box("broken-weft", 10, 10, 50, 50, 0.4)
    drop_weak, drop_ok = Box("drop", 900, 10, 950, 50, 0.1), Box("drop", 900, 10, 950, 50, 0.3)
    unscored = Box("drop", 900, 10, 950, 50)
    assert rules.apply([left, right, weak, drop_weak, drop_ok, unscored], 1000, 500) == [left, drop_ok, unscored]


def test_rules_round_trip_into_a_run_folder(tmp_path):
    rules = RegionRules.model_validate({"min_score": 0.3, "classes": {"drop": {"min_score": 0.1}}})
    assert save_rules(rules, tmp_path).name == "regions.yaml"
    assert load_rules(tmp_path / "regions.yaml") == rules


@pytest.mark.parametrize("bad", ["min_score: 2", "classes: {drop: {regions: [[[0, 0], [1, 1]]]}}",
                                 "classes: {drop: {regions: [[[0, 0], [2, 0], [0, 1]]]}}", "clases: {}",
                                 ": : :"])
def test_bad_rules_are_refused_naming_the_file(tmp_path, bad):
    (tmp_path / "r.yaml").write_text(bad)
    with pytest.raises(ValueError, match=f"^region rules {tmp_path / 'r.yaml'}: "):
        load_rules(tmp_path / "r.yaml")


def test_a_rule_for_a_class_the_model_does_not_know_is_refused():
    rules = RegionRules(classes={"drops": {"min_score": 0.5}, "drop": {}})
    with pytest.raises(ValueError, match="name class\\(es\\) 'drops' that the model does not know"):
        rules.check_classes(["drop", "wrinkle"])
    rules.check_classes([])  # a bare model has no class list to hold them to


def test_a_class_threshold_overrides_the_default_one():
    rules = RegionRules(min_score=0.2, classes={"drop": {"min_score": 0.35}, "wrinkle": {}})
    assert [rules.threshold(c) for c in ("drop", "wrinkle", "hole")] == [0.35, 0.2, 0.2]


@pytest.mark.parametrize("points", ["[[0, 0], [0, 0], [0, 0]]", "[[0, 0], [0.5, 0.5], [1, 1]]"])
def test_a_region_with_no_area_is_refused(tmp_path, points):
    """Its points on one line enclose no centre: every box of the class would be dropped."""
    (tmp_path / "r.yaml").write_text(f"classes:\n  drop:\n    regions:\n      - {points}\n")
    with pytest.raises(ValueError, match="a region needs an area, but its points lie on one line"):
        load_rules(tmp_path / "r.yaml")


def test_a_refused_rule_is_one_line_naming_the_file_line_and_key(tmp_path):
    (tmp_path / "r.yaml").write_text("classes:\n  drop:\n    min_sore: 0.3\n")
    with pytest.raises(ValueError) as refused:
        load_rules(tmp_path / "r.yaml")
    message = str(refused.value)
    assert "\n" not in message and "https://" not in message
    assert message.startswith(f"region rules {tmp_path / 'r.yaml'}: line 3, classes.drop.min_sore: not a key")


def test_a_class_given_twice_is_refused_not_kept_last(tmp_path):
    # YAML keeps the last: the first `drop` rule (its regions) would be dropped without a word.
    (tmp_path / "r.yaml").write_text("classes:\n  drop:\n    min_score: 0.3\n  drop:\n    min_score: 0.9\n")
    with pytest.raises(ValueError, match=r"r.yaml: line 4: .*'drop' is given twice \(first at line 2\): keep one"):
        load_rules(tmp_path / "r.yaml")
