"""`loomlens eval` on a bare tiny model and a tiny converted split."""

import json
from pathlib import Path

from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.data.convert import convert
from loomlens.data.synth import synthesize


def test_eval_command_writes_the_report(tmp_path):
    synthesize(tmp_path / "raw", images=4, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny",
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["max_boxes"] == 20  # no run, so no densest frame known: the floor
    assert metrics["model"] == "tiny" and metrics["split"] == "val" and "map50" in metrics
    assert (tmp_path / "eval" / "report.md").exists()
    assert "recall @1% FA" in result.output.replace("\n", " ") or "recall @1%" in result.output
    assert "OK/NG by the defect probability: AUROC" in result.output  # with the score for each rate, if any
    assert (f"their names set aside: mAP50 {metrics['located']['map50']:.3f}" in result.output) == bool(
        metrics["gt_boxes"])  # no true box: no AP to give
    assert ("true boxes at score >= " in result.output) == bool(metrics["gt_boxes"])
    assert metrics["constrained"] is False  # a bare model has no classes: the free form
    assert metrics["tile"] is None  # nor a crop: whole frames
    assert metrics["views"] == [""]  # nor mirrors it learnt: each image looked at once


def test_eval_looks_through_the_mirrors_asked_for(tmp_path):
    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    command = ["eval", "--data", str(tmp_path / "data"), "--model", "tiny", "--out", str(tmp_path / "eval"),
               "--max-boxes", "2"]
    result = CliRunner().invoke(app, [*command, "--tta", "on"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["views"] == ["", "h", "v", "hv"]
    assert "fused over 4 views" in result.output
    assert "3 mirror(s) (h, v, hv) and the boxes fused" in (tmp_path / "eval" / "report.md").read_text()
    result = CliRunner().invoke(app, [*command, "--tta", "maybe"])
    assert result.exit_code == 1 and "tta must be one of auto, on, off" in result.output


def test_eval_command_explains_a_missing_split(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1 and "loomlens convert" in result.output


def test_eval_names_a_missing_or_resized_image_and_an_empty_split_before_the_model_loads(tmp_path, monkeypatch):
    from PIL import Image

    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=4, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    val = [json.loads(line) for line in (tmp_path / "data" / "val.jsonl").read_text().splitlines()]
    first, second = (tmp_path / "data" / val[0]["image"], tmp_path / "data" / val[1]["image"])
    Image.open(first).resize((320, 180)).save(first)  # resized since conversion: every box would move
    second.unlink()
    command = ["eval", "--data", str(tmp_path / "data"), "--model", "tiny", "--out", str(tmp_path / "eval")]
    result = CliRunner().invoke(app, command)
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in output, output
    assert f"val.jsonl:1: image '{val[0]['image']}' is 320x180, but the sample says 160x90" in output
    assert f"val.jsonl:2: image '{val[1]['image']}' not found" in output
    (tmp_path / "data" / "val.jsonl").write_text("")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "val.jsonl holds no samples" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "eval").exists()  # nothing written for it


def test_eval_names_a_true_box_it_cannot_read_instead_of_scoring_its_frame_as_defect_free(tmp_path, monkeypatch):
    """A hand-edited split's `drop<loc_10><loc_20>` (two corners short) parsed to no box, so
    a frame with a defect was scored as a good one, every metric off and nothing said."""
    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=4, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    val = [json.loads(line) for line in (tmp_path / "data" / "val.jsonl").read_text().splitlines()]
    val[1]["suffix"] = "drop<loc_10><loc_20>"
    (tmp_path / "data" / "val.jsonl").write_text("".join(json.dumps(v) + "\n" for v in val))
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny",
                                      "--out", str(tmp_path / "eval")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in output, output
    assert "val.jsonl:2: the true boxes 'drop<loc_10><loc_20>' hold 1 part that is no box" in output, output
    assert not (tmp_path / "eval").exists()


def test_a_report_folder_that_cannot_take_the_report_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """`--out afile/report` ended in a NotADirectoryError traceback, then a one-line error once
    the model had loaded; `--out afile` was found as late; a folder of other files was written
    among, its own files of those names overwritten (now it would be replaced whole)."""
    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    (tmp_path / "afile").write_text("x")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "report.md").write_text("my own notes")  # no metrics.json: no earlier eval's
    runs = tmp_path / "runs"  # an earlier report's folder that a run was trained into since
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "config.yaml").write_text("model: tiny\n")
    (runs / "metrics.json").write_text('{"map50": 0.5, "images": 1}')
    for out, says in ((tmp_path / "afile" / "report", f"{tmp_path / 'afile'} is a file, so the report folder "
                       f"{tmp_path / 'afile' / 'report'} cannot be made below it: give another folder"),
                      (tmp_path / "afile", f"the report folder {tmp_path / 'afile'} is a file; give a folder"),
                      *((folder, f"the report folder {folder} already exists and is not empty: it is no earlier "
                         "eval report (one holds the metrics.json eval wrote, and no folder), and eval replaces its "
                         "report folder whole: give --out a new or empty folder, or an earlier report's folder")
                        for folder in (photos, runs))):
        result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny",
                                          "--out", str(out)])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not loaded
        assert says in output, output
    assert [p.name for p in photos.iterdir()] == ["report.md"] and (photos / "report.md").read_text() == "my own notes"
    assert (runs / "r1" / "config.yaml").exists()


def test_the_working_folder_is_no_report_folder(tmp_path, monkeypatch):
    """`--out .` in an earlier report's folder renamed the working folder away and put a new
    one in its place, leaving the shell in a deleted folder."""
    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text('{"map50": 0.5, "images": 1}')  # as an earlier eval left it
    monkeypatch.chdir(report)
    for out in (".", str(tmp_path)):
        result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny", "--out", out])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert f"the report folder {out} is the working folder or holds it" in output, output
        assert f"give --out a folder of its own, e.g. {Path(out) / 'eval'}" in output, output


def test_an_earlier_report_folder_is_evaluated_into_again(tmp_path):
    """Re-evaluating a run into its default RUN/eval-SPLIT (or any earlier report) goes on."""
    from loomlens.model import load_model
    from loomlens.model.lora import LoraSettings, apply_lora

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    run = tmp_path / "run"
    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets=["q_proj"], r=2)).save_pretrained(run / "checkpoints" / "best")
    (run / "config.yaml").write_text("model: tiny\ntasks: [od]\n")
    command = ["eval", "--data", str(tmp_path / "data"), "--run", str(run), "--max-boxes", "2", "--precision", "fp32"]
    for _ in range(2):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        assert json.loads((run / "eval-val" / "metrics.json").read_text())["split"] == "val"


def test_a_split_file_given_is_named_plainly_and_never_stands_in_for_another_split(tmp_path):
    """`--data val.jsonl --split test` evaluated val.jsonl and wrote eval-val without a word;
    a missing `x.jsonl` was to be made with `loomlens convert SRC x.jsonl`, a folder path."""
    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    val = tmp_path / "data" / "val.jsonl"
    result = CliRunner().invoke(app, ["eval", "--data", str(val), "--split", "test", "--model", "tiny",
                                      "--out", str(tmp_path / "eval")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and f"--split test names another split than the file {val}" in output, output
    missing = tmp_path / "data" / "holdout.jsonl"
    result = CliRunner().invoke(app, ["eval", "--data", str(missing), "--model", "tiny", "--out", str(tmp_path / "eval")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and f"no split file at {missing}" in output and "convert SRC" not in output, output


def test_eval_reads_the_seeds_samples_without_sizes(tmp_path):
    from PIL import Image

    from loomlens.evaluate.report import od_images

    Image.new("RGB", (200, 100)).save(tmp_path / "0 (1).jpg")
    (tmp_path / "test.jsonl").write_text(  # the seed's own line: no width, height or task
        '{"prefix":"<OD>","suffix":"drop<loc_500><loc_500><loc_749><loc_999>","image":"0 (1).jpg"}\n')
    (image,) = od_images(tmp_path / "test.jsonl")
    box = image.truth[0]
    assert (box.label, box.x1, box.y1, box.x2, box.y2) == ("drop", 100.1, 50.05, 149.9, 99.95)


def test_a_run_trained_with_the_defect_crop_is_evaluated_tiled(tmp_path):
    import yaml

    from loomlens.model import load_model
    from loomlens.model.lora import LoraSettings, apply_lora

    synthesize(tmp_path / "raw", images=2, seed=1, size=(600, 90))  # longer than twice the 256 px input
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    run = tmp_path / "run"
    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets=["q_proj"], r=2)).save_pretrained(run / "checkpoints" / "best")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "tasks": ["od"], "data": "nowhere"}))
    (run / "crop.json").write_text('{"window": 256}')  # what training writes when its crop showed windows
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--run", str(run),
                                      "--max-boxes", "2", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert metrics["tile"] == 256 and "256 px tiles" in (run / "eval-val" / "report.md").read_text()


def test_a_split_without_defects_shows_map_as_undefined_not_zero(tmp_path):
    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    val = tmp_path / "data" / "val.jsonl"
    val.write_text("".join(json.dumps({**json.loads(line), "suffix": ""}) + "\n" for line in val.read_text().splitlines()))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny",
                                                            "--out", str(tmp_path / "eval"), "--max-boxes", "2"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│" in line and any(c.isdigit() for c in line))
    assert row.count("n/a") >= 4 and "0.000 │ 0.000" not in row, result.output


def test_a_split_with_no_sample_or_no_od_sample_is_refused_before_the_model_loads_with_its_own_fix(
        tmp_path, monkeypatch):
    """`convert --val-fraction 0` writes an empty val.jsonl; eval loaded the model and then told to
    'convert the data with the od task', which it had been."""
    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    val = tmp_path / "data" / "val.jsonl"
    command = ["eval", "--data", str(tmp_path / "data"), "--model", "tiny", "--out", str(tmp_path / "eval")]
    result = CliRunner().invoke(app, command)
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{val} holds no samples" in output and "--val-fraction" in output and "od task" not in output, output
    line = json.loads((tmp_path / "data" / "train.jsonl").read_text().splitlines()[0])
    val.write_text(json.dumps({**line, "prefix": "<CAPTION>", "suffix": "cloth", "task": "caption"}) + "\n")
    result = CliRunner().invoke(app, command)
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{val} has no <OD> sample to evaluate" in output, output
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_that_is_no_word_nor_folder_or_lies_in_another_run_is_refused_before_the_model_loads(
        tmp_path, monkeypatch):
    """`--checkpoint middle` was told "no such folder: give a run folder, or train one"; `--run A
    --checkpoint B/checkpoints/best` evaluated B and wrote its report over A/eval-val."""
    import loomlens.infer.loading as loading

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    monkeypatch.setattr(loading, "load_for_inference", None)  # any attempt to load would raise TypeError
    mine, other = tmp_path / "mine", tmp_path / "other"
    for run in (mine, other):
        (run / "checkpoints" / "best").mkdir(parents=True)
        (run / "checkpoints" / "best" / "adapter_config.json").write_text("{}")
        (run / "config.yaml").write_text("model: tiny\n")
    (mine / "eval-val").mkdir()
    (mine / "eval-val" / "report.md").write_text("mine")
    command = ["eval", "--data", str(tmp_path / "data"), "--run", str(mine)]
    for checkpoint, says in (("middle", "--checkpoint takes best, last or the path of an adapter folder, not 'middle'"),
                             (str(other / "checkpoints" / "best"),
                              f"--checkpoint {other / 'checkpoints' / 'best'} lies outside the run {mine} (--run)")):
        result = CliRunner().invoke(app, [*command, "--checkpoint", checkpoint])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert says in output, output
    assert (mine / "eval-val" / "report.md").read_text() == "mine"


def test_ctrl_c_during_an_eval_stops_with_a_line_not_a_traceback(tmp_path, monkeypatch):
    import loomlens.evaluate.report as report

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.md").write_text("the last one")
    (tmp_path / "eval" / "metrics.json").write_text('{"map50": 0.5, "images": 1}')  # as an earlier eval left it

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run_split", interrupted)
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny", "--out",
                                      str(tmp_path / "eval"), "--max-boxes", "2"])
    output = " ".join(result.output.split())
    assert result.exit_code == 130 and "stopped: no report was written" in output, result.output
    assert (tmp_path / "eval" / "report.md").read_text() == "the last one"
    assert (tmp_path / "eval" / "metrics.json").read_text() == '{"map50": 0.5, "images": 1}'


def test_the_labelled_folder_given_in_place_of_its_conversion_is_told_to_convert_it(tmp_path):
    """`--data` of LabelImg's folder was told to `loomlens convert SRC` into that very folder."""
    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    for split in ("val", "test"):
        result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "raw"), "--model", "tiny", "--split", split])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and f"{tmp_path / 'raw'} holds voc annotations, not their conversion" in output
        assert f"`loomlens convert {tmp_path / 'raw'} {tmp_path / 'raw-jsonl'}`" in output, output
