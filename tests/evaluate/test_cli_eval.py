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
    assert metrics["constrained"] is False  # a bare model has no classes: the free form


def test_eval_command_explains_a_missing_split(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1 and "loomlens convert" in result.output
