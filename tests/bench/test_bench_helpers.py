"""The benchmarks' plumbing: tables, the docs sections `make bench` rewrites, the machine record,
the seed loop's samples. No timing is asserted here (timed figures never go in tests)."""

from __future__ import annotations

import argparse

import pytest

from bench import all as bench_all
from bench.common import (
    Table,
    machine,
    markdown,
    paired_resamples,
    parse_size,
    percentile,
    processor_boxes,
)
from loomlens.data.records import Box


def test_markdown_table_has_title_header_rows_and_notes():
    text = markdown([Table("T", ["a", "b"], [["x|y", "1.00"]], ["a note"])])
    assert text.splitlines()[:5] == ["**T**", "", "| a | b |", "|---|---:|", "| x\\|y | 1.00 |"]
    assert "- a note" in text


def test_replace_section_keeps_everything_outside_the_markers():
    text = "intro\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nafter\n"
    new = bench_all.replace_section(text, "x", "new table\n")
    assert new == "intro\n<!-- bench:x -->\nnew table\n<!-- /bench:x -->\nafter\n"
    with pytest.raises(KeyError):
        bench_all.replace_section(text, "y", "z")


def test_every_benchmark_of_make_bench_has_a_section_in_the_docs():
    text = bench_all.DOC.read_text()
    for name in [*bench_all.PLAN, *bench_all.BY_HAND]:
        assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text, name


def test_machine_record_names_cores_ram_threads_date_and_commit():
    record = machine()
    for key in ("cores", "ram_gb", "torch_threads", "date", "git_commit"):
        assert record[key] is not None, key


def test_small_helpers():
    assert parse_size("512x288") == (512, 288)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([], 0.5) is None


def test_the_seed_loop_sees_the_samples_loomlens_trains_on(tmp_path):
    """`sample_sequence` is the recipe's own batch plan, epoch after epoch."""
    from bench.train_speed import sample_sequence
    from loomlens.data.dataset import plan_batches

    class Data:  # only what plan_batches reads
        tasks = ["od"] * 10
        lengths = list(range(10))

    class Cfg:
        batch_size, order, shuffle, seed, group_by_length = 4, "grouped", True, 3, True

    batches = sample_sequence(Cfg, Data, 5)
    epoch0 = plan_batches(Data.tasks, Data.lengths, 4, "grouped", True, 3, 0)
    epoch1 = plan_batches(Data.tasks, Data.lengths, 4, "grouped", True, 3, 1)
    assert batches == (epoch0 + epoch1)[:5]


def test_paired_resamples_of_a_way_against_itself_and_a_worse_one():
    truth = [[Box("drop", 10, 10, 20, 20)], [Box("drop", 30, 30, 40, 40)], [], [Box("wrinkle", 0, 0, 50, 8)]]
    good = [[Box("drop", 10, 10, 20, 20, 0.9)], [Box("drop", 30, 30, 40, 40, 0.8)], [],
            [Box("wrinkle", 0, 0, 50, 8, 0.7)]]
    bad = [[], [Box("drop", 30, 30, 40, 40, 0.8)], [Box("drop", 1, 1, 9, 9, 0.9)], []]
    same = paired_resamples(truth, good, good, ["drop", "wrinkle"], draws=20)
    assert same["map50"] == {"low": 0.0, "high": 0.0, "below": 0.0} and same["frames"] == 4
    worse = paired_resamples(truth, bad, good, ["drop", "wrinkle"], size=3, draws=20)
    assert worse["frames"] == 3 and worse["map50"]["high"] <= 0 and worse["map50"]["below"] > 0


def test_processor_boxes_reads_the_seeds_way_and_counts_what_no_box_holds(tiny):
    processor = tiny[1]
    ids = processor.tokenizer("drop<loc_100><loc_200><loc_300><loc_400>drop<loc_300><loc_400><loc_100><loc_200>",
                              add_special_tokens=True).input_ids
    boxes, unheld = processor_boxes(processor, ids, (1000, 1000))
    assert [(b.label, b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes] == [("drop", 100, 200, 300, 400, 1.0)]
    assert unheld == 1  # the reversed box the processor returns as it was written


def test_make_bench_scores_inference_on_the_adapters_own_val_split_when_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_all, "ADAPTER", tmp_path / "seed0")
    monkeypatch.setattr(bench_all, "ADAPTER_DATA", tmp_path / "data-0" / "data")
    assert bench_all.command("infer_speed", None)[-2:] == ["--images", "32"]  # nothing kept: synthetic frames
    (tmp_path / "seed0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "data-0" / "data").mkdir(parents=True)
    assert bench_all.command("infer_speed", None)[-4:] == ["--adapter", str(tmp_path / "seed0"),
                                                          "--data", str(tmp_path / "data-0" / "data")]


def test_make_bench_scores_the_mirrors_on_the_runs_it_kept(tmp_path, monkeypatch):
    kept = tmp_path / "real" / "runs" / "default"
    monkeypatch.setattr(bench_all, "TTA_CASES", (("demo", tmp_path / "seed0", tmp_path / "d", "val"),
                                                 ("aitex", kept, tmp_path / "real" / "data", "test")))
    (kept / "checkpoints").mkdir(parents=True)
    assert bench_all.command("tta", None)[3:] == ["--case", "aitex", str(kept), str(tmp_path / "real" / "data"), "test"]
    assert bench_all.command("tta", None, small=True)[-2:] == ["--images", "32"]


def test_ablate_reuses_a_finished_run_resumes_an_unfinished_one_and_redoes_other_settings(tmp_path):
    from bench import ablate
    from loomlens.config import TrainConfig, dump_config, load_config

    data, run = tmp_path / "data", tmp_path / "run"
    run.mkdir()
    chosen = ablate.settings(10, 5, ablate.VARIANTS["augment-off"])
    assert chosen == {"max_steps": "10", "eval_every": "5", "augment": "false"}
    assert ablate.finished(run, data, chosen) is None  # nothing there yet
    dump_config(load_config(TrainConfig, overrides={"data": str(data), "out": "elsewhere", **chosen,
                                                    "speed.micro_batch": "8"}), run / "config.yaml")
    header = "step,seconds,val_loss,map50,map50_95,best_f1,empty_on_defects,event\n"
    (run / "metrics.csv").write_text(header + "5,1.0,2.0,0.1,0.05,0.2,0.5,\n")
    assert ablate.finished(run, data, chosen) is False  # stopped at step 5 of 10: resume it
    (run / "metrics.csv").write_text(header + "5,1.0,2.0,0.1,0.05,0.2,0.5,\n10,2.0,1.5,0.3,0.1,0.4,0.25,rollback\n")
    assert ablate.finished(run, data, chosen) is True
    assert ablate.finished(run, data, ablate.settings(10, 5, ablate.VARIANTS["r32"])) is None  # other settings
    row = ablate.summary(run)
    assert (row["best_map50"], row["best_step"], row["last_empty"], row["events"]) == (0.3, 10, 0.25, ["10: rollback"])


def test_the_fabric_set_is_a_labelimg_folder_convert_reads_whole(tmp_path):
    from bench import fabric
    from loomlens.data.convert import convert

    fabric.write_frames(tmp_path / "src", frames=6, seed=3, size=128, words=fabric.PLANT_WORDS)
    report = convert(tmp_path / "src", tmp_path / "data")
    assert not report.problems
    assert report.classes and set(report.classes) <= set(fabric.PLANT_WORDS.values())  # a plant's words only
    records = sorted((tmp_path / "src" / "annotations").glob("*.xml"))
    assert len(records) == 6 and len(list((tmp_path / "src" / "images").glob("*.png"))) == 6
    fabric.write_frames(tmp_path / "again", frames=6, seed=3, size=128, words=fabric.PLANT_WORDS)  # same seed, same frames
    assert [p.read_text() for p in records] == [p.read_text().replace("again", "src")
                                                for p in sorted((tmp_path / "again" / "annotations").glob("*.xml"))]
    fabric.write_frames(tmp_path / "clean", frames=4, seed=3, size=128, words=fabric.PLANT_WORDS, empty=1.0)
    assert not any("<object>" in p.read_text() for p in (tmp_path / "clean" / "annotations").glob("*.xml"))


def test_a_printed_fabric_set_is_the_plain_set_of_its_seed_with_a_print_over_each_frame(tmp_path):
    import numpy as np
    from PIL import Image

    from bench import fabric

    for name, printed in (("plain", False), ("printed", True), ("again", True)):
        fabric.write_frames(tmp_path / name, frames=4, seed=3, size=96, words={}, printed=printed)

    def read(name: str, kind: str, suffix: str) -> list:
        paths = sorted((tmp_path / name / kind).glob(f"*{suffix}"))
        return [p.read_text().replace(name, "x") if suffix == ".xml" else np.asarray(Image.open(p), np.int16)
                for p in paths]

    assert read("plain", "annotations", ".xml") == read("printed", "annotations", ".xml")  # same scenes, same boxes
    plain, printed = read("plain", "images", ".png"), read("printed", "images", ".png")
    assert all(np.abs(a - b).mean() > 5 for a, b in zip(plain, printed))  # every frame carries a print
    assert all((a == b).all() for a, b in zip(printed, read("again", "images", ".png")))  # the same seed, the same print
    design = fabric._design(np.random.default_rng(0))
    ink = np.asarray(fabric._print(np.random.default_rng(1), Image.new("RGB", (64, 64), (200, 200, 200)), design))
    assert ink.std() > 5 and ink.max() <= 200  # a pattern, multiplied into the cloth (never brighter)


def test_an_uneven_fabric_set_keeps_the_rare_classes_rare(tmp_path):
    from collections import Counter

    from bench import fabric

    weights = fabric.class_weights(0.04)
    assert weights[fabric.COMMON_FIRST[0]] == 1 and abs(weights[fabric.COMMON_FIRST[-1]] - 0.04) < 1e-12
    assert list(weights.values()) == sorted(weights.values(), reverse=True)
    assert set(weights) == set(fabric.PLANT_WORDS)  # every class the generator draws has a rate
    fabric.write_frames(tmp_path / "only", frames=5, seed=3, size=96, words={}, empty=0.0, rare=0.0)
    labels = Counter(line.strip() for p in (tmp_path / "only" / "annotations").glob("*.xml")
                     for line in p.read_text().splitlines() if line.strip().startswith("<name>"))
    assert labels and set(labels) == {"<name>thread</name>"}  # at rate 0 every class but the commonest is gone
    fabric.write_frames(tmp_path / "clean", frames=3, seed=3, size=96, words={}, empty=1.0, rare=0.5)
    assert not any("<object>" in p.read_text() for p in (tmp_path / "clean" / "annotations").glob("*.xml"))


def test_a_fabric_frame_that_is_not_square_is_a_band_whose_boxes_stay_in_view(tmp_path):
    from PIL import Image

    from bench import fabric
    from loomlens.data.voc import read_voc_file

    assert fabric.size_flag("512") == 512 and fabric.size_flag("1920x1080") == (1920, 1080)
    assert fabric.size_flag("640X640") == 640
    for bad in ("wide", "1920x", "16x9", "1x2x3", "16", "-640x480"):
        with pytest.raises(argparse.ArgumentTypeError, match="width x height"):
            fabric.size_flag(bad)
    fabric.write_frames(tmp_path / "src", frames=12, seed=5, size=(96, 160), words={})
    boxes = 0
    for xml in sorted((tmp_path / "src" / "annotations").glob("*.xml")):
        record, problems = read_voc_file(xml, tmp_path / "src")
        assert record and not problems
        assert (record.width, record.height) == (96, 160)
        assert Image.open(tmp_path / "src" / record.image).size == (96, 160)
        for b in record.boxes:
            assert 0 <= b.x1 < b.x2 <= 96 and 0 <= b.y1 < b.y2 <= 160
        boxes += len(record.boxes)
    assert boxes > 0


def test_a_band_keeps_a_defect_whole_where_an_offset_can_and_clips_one_where_none_can():
    import numpy as np
    from PIL import Image

    from bench import fabric
    from loomlens.data.shapes import Scene

    image = Image.new("RGB", (100, 100))
    spot, crease = Box("hole", 10, 10, 20, 20), Box("crease", 30, 60, 70, 90)  # 30 px tall
    kept = set()
    for seed in range(8):  # no 40 px band holds both; one whole and the other out of view, never one cut
        band, boxes = fabric._band(np.random.default_rng(seed), Scene(image, [spot, crease], ["", ""]), 100, 40)
        assert band.size == (100, 40) and len(boxes) == 1
        whole = {"hole": spot, "crease": crease}[boxes[0].label]
        assert (boxes[0].width, boxes[0].height) == (whole.width, whole.height) and boxes[0].y2 <= 40
        kept.add(boxes[0].label)
    assert kept == {"hole", "crease"}  # either offset, drawn at random
    # A 50 px crease in a 40 px band: every offset cuts it, so it is clipped to what is in view.
    _, boxes = fabric._band(np.random.default_rng(0), Scene(image, [Box("crease", 30, 20, 70, 70)], [""]), 100, 40)
    assert len(boxes) == 1 and boxes[0].height <= 40 and 0 <= boxes[0].y1 < boxes[0].y2 <= 40


def test_convert_speed_compares_the_two_ways_on_the_same_output_and_puts_the_shipped_way_back(tmp_path, monkeypatch):
    import json

    from bench import convert_speed
    from loomlens.data import atomic, convert

    shipped = (convert._workers, dict(atomic.SAVE_OPTIONS))
    monkeypatch.setattr(convert_speed, "WORK", tmp_path)
    assert convert_speed.main(["--frames", "4", "--size", "1280", "--repeats", "1", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["same_samples"] and result["same_pixels"] and result["tiles"] > 0
    assert all(len(result[way]["runs"]) == 1 and result[way]["bytes"] > 0 for way in convert_speed.WAYS)
    assert (convert._workers, atomic.SAVE_OPTIONS) == shipped


def test_real_scores_rank_frames_by_answer_probability_and_show_the_box_ranking_beside():
    from bench import real
    from loomlens.data.records import Box

    truth = [[Box("stain", 0, 0, 10, 10)], [], [Box("stain", 0, 0, 10, 10)], []]
    predicted = [[Box("stain", 50, 50, 60, 60, 0.2)], [Box("stain", 0, 0, 10, 10, 0.9)], [], []]
    got = real.scores(truth, predicted, ["stain"], [0.9, 0.3, 0.8, 0.1])
    assert (got["auroc"], got["recall_at_1pct"]) == (1.0, 1.0)  # both defective frames above both good ones
    assert got["auroc_box"] == 0.375 and got["recall_at_1pct_box"] == 0.0
    old = {"map50": 0.1, "map50_95": 0.05, "auroc": 0.7, "recall_at_1pct": 0.15, "boxes": 3}  # saved before
    assert real.score_cells(old)[2:8] == ["-", "-", "-", "-", "0.700", "0.150"]  # no val figures either


def test_placement_table_counts_each_adapters_true_boxes_by_band():
    from bench import real
    from loomlens.data.records import Box

    truth = [[Box("a", 0, 0, 10, 10), Box("b", 50, 50, 60, 60)], [Box("c", 0, 0, 5, 5)]]
    predicted = [[Box("a", 0, 0, 10, 10, 0.9), Box("a", 50, 50, 60, 60, 0.5)], []]
    got = real.scores(truth, predicted, ["a", "b", "c"])
    run = {"name": "default", "best": got, "last": {**got, "placed": {**got["placed"], "named": 0}}}
    (table,) = real.placement_table({"runs": [run]})
    assert [row[1:] for row in table.rows] == [["1", "1", "0", "0", "1"], ["0", "1", "0", "0", "1"]]
    before = {**got, "placed": {"named": 1, "renamed": 1, "near": 0, "missed": 1}}  # saved before `centred`
    (table,) = real.placement_table({"runs": [{"name": "default", "best": before, "last": before}]})
    assert table.rows[0][1:] == ["1", "1", "0", "-", "1"]
    old = {k: v for k, v in got.items() if k != "placed"}  # a result saved before it was counted
    assert real.placement_table({"runs": [{"name": "default", "best": old, "last": old}]}) == []


def test_rescore_keeps_the_training_and_scores_the_kept_adapters_again(monkeypatch, tmp_path):
    from bench import real
    from loomlens.data.records import Box

    truth = [[Box("stain", 0, 0, 10, 10)], []]
    asked = []

    def predicted(frames, out, *source, tile):
        asked.append((out.name, source[-1], tile))
        return [[Box("stain", 0, 0, 10, 10, 0.5)], []], [0.9, 0.2]

    monkeypatch.setattr(real, "predicted_boxes", predicted)
    old = {"map50": 0.0, "map50_95": 0.0, "auroc": 0.5, "recall_at_1pct": 0.0, "ap50": {}, "boxes": 0}
    saved = {"bench": "real", "command": "python -m bench.real", "machine": {"date": "then"}, "frames": 2,
             "defective": 1, "budget_s": 60.0, "classes": ["stain"], "yolo": {"name": "yolo11n", "skipped": "no"},
             "untrained": old, "runs": [{"name": "default", "steps": 7, "best_step": 5, "best": old, "last": old}]}
    held = {"test": (["a.png", "b.png"], truth), "val": (["c.png", "d.png"], [[], []])}
    result = real.rescore(saved, held, ["stain"], work=tmp_path, tile=256)
    assert [a[:2] for a in asked] == [("untrained", "tiny"), ("untrained-val", "tiny"), ("default-best", "best"),
                                      ("default-best-val", "best"), ("default-last", "last"), ("default-last-val", "last")]
    run = result["runs"][0]
    assert (run["steps"], run["best_step"]) == (7, 5) and run["best"]["map50"] == 1.0 and run["last"]["auroc"] == 1.0
    assert run["best"]["val"]["boxes"] == 1 and run["best"]["val"]["map50"] == 0.0  # a box on a clean val frame
    cells = real.score_cells(run["best"])
    assert cells[:3] == ["1.000", "1.000", "0.000"] and real.score_cells(old)[2] == "-"  # saved before: no val
    assert result["rescored_from"] == {"command": "python -m bench.real", "date": "then"} and "machine" not in result
    assert real.tables(result)[0].notes[-1].startswith("re-scored: the adapters trained by `python -m bench.real`")


def test_the_best_step_is_the_one_the_run_chose_not_the_highest_map50(tmp_path):
    # best/ is chosen by the selection score (mean of mAP50 and F1 by default): the table's
    # "best step" must name that adapter's step, not the evaluation with the highest mAP50.
    from bench.real import history

    (tmp_path / "metrics.csv").write_text(
        "step,train_loss,map50,best_f1,score,event\n"
        "1,9.0,,,,\n"
        "100,,0.30,0.10,0.20,\n"
        "300,,0.25,0.35,0.30,\n"
        "400,,0.20,0.40,0.30,\n"
        "420,3.0,,,,\n")
    got = history(tmp_path)
    assert (got["steps"], got["best_step"], got["best_val_map50"]) == (420, 300, 0.25)
    assert got["evals"] == [(100, 0.30), (300, 0.25), (400, 0.20)]


def test_the_fabric_table_says_when_its_frames_were_tiled():
    from bench import fabric

    assert fabric.tiled({"tile": 256, "tile_given": 256}) == " and --tile 256, predicted in 256 px tiles and whole"
    assert fabric.tiled({"tile": 256, "tile_given": None}) == (
        " (its --tile auto cut 256 px tiles), predicted in 256 px tiles and whole")
    assert fabric.tiled({"tile": None}) == fabric.tiled({}) == ""  # whole frames, and results from before the flag
    assert fabric.tiled({"tile": None, "tile_given": "off"}) == " and --tile off (whole frames only)"
    assert fabric.tile_flag("off") == "off" and fabric.tile_flag("256") == 256
    assert fabric.share_flag("0.7") == 0.7 and fabric.share_flag("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 1"):
        fabric.share_flag("70")
