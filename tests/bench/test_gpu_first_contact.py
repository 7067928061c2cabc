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
