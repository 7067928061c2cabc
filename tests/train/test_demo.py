"""`loomlens demo` end to end at a toy size: every stage runs and writes what it says."""

import json

from loomlens.infer.loading import resolve_precision
from loomlens.train.demo import run_demo


def test_demo_runs_every_stage_and_evaluates_as_predict_does(tmp_path):
    summary = run_demo(tmp_path / "demo", images=12, time_budget=4, log=lambda *_: None)
    assert summary.exists() and "loomlens demo" in summary.read_text()
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["steps"] >= 1 and result["after"]["images"] >= 1
    assert set(result["seconds"]) == {"synth", "convert", "evaluate_before", "train", "evaluate_after"}
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    # The report measures the model as `loomlens predict` would run it on this machine.
    assert metrics["precision"] == resolve_precision("auto")
    assert metrics["views"] == ["", "h", "v", "hv"]  # through the mirrors it was trained with
    assert "each also through 3 mirrors, boxes fused" in summary.read_text()
    assert (tmp_path / "demo" / "run" / "checkpoints" / "last" / "adapter_config.json").exists()
