"""The GPU first-contact script's CPU rehearsal (`--small`) runs end to end and writes its
JSON and markdown, so the GPU run is known to start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomlens.model.standin import shared_folder

SHARED = shared_folder(Path(__file__).resolve().parents[2])


@pytest.mark.skipif(not (SHARED / "README.md").exists(), reason=f"the real Florence-2 files are not at {SHARED}")
def test_small_rehearsal_writes_the_result_and_table(tmp_path):
    from bench.gpu_first_contact import main

    assert main(["--small", "--steps", "1", "--batch", "1", "--frames", "2", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["shape"] == "shrunk" and result["loomlens"]["samples_per_s"] > 0
    assert result["seed"]["images_per_s"] > 0
    assert "| training samples/s |" in (tmp_path / "r.md").read_text()


@pytest.mark.skipif(not (SHARED / "README.md").exists(), reason=f"the real Florence-2 files are not at {SHARED}")
def test_fit_rehearsal_trains_with_the_defaults_and_reports_the_micro_batch(tmp_path):
    from bench.fit_gpu import main

    assert main(["--small", "--steps", "2", "--out", str(tmp_path / "fit.json")]) == 0
    result = json.loads((tmp_path / "fit.json").read_text())
    run = result["run"]
    assert run["steps"] == 2 and run["micro_batch"] == run["batch_size"] == 8  # a CPU takes whole batches
    assert run["targets"] == "seed" and run["seconds_per_step"] > 0
    assert "| shrunk (128 px) |" in (tmp_path / "fit.md").read_text()


def test_memory_table_gives_the_marginal_sample_per_preset():
    from bench.memory import tables

    runs = [{"shape": "large", "preset": p, "batch": b, "checkpointing": c, "step_peak_mb": mb, "image_size": 768,
             "precision": "bf16 autocast"}
            for p, c, b, mb in [("seed", False, 1, 100), ("seed", False, 8, 800), ("seed", True, 1, 50),
                                ("seed", True, 8, 120), ("language", False, 1, 40), ("language", False, 8, 40)]]
    table = tables({"runs": runs, "device": "cuda"})[0]
    assert table.columns[-3:] == ["batch 1", "batch 8", "per extra sample"]
    assert [row[1:3] + row[-1:] for row in table.rows] == [["seed", "off", "100"], ["seed", "on", "10"],
                                                           ["language", "off", "0"]]
