"""`loomlens select`: frames ranked by what labelling them would teach, picked with diversity,
written for LabelImg."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.data.records import Box
from loomlens.predict.predictor import Prediction
from loomlens.predict.regions import RegionRules
from loomlens.predict.select import (
    box_threshold,
    check_weights,
    flip_disagreement,
    frame_signals,
    open_rules,
    rank_frames,
    threshold_uncertainty,
)
from loomlens.predict.sources import Item

W, H = 120, 80


def picture(seed: int) -> Image.Image:
    """A noise picture of its own: frames with different seeds lie far apart in the embedding."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


def frame(name: str, boxes: list[Box], *, seed: int, flipped: list[Box] | None = None, threshold: float = 0.3,
          image: Image.Image | None = None):
    item = Item(source=Path(f"/pool/{name}.png"), image=image or picture(seed))
    mirror = None if flipped is None else Prediction("od", W, H, flipped)
    return frame_signals(item=item, prediction=Prediction("od", W, H, boxes), flipped=mirror, threshold=threshold)


def test_a_frame_whose_box_sits_at_the_threshold_ranks_above_a_confident_one():
    assert threshold_uncertainty(score=0.3, threshold=0.3) == pytest.approx(1.0)
    assert threshold_uncertainty(score=0.97, threshold=0.3) < 0.02
    assert threshold_uncertainty(score=0.5, threshold=0.2) == pytest.approx(0.25)  # odds 1 against 1/4

    confident = frame("confident", [Box("drop", 10, 10, 30, 30, 0.97)], seed=1)
    doubtful = frame("doubtful", [Box("drop", 10, 10, 30, 30, 0.97), Box("wrinkle", 50, 20, 90, 40, 0.32)], seed=2)
    empty = frame("empty", [], seed=3)
    ranked = rank_frames([confident, empty, doubtful], n=1, diversity=0.0)
    assert [r.signals.source.stem for r in ranked] == ["doubtful", "confident", "empty"]
    first = ranked[0]
    assert first.chosen and first.rank == 1 and not ranked[1].chosen
    assert first.signals.nearest.label == "wrinkle" and first.signals.uncertainty > 0.9
    assert "pick 1 of 1" in first.reason and "wrinkle" in first.reason and "0.32" in first.reason
    # the pre-annotation holds what a person would otherwise draw: the boxes at or above the threshold
    assert [b.label for b in first.signals.shown] == ["drop", "wrinkle"]


def test_flip_disagreement_on_hand_made_boxes():
    drop, wrinkle = Box("drop", 10, 10, 30, 30), Box("wrinkle", 50, 50, 90, 60)
    assert flip_disagreement(boxes=[], flipped=[]) == 0.0
    assert flip_disagreement(boxes=[drop, wrinkle], flipped=[drop, wrinkle]) == 0.0
    assert flip_disagreement(boxes=[drop], flipped=[]) == 1.0
    assert flip_disagreement(boxes=[drop], flipped=[Box("wrinkle", 10, 10, 30, 30)]) == 1.0  # labels must agree
    assert flip_disagreement(boxes=[drop], flipped=[Box("drop", 20, 10, 40, 30)]) == 1.0  # IoU 1/3 < 0.5
    assert flip_disagreement(boxes=[drop, wrinkle], flipped=[drop]) == pytest.approx(1 - 2 / 3)

    # The mirror's boxes come in the mirror's pixels and are mirrored back: drop's x 10..30 is
    # 90..110 there. The mirror also finds a box the frame does not, and one below the threshold.
    signals = frame("f", [Box("drop", 10, 10, 30, 30, 0.9), Box("wrinkle", 50, 50, 90, 60, 0.8)], seed=4,
                    flipped=[Box("drop", W - 30, 10, W - 10, 30, 0.85), Box("drop", 0, 60, 20, 70, 0.7),
                             Box("wrinkle", W - 90, 50, W - 50, 60, 0.05)])
    assert (signals.flip_boxes, signals.matched) == (2, 1)
    assert signals.disagreement == pytest.approx(1 - 2 * 1 / (2 + 2))
    assert "the mirrored frame finds 2 box(es) where the frame finds 2, 1 matching" in rank_frames(
        [signals], n=1)[0].reason

    # Region rules hold in the frame's pixels: the mirror's boxes meet them once mirrored back.
    left_only = RegionRules.model_validate({"classes": {"drop": {"regions": [[[0, 0], [0.5, 0], [0.5, 1], [0, 1]]]}}})
    item = Item(source=Path("/pool/r.png"), image=picture(8))
    signals = frame_signals(item=item, prediction=Prediction("od", W, H, [Box("drop", 10, 10, 30, 30, 0.9),
                                                                          Box("drop", 90, 10, 110, 30, 0.9)]),
                            flipped=Prediction("od", W, H, [Box("drop", W - 30, 10, W - 10, 30, 0.9)]),
                            threshold=0.3, rules=left_only)
    assert [b.x1 for b in signals.boxes] == [10] and signals.disagreement == 0.0


def test_diversity_drops_a_duplicate_frame():
    at_threshold = [Box("drop", 10, 10, 30, 30, 0.3)]
    a = frame("a", at_threshold, seed=5)
    twin = frame("twin", at_threshold, seed=5)  # the same picture again (a stopped loom)
    other = frame("other", [Box("drop", 10, 10, 30, 30, 0.6)], seed=6)  # less doubtful, but new
    brighter = frame("brighter", at_threshold, seed=7, image=Image.eval(picture(5), lambda v: min(255, v + 10)))

    by_score = rank_frames([a, twin, other], n=2, diversity=0.0)
    assert {r.signals.source.stem for r in by_score if r.chosen} == {"a", "twin"}

    ranked = rank_frames([a, twin, other, brighter], n=2, diversity=0.5)
    assert [r.signals.source.stem for r in ranked if r.chosen] == ["a", "other"]
    left = {r.signals.source.stem: r for r in ranked if not r.chosen}
    for stem in ("twin", "brighter"):  # a brighter copy embeds where the frame does
        assert left[stem].spread < 0.25 and "near-duplicate of the chosen /pool/a.png" in left[stem].reason


def test_thresholds_come_from_the_run_rules_and_are_lifted_for_prediction():
    rules = RegionRules.model_validate({"min_score": 0.4, "classes": {"drop": {"min_score": 0.6, "regions": [
        [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]]}}})
    assert box_threshold(Box("drop", 0, 0, 1, 1), rules=rules) == 0.6
    assert box_threshold(Box("wrinkle", 0, 0, 1, 1), rules=rules) == 0.4
    assert box_threshold(Box("drop", 0, 0, 1, 1), rules=rules, threshold=0.1) == 0.1
    assert box_threshold(Box("drop", 0, 0, 1, 1), rules=RegionRules()) == 0.2  # rules with no threshold
    lifted = open_rules(rules)
    assert lifted.keep(Box("drop", 1, 1, 2, 2, 0.01), 100, 100)  # low score kept
    assert not lifted.keep(Box("drop", 80, 1, 90, 2, 0.99), 100, 100)  # region still applies
    with pytest.raises(ValueError, match="unknown component"):
        check_weights({"novelty": 1})
    # The components not named keep their weight: `--weights entropy=0.5` halves one, not zeroes two.
    assert check_weights({"entropy": 0.5}) == {"uncertainty": 1.0, "entropy": 0.5, "disagreement": 1.0}
    with pytest.raises(ValueError, match="one above 0"):
        check_weights({"uncertainty": 0, "entropy": 0, "disagreement": 0})


# --- the command, end to end, on the tiny model ----------------------------------------------

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as `loomlens train` writes it, its adapter as initialised (a no-op)."""
    from loomlens.data.synth import CLASSES
    from loomlens.model import load_model
    from loomlens.model.lora import LoraSettings, apply_lora

    run = tmp_path_factory.mktemp("run")
    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets="q_proj", r=2)).save_pretrained(
        run / "checkpoints" / "best", save_embedding_layers=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": "d"}))
    (run / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return run


def test_select_command_writes_the_ranking_and_labelimg_files(run_folder, tmp_path):
    from loomlens.data.synth import synthesize
    from loomlens.data.voc import read_voc

    synthesize(tmp_path / "pool", images=4, seed=3, size=(192, 108))
    frames = tmp_path / "pool" / "images"
    (frames / "broken.jpg").write_bytes(b"")  # a failed copy: skipped, listed, never fatal
    Image.new("RGB", (64, 48)).save(frames / os.fsdecode(b"caf\xe9.jpg"), "JPEG")  # a Latin-1 name: the same
    out = tmp_path / "to-label"
    result = CliRunner().invoke(app, ["select", str(frames), "--adapter", str(run_folder), "--n", "2",
                                      "--out", str(out), "--threshold", "0.001", "--max-boxes", "2",
                                      "--batch-size", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ranked 4 frames, chose 2" in result.output and "broken.jpg is empty" in result.output

    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert [r["chosen"] for r in rows] == ["yes", "yes", "no", "no"]
    assert all(r["reason"] and r["entropy"] and r["disagreement"] and r["uncertainty"] for r in rows)
    assert all(0 <= float(r["score"]) <= 1 for r in rows)
    chosen = [r["frame"] for r in rows if r["chosen"] == "yes"]

    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(name.rsplit("/", 1)[-1] for name in chosen)
    assert all((out / "images" / name).stat().st_nlink == 1 for name in images)  # copies by default
    read = read_voc(out)
    assert read.problems == [] and len(read.records) == 2
    boxes = {r.image.rsplit("/", 1)[-1]: len(r.boxes) for r in read.records}
    assert boxes == {r["frame"].rsplit("/", 1)[-1]: int(r["boxes"]) for r in rows if r["chosen"] == "yes"}
    problems = json.loads((out / "problems.json").read_text())
    assert sorted(p["source"].rsplit("/", 1)[-1] for p in problems) == ["broken.jpg", "caf\\xe9.jpg"]


def test_select_command_errors_name_the_input_and_the_fix(run_folder, tmp_path):
    runner = CliRunner()
    missing = tmp_path / "nowhere" / "frame.png"
    result = runner.invoke(app, ["select", str(missing), "--adapter", str(run_folder), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no such file" in result.output and str(missing) in result.output

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["select", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--adapter RUN" in result.output
    result = runner.invoke(app, ["select", str(tmp_path / "a.png"), "--adapter", str(run_folder),
                                 "--weights", "novelty=2"])
    assert result.exit_code == 1 and "unknown component(s) novelty" in result.output


def test_a_bad_out_is_refused_before_any_frame_is_scored(tmp_path, monkeypatch):
    from loomlens.predict import Predictor, select

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("x")
    monkeypatch.setattr(select, "score_frames", lambda *a, **k: pytest.fail("scored before --out was checked"))
    with pytest.raises(ValueError, match="is a file"):
        select.select_frames(Predictor(model="tiny", tta="off"), [str(tmp_path / "a.png")], tmp_path / "taken", n=1)


def test_select_refuses_a_predictor_that_already_fuses_mirrors(tmp_path):
    """The mirrored frame is one of select's measures: mirrors fused away first would hide it."""
    from loomlens.predict import Predictor
    from loomlens.predict.select import select_frames

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="tta='off'"):
        select_frames(Predictor(model="tiny", tta="on"), [str(tmp_path / "a.png")], tmp_path / "o", n=1)
