"""Two processes on CPU (gloo) through `accelerate launch`: same weights, one writer."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_processes_keep_identical_weights_and_only_rank0_writes(small_data, small_model_dir, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(Path(__file__).with_name("ddp_worker.py")),
               str(small_data), str(small_model_dir), str(out), str(weights)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout

    rank0, rank1 = torch.load(weights / "rank0.pt"), torch.load(weights / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # a step was taken

    steps = [r["step"] for r in csv.DictReader(open(out / "metrics.csv")) if r["train_loss"]]
    assert steps == ["1", "2"]  # one writer: no duplicated rows
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]
