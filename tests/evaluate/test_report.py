"""The report on a small converted split: files, keys, plots, and the matching behind them."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from loomlens.data.convert import convert
from loomlens.data.records import Box
from loomlens.data.synth import synthesize
from loomlens.evaluate.matching import best_threshold, confusion_matrix, match_image, placement
from loomlens.evaluate.report import (EvalImage, EvalRun, _markdown, evaluate_jsonl, placement_text, split_metrics,
                                      write_report)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthesize(root / "raw", images=6, seed=3, size=(192, 108), negative_fraction=0.34)
    convert(root / "raw", root / "converted", val_fraction=0.5)
    return root / "converted" / "val.jsonl"


def test_evaluate_jsonl_for_training(tiny, split):
    model, processor = tiny
    m = evaluate_jsonl(model, processor, split, max_images=2, batch_size=2)
    assert m["images"] == 2 and 0.0 <= m["map50"] <= 1.0
    assert set(m["per_class"]) >= {"broken-weft", "drop", "wrinkle"}  # from classes.txt
    assert {"best_f1", "empty_on_defects", "image_level"} <= set(m)  # what training selects and guards by


def test_write_report_files_and_keys(tiny, split, tmp_path):
    model, processor = tiny
    m = write_report(model, processor, split, tmp_path, batch_size=4, max_boxes=4, extra={"model": "tiny"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"] == "tiny"
    for key in ("map50", "map50_95", "map75", "per_class", "images", "negative_images", "best_threshold"):
        assert key in saved and key in m
    assert all("ap50" in c for c in saved["per_class"].values())
    ok_ng = saved["image_level"]
    assert set(ok_ng) >= {"auroc", "recall_at_fpr", "threshold_at_fpr", "per_class"}
    assert set(ok_ng["recall_at_fpr"]) == {"0.01", "0.001"}
    assert 0.0 <= saved["empty_on_defects"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "## Inspection (OK/NG per frame)" in report
    assert set(saved["located"]) == {"map50_95", "map50", "map75"}
    assert f"their names set aside: mAP50 {saved['located']['map50']:.3f}" in report
    for counts in saved["placement"].values():  # every true box lands in one band, with every box and at the cut
        assert sum(counts.values()) == saved["gt_boxes"]
    assert f"with every box the model gave, {placement_text(saved['placement']['any_score'])}; at score" in report
    # The thresholds the report prints are the ones measured, every digit.
    assert float(re.search(r"Best F1 [\d.]+ at score >= ([^;]+);", report).group(1)) == saved["best_threshold"]
    line = re.search(r"All classes: .*", report).group(0)
    printed = [float(t) for t in re.findall(r"\(score >= ([^)]+)\)", line)]
    assert printed == [t for t in ok_ng["threshold_at_fpr"].values() if t is not None]
    for png in ("pr_curves.png", "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"({png})" in (tmp_path / "report.md").read_text()


def test_a_report_written_again_holds_only_the_new_evaluations_files(tiny, split, tmp_path):
    """An earlier worst_images.png stayed beside a report that had none to show."""
    model, processor = tiny
    out = tmp_path / "report"
    write_report(model, processor, split, out, batch_size=4, max_boxes=4)
    assert (out / "worst_images.png").exists()  # the untrained model errs: a gallery
    (out / "notes.txt").write_text("put there by hand")
    (out / ".DS_Store").write_bytes(b"")  # what a file manager hides stays
    write_report(model, processor, split, out, batch_size=4, max_boxes=4, gallery_size=0)
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "confusion_matrix.png", "metrics.json",
                                                     "pr_curves.png", "reliability.png", "report.md"]
    assert "worst_images.png" not in (out / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing set aside is left beside it


def test_a_report_that_fails_part_way_leaves_the_earlier_one_whole(tiny, split, tmp_path, monkeypatch):
    """metrics.json and the first plots were replaced one by one: a write that failed after
    them left a new metrics.json beside the old report.md."""
    from loomlens.evaluate import report

    model, processor = tiny
    out = tmp_path / "report"
    write_report(model, processor, split, out, batch_size=4, max_boxes=4, extra={"model": "first"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_reliability", disk_full)  # the third picture of the second report
    with pytest.raises(ValueError, match=r"the report folder .* cannot be written \(No space left on device\)"):
        write_report(model, processor, split, out, batch_size=4, max_boxes=4, extra={"model": "second"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def box(label, x, score=None):
    return Box(label, x, 0.0, x + 10.0, 10.0, score)


def test_confusion_matrix_has_missed_column_and_false_row():
    truth = [[box("drop", 0), box("wrinkle", 50)], [box("drop", 0)]]
    pred = [[box("wrinkle", 0, 0.9), box("drop", 80, 0.8)], [box("drop", 0, 0.2)]]
    m = confusion_matrix(truth, pred, ["drop", "wrinkle"], threshold=0.5)
    # rows: drop, wrinkle, FP; columns: drop, wrinkle, FN
    assert m.tolist() == [[0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert confusion_matrix(truth, pred, ["drop", "wrinkle"]).tolist() == [[1, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_a_wrong_class_box_scored_higher_never_hides_a_right_one():
    truth = [[Box("a", 0, 0, 10, 10)]]
    pred = [[Box("b", 0, 0, 10, 10, 0.9), Box("a", 0, 0, 10, 9, 0.8)]]
    # rows: a, b, FP; columns: a, b, FN. The a box found it (AP50 1); the b box is the false one.
    assert confusion_matrix(truth, pred, ["a", "b"]).tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    # Without a right-class box the confusion still shows as a pair.
    assert confusion_matrix(truth, [pred[0][:1]], ["a", "b"]).tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_matching_prefers_higher_scores_and_same_class():
    truth = [box("drop", 0)]
    m = match_image(truth, [box("drop", 1, 0.3), box("drop", 0, 0.9)])
    assert m.pairs == [(0, 1)] and m.false == [0]
    assert match_image(truth, [box("wrinkle", 0, 0.9)]).missed == [0]


def test_placement_says_whether_a_true_box_was_named_renamed_near_centred_or_missed():
    truth = [[Box("a", 0, 0, 10, 10), Box("b", 50, 50, 60, 60), Box("a", 100, 100, 104, 103),
              Box("b", 200, 200, 210, 210), Box("a", 300, 300, 304, 303)], [Box("c", 0, 0, 5, 5)], []]
    predicted = [[Box("b", 0, 0, 10, 10, 0.9), Box("a", 0, 0, 10, 11, 0.2),  # its own class too, lower: named
                  Box("a", 50, 50, 60, 60, 0.5),  # the right place, another name: renamed
                  Box("a", 100, 100, 106, 104, 0.1),  # IoU 12 / 24: named, whatever the score
                  Box("b", 202, 202, 212, 212, 0.8),  # IoU 64 / 136: near
                  Box("b", 299, 297, 307, 309, 0.4)],  # IoU 12 / 96, its centre (303, 303) on the 4x3 box: centred
                 [Box("c", 6, 6, 9, 9, 0.9)], [Box("a", 1, 1, 2, 2, 0.3)]]  # beside it, centre 2.5 px out: missed
    assert placement(truth, predicted) == {"named": 2, "renamed": 1, "near": 1, "centred": 1, "missed": 1}
    # the boxes of "a" under 0.3 no longer count: the first true box only has "b" on it, the third none
    assert placement(truth, predicted, threshold=0.3) == {"named": 0, "renamed": 2, "near": 1, "centred": 1,
                                                          "missed": 2}
    assert placement(truth, predicted, slack=3)["centred"] == 2  # (7.5, 7.5) is within 3 px of (0, 0, 5, 5)


def test_best_threshold_cuts_off_low_scoring_false_positives():
    truth = [[box("drop", 0)], []]
    pred = [[box("drop", 0, 0.9)], [box("drop", 0, 0.3)]]
    threshold, f1 = best_threshold(truth, pred)
    assert threshold == pytest.approx(0.9) and f1 == pytest.approx(1.0)


def test_best_threshold_is_a_short_number_that_keeps_the_same_boxes():
    truth = [[box("drop", 0)], []]
    pred = [[box("drop", 0, 0.87654321)], [box("drop", 0, 0.4321)]]
    # The cut keeps the 0.87654321 box, which `score >= 0.877` as printed dropped: 0.8 keeps it.
    assert best_threshold(truth, pred) == (0.8, 1.0)


def test_the_report_prints_each_threshold_with_every_digit():
    truth = [[box("drop", 0)], [], [box("drop", 0)]]
    pred = [[box("drop", 0, 0.87654321)], [box("drop", 0, 0.8761)], [box("drop", 0, 0.99)]]
    images = [EvalImage(Path(f"{i}.png"), t) for i, t in enumerate(truth)]
    run = EvalRun(images, pred, 0, 0.1, [0.87654321, 0.8761, 0.9])
    metrics = split_metrics(run, ["drop"]).metrics
    # Keeps the 0.87654321 box and drops the one at 0.8761; printed as 0.877, it dropped both.
    assert metrics["best_threshold"] == 0.8765
    report = _markdown(metrics, {}, "t")
    assert "at score >= 0.8765;" in report
    assert "false alarms (score >= 0.8762)" in report  # the frame cut: above the good frame at 0.8761


def test_the_plots_name_the_threshold_they_cut_at_exactly(tmp_path, monkeypatch):
    from PIL import Image

    from loomlens.evaluate import plots

    monkeypatch.setattr(plots, "_save", lambda fig, path: fig)
    fig = plots.plot_confusion(np.zeros((2, 2), dtype=int), ["drop"], tmp_path / "c.png", 0.8765)
    assert fig.axes[0].get_title() == "Confusion at IoU 0.5, score >= 0.8765"  # not 0.88, which drops a kept box
    fig = plots.plot_gallery([("a", Image.new("RGB", (8, 8)), [], [])], tmp_path / "g.png", 0.8765)
    assert fig.texts[0].get_text().startswith("Worst images (score >= 0.8765)")


def test_the_gallery_shows_a_line_scan_strip_as_the_window_around_its_errors(tmp_path, monkeypatch):
    from PIL import Image

    from loomlens.evaluate import plots

    spot = Box("nep", 3200, 100, 3204, 104)
    assert plots.error_view(4096, 256, [spot]) == (2946, 0, 3458, 256)  # two strip heights, centred on it
    assert plots.error_view(4096, 256, [Box("nep", 10, 0, 14, 4)]) == (0, 0, 512, 256)  # kept inside the strip
    assert plots.error_view(256, 4096, [Box("nep", 0, 4090, 4, 4094)]) == (0, 3584, 256, 4096)  # upright strips too
    assert plots.error_view(4096, 256, [spot, Box("nep", 100, 0, 110, 9)]) == (36, 0, 3268, 256)  # both, a margin
    assert plots.error_view(1280, 1024, [spot]) == (0, 0, 1280, 1024)  # a camera frame is shown whole
    assert plots.error_view(4096, 256, []) == (0, 0, 4096, 256)
    monkeypatch.setattr(plots, "_save", lambda fig, path: fig)
    items = [("strip", Image.new("RGB", (4096, 256)), [spot], [Box("nep", 10, 0, 20, 9, 0.9)]),
             ("frame", Image.new("RGB", (64, 48)), [], [])]
    fig = plots.plot_gallery(items, tmp_path / "g.png", 0.5)
    strip, frame = fig.axes[:2]
    assert strip.get_xlim() == (0, 3322) and strip.get_title().endswith("x 0-3322 y 0-256 shown")  # both errors
    fig = plots.plot_gallery([(*items[0][:3], [])], tmp_path / "g.png", 0.5)
    assert fig.axes[0].get_xlim() == (2946, 3458) and fig.axes[0].get_title().endswith("x 2946-3458 y 0-256 shown")
    assert frame.get_xlim() == (0, 64) and frame.get_title() == "frame\nmissed 0, false 0"  # shown whole


def test_a_tile_size_detects_large_frames_tiled_as_predict_does(tmp_path, monkeypatch):
    from PIL import Image

    from loomlens.data.florence_text import boxes_to_text
    from loomlens.data.tiles import tile_windows
    from loomlens.evaluate import report
    from loomlens.infer.detection import Detection
    from loomlens.infer.generation import Generation

    truth = Box("drop", 450, 40, 470, 60)
    lines = []
    for name, size in (("large.png", (600, 100)), ("small.png", (100, 80))):
        frame = Image.new("RGB", size)
        if name == "large.png":
            frame.paste((255, 255, 255), (450, 40, 470, 60))
        frame.save(tmp_path / name)
        lines.append({"image": name, "width": size[0], "height": size[1], "prefix": "<OD>",
                      "suffix": boxes_to_text([truth] if name == "large.png" else [], *size)})
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen = []

    def found_in_tiles_only(model, processor, pictures, **_):
        # The defect is found only where it is large enough to see: in a tile, not the whole frame.
        seen.extend(p.size for p in pictures)
        return [Detection([Box("drop", *p.getbbox(), 0.9)] if p.size == (100, 100) and p.getbbox() else [], 1,
                          Generation("", [], [], answer_probability=0.8 if p.getbbox() else 0.1))
                for p in pictures]

    monkeypatch.setattr(report, "detect_with_details", found_in_tiles_only)
    processor = SimpleNamespace(image_processor=SimpleNamespace(size={"height": 100, "width": 100}))  # a 100 px input
    whole = report.run_split(None, processor, report.od_images(tmp_path / "val.jsonl"))
    assert seen == [(600, 100), (100, 80)] and whole.predicted == [[], []]
    seen.clear()
    tiled = report.run_split(None, processor, report.od_images(tmp_path / "val.jsonl"), tile=100)
    # 600 px > 100: tiles (25 % overlap) and the whole frame; 100x80 is not longer: whole.
    assert seen.count((100, 100)) == len(tile_windows(600, 100, 100)) and seen.count((600, 100)) == 1
    assert seen.count((100, 80)) == 1
    assert tiled.dropped == len(seen)  # every model input's malformed parts are counted
    assert [(b.x1, b.x2) for b in tiled.predicted[0]] == [(450, 470)] and tiled.predicted[1] == []
    # A frame's answer probability is its most likely piece's: the tile holding the defect.
    assert tiled.probabilities == [0.8, 0.1] and whole.probabilities == [0.8, 0.1]
    metrics = report.write_report(None, processor, tmp_path / "val.jsonl", tmp_path / "out", tile=100)
    assert metrics["tile"] == 100 and metrics["map50"] == 1.0
    assert "frames longer than 100 px detected in 100 px tiles" in (tmp_path / "out" / "report.md").read_text()


def test_tiled_evaluation_counts_each_defect_once_in_its_frame(tmp_path):
    """A split cut into tiles holds each defect in its frame and in tiles: tiled evaluation
    detects the frames in tiles, so the tile samples are left out; untiled evaluation keeps them."""
    from loomlens.evaluate.report import od_images

    synthesize(tmp_path / "src", images=2, seed=1, size=(768, 432), negative_fraction=0)
    convert(tmp_path / "src", tmp_path / "data", tile=256, val_fraction=0)
    jsonl = tmp_path / "data" / "train.jsonl"
    everything, frames = od_images(jsonl), od_images(jsonl, frames_only=True)
    assert len(frames) == 2 and len(everything) > len(frames)
    assert all("tiles" not in e.path.parts for e in frames) and any("tiles" in e.path.parts for e in everything)
