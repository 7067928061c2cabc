"""`loomlens eval` on a bare tiny model and a tiny converted split."""

import json

from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.data.convert import convert
from loomlens.data.synth import synthesize


def test_eval_command_writes_the_report(tmp_path):
    synthesize(tmp_path / "raw", images=4, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "data"), "--model", "tiny",
                                      "--out", str(tmp_path / "eval"), "--max-boxes", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["split"] == "val" and "map50" in metrics
    assert (tmp_path / "eval" / "report.md").exists()
    assert "recall @1% FA" in result.output.replace("\n", " ") or "recall @1%" in result.output
    assert "OK/NG by the defect probability: AUROC" in result.output  # with the score for each rate, if any
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
