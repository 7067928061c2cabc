"""Training memory per sample of the stand-in Florence-2 (real tokenizer and configs, random
weights), `seed` LoRA preset, with and without gradient checkpointing.

    python -m bench.memory                       # the shrunk stand-in (128 px), batches 1 and 2
    python -m bench.memory --shape base          # the base shape at 768 px (slow on a CPU)

Each measurement runs in a fresh process: build the stand-in, wrap it with the `seed` preset,
make one batch, then one forward + backward (loomlens's loss) while a thread samples the
resident memory (CPU; `max_memory_allocated` on CUDA). Reported: the step's peak above the
memory before it, at each batch size, and the marginal cost of one more sample (the difference
between batch 2 and batch 1), which is what sizes a micro-batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import torch

from bench.common import ROOT, Table, common_flags, fmt, publish, rss_mb, set_threads


class PeakSampler:
    """Samples this process's resident memory every `interval` seconds; `.peak` is the largest (MiB)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def measure(shape: str, batch: int, checkpointing: bool) -> dict:
    """One step's peak memory above the memory before it (MiB), in this process."""
    import numpy as np
    from PIL import Image

    from loomlens.config import LoraSettings
    from loomlens.model.lora import apply_lora
    from loomlens.model.memory import enable_gradient_checkpointing
    from loomlens.model.standin import build_standin, shared_folder
    from loomlens.train.loss import LossSpec, batch_loss

    model, processor = build_standin(shared_folder(ROOT), shrink=shape == "shrunk")
    model = apply_lora(model, LoraSettings(targets="seed", r=8)).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    frames = [Image.fromarray((np.random.default_rng(i).random((432, 768, 3)) * 255).astype("uint8"))
              for i in range(batch)]
    inputs = dict(processor(text=["<OD>"] * batch, images=frames, return_tensors="pt"))
    inputs["labels"] = processor.tokenizer(["broken-weft<loc_10><loc_20><loc_300><loc_400>drop<loc_500>"
                                            "<loc_600><loc_700><loc_800>"] * batch, return_tensors="pt").input_ids
    spec = LossSpec(decoder_start_token_id=2, pad_token_id=processor.tokenizer.pad_token_id)
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        inputs = {k: v.cuda() for k, v in inputs.items()}
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    with PeakSampler() as sampler:
        loss_sum, tokens = batch_loss(model, inputs, spec)
        (loss_sum / tokens).backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.peak
    return {"shape": shape, "batch": batch, "checkpointing": checkpointing, "step_peak_mb": peak - before,
            "device": "cuda" if cuda else "cpu", "image_size": processor.image_processor.size.height}


def tables(result: dict) -> list[Table]:
    """Peak above the model per batch, and the marginal memory of one more sample."""
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in result["runs"]):
        for ckpt in (False, True):
            got = {r["batch"]: r["step_peak_mb"] for r in result["runs"] if r["shape"] == shape
                   and r["checkpointing"] == ckpt}
            if not got:
                continue
            size = next(r["image_size"] for r in result["runs"] if r["shape"] == shape)
            marginal = got[2] - got[1] if 1 in got and 2 in got else None
            rows.append([f"{shape} ({size} px)", "on" if ckpt else "off", fmt(got.get(1), 0), fmt(got.get(2), 0),
                         fmt(marginal, 0)])
    return [Table(f"Training step memory (MiB, {result['device']}), seed preset r=8",
                  ["stand-in", "checkpointing", "batch 1", "batch 2", "per extra sample"], rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["shrunk", "base"], action="append")
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    common_flags(parser, "memory")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.one:  # a child process: one measurement, JSON on stdout
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.one[2] == "1")))
        return 0
    runs = []
    for shape in args.shape or ["shrunk"]:
        for ckpt in ("0", "1"):
            for batch in ("1", "2"):
                cmd = [sys.executable, "-m", "bench.memory", "--one", shape, batch, ckpt]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
    result = {"runs": runs, "device": runs[0]["device"]}
    return publish("memory", result, args.out, argv, tables)


if __name__ == "__main__":
    raise SystemExit(main())
