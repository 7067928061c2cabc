"""Training memory per sample of the stand-in Florence-2 (real tokenizer and configs, random
weights), per LoRA preset, with and without gradient checkpointing.

    python -m bench.memory                                  # the shrunk stand-in (128 px), batches 1 and 2
    python -m bench.memory --shape base                     # the base shape at 768 px (slow on a CPU)
    python -m bench.memory --shape base --shape large --preset seed --preset all-linear --batch 1 --batch 8

One forward + backward (loomlens's loss) per measurement, after the stand-in is built, wrapped
with the preset (LoRA rank 16, the default) and given a batch. On a CPU each measurement runs in
a fresh process while a thread samples the resident memory; on CUDA one process per shape
measures every preset in turn with `max_memory_allocated`, in bf16 autocast as training runs
there. Reported: the step's peak above the memory before it at each batch size, and the
marginal cost of one more sample (between the smallest and largest batch), which sizes a
micro-batch.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import threading
import time

import torch

from bench.common import ROOT, Table, common_flags, fmt, publish, rss_mb, set_threads

ANSWER = "broken-weft<loc_10><loc_20><loc_300><loc_400>drop<loc_500><loc_600><loc_700><loc_800>"


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


def _batch(processor, batch: int, device: str) -> dict:
    """`batch` noise frames of 768x432 with the `<OD>` prompt and a two-box answer, on `device`."""
    import numpy as np
    from PIL import Image

    frames = [Image.fromarray((np.random.default_rng(i).random((432, 768, 3)) * 255).astype("uint8"))
              for i in range(batch)]
    inputs = dict(processor(text=["<OD>"] * batch, images=frames, return_tensors="pt"))
    inputs["labels"] = processor.tokenizer([ANSWER] * batch, return_tensors="pt").input_ids
    return {k: v.to(device) for k, v in inputs.items()}


def _step_peak(model, inputs: dict, spec, cuda: bool) -> float:
    """Peak memory of one forward + backward above the memory before it (MiB)."""
    from loomlens.train.loss import batch_loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    cast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    with PeakSampler() as sampler, cast:
        loss_sum, tokens = batch_loss(model, inputs, spec)
        (loss_sum / tokens).backward()
    model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.peak
    return peak - before


def measure(shape: str, presets: list[str], batches: list[int], checkpointing: list[bool]) -> list[dict]:
    """Every (preset, checkpointing, batch) step peak of one stand-in shape, in this process."""
    from loomlens.config import LoraSettings
    from loomlens.model.lora import apply_lora
    from loomlens.model.memory import enable_gradient_checkpointing
    from loomlens.model.standin import build_standin, shared_folder
    from loomlens.train.loss import LossSpec

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    base, processor = build_standin(shared_folder(ROOT), shape=shape)
    spec = LossSpec(decoder_start_token_id=2, pad_token_id=processor.tokenizer.pad_token_id)
    runs = []
    for preset in presets:
        model = apply_lora(copy.deepcopy(base).to(device), LoraSettings(targets=preset)).train()
        for ckpt in sorted(checkpointing):  # off first: checkpointing cannot be switched off again
            if ckpt:
                enable_gradient_checkpointing(model)
            for batch in batches:
                runs.append({"shape": shape, "preset": preset, "batch": batch, "checkpointing": ckpt,
                             "step_peak_mb": _step_peak(model, _batch(processor, batch, device), spec, cuda),
                             "device": device, "precision": "bf16 autocast" if cuda else "fp32",
                             "image_size": processor.image_processor.size.height})
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return runs


def tables(result: dict) -> list[Table]:
    """Peak above the model per batch, and the marginal memory of one more sample."""
    runs = result["runs"]
    batches = sorted({r["batch"] for r in runs})
    rows = []
    for shape, preset, ckpt in dict.fromkeys((r["shape"], r.get("preset", "seed"), r["checkpointing"]) for r in runs):
        got = {r["batch"]: r["step_peak_mb"] for r in runs
               if (r["shape"], r.get("preset", "seed"), r["checkpointing"]) == (shape, preset, ckpt)}
        size = next(r["image_size"] for r in runs if r["shape"] == shape)
        low, high = min(got), max(got)
        marginal = (got[high] - got[low]) / (high - low) if high > low else None
        rows.append([f"{shape} ({size} px)", preset, "on" if ckpt else "off", *[fmt(got.get(b), 0) for b in batches],
                     fmt(marginal, 0)])
    return [Table(f"Training step memory (MiB, {result['device']}, {runs[0].get('precision', 'fp32')})",
                  ["stand-in", "LoRA preset", "checkpointing", *[f"batch {b}" for b in batches], "per extra sample"],
                  rows)]


def _child(args: list[str], threads: int | None) -> list[dict]:
    """Run `bench.memory --one ...` in a fresh process; its measurements."""
    cmd = [sys.executable, "-m", "bench.memory", "--one", *args] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["shrunk", "base", "large"], action="append")
    parser.add_argument("--preset", choices=["seed", "attention", "language", "all-linear"], action="append",
                        help="LoRA presets to measure (default: seed)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one shape's JSON spec, results on stdout
    common_flags(parser, "memory")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["shape"], spec["presets"], spec["batches"], spec["checkpointing"])))
        return 0
    presets, batches = args.preset or ["seed"], args.batch or [1, 2]
    runs = []
    for shape in args.shape or ["shrunk"]:
        if torch.cuda.is_available():  # one process per shape: the peak is read per step
            specs = [{"presets": presets, "batches": batches, "checkpointing": [False, True]}]
        else:  # one process per measurement: the resident peak only rises
            specs = [{"presets": [p], "batches": [b], "checkpointing": [c]}
                     for p in presets for c in (False, True) for b in batches]
        for spec in specs:
            runs += _child([json.dumps({"shape": shape, **spec})], args.threads)
    result = {"runs": runs, "device": runs[0]["device"]}
    return publish("memory", result, args.out, argv, tables)


if __name__ == "__main__":
    raise SystemExit(main())
