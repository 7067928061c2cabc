"""Does Florence-2 train with loomlens's defaults on a smaller GPU than the one at hand?

    python -m bench.fit_gpu --shape large --gib 24      # on a CUDA GPU: large stand-in, a 24 GiB card
    python -m bench.fit_gpu --small                     # CPU rehearsal: shrunk stand-in, 2 steps

Caps this process's CUDA memory at `--gib` (`torch.cuda.set_per_process_memory_fraction`: the
allocator raises out-of-memory past it, as a card of that size would), saves the stand-in
(`loomlens.model.standin`: real tokenizer and configs, random weights), draws a small synthetic
loom set and converts it, then runs `loomlens train` in this process with the defaults
(`speed.micro_batch=auto`, no gradient checkpointing, precision auto) for `--steps` steps.
Reported: the micro-batch the run trained with at its end (from its config.yaml: the probe's
choice, or less where a pass ran out of memory later, which the run's log and metrics.csv
say), the peak memory allocated, and seconds per step. Writes the JSON result and the markdown table beside it.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, Table, fmt, parse_gpu_flags, publish


def _cap(gib: float) -> tuple[float, float]:
    """Limit this process's CUDA allocations to `gib` GiB where the card holds more; returns
    `(the card's own size, the cap in force)` in GiB."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if gib < total:
        torch.cuda.set_per_process_memory_fraction(gib / total)
    return total, min(gib, total)


def _dataset(folder: Path, images: int) -> Path:
    """A converted synthetic loom set (the demo's generator and converter) in `folder/data`."""
    from loomlens.data.convert import convert
    from loomlens.data.synth import synthesize

    synthesize(folder / "synth", images=images, seed=0, size=(768, 432))
    convert(folder / "synth", folder / "data", tasks=["od"], seed=0)
    return folder / "data"


def _train(model: Path, data: Path, out: Path, steps: int, device: str) -> dict:
    """`loomlens train` with the defaults for `steps` steps; what the run recorded."""
    from loomlens.cli import app

    app(["train", "--data", str(data), "--model", str(model), "--out", str(out), "--device", device,
         "--max-steps", str(steps), "--time-budget", "null", "--eval-every", str(steps), "eval_max_images=4",
         "progress=false"], standalone_mode=False)
    config = yaml.safe_load((out / "config.yaml").read_text())
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    first, last = rows[0], rows[-1]  # the first step carries start-up costs: timed from it
    per_step = (float(last["seconds"]) - float(first["seconds"])) / max(int(last["step"]) - int(first["step"]), 1)
    return {"micro_batch": config["speed"]["micro_batch"], "batch_size": config["batch_size"],
            "targets": config["lora"]["targets"], "r": config["lora"]["r"], "steps": int(last["step"]),
            "seconds_per_step": per_step, "loss": float(last["train_loss"])}


def tables(result: dict) -> list[Table]:
    s = result["settings"]
    rows = [[f"{s['shape']} ({s['image_size']} px)", fmt(s["cap_gib"], 0), str(r["batch_size"]), str(r["micro_batch"]),
             fmt(result["peak_allocated_gib"], 1), fmt(result["peak_reserved_gib"], 1), fmt(r["seconds_per_step"], 2)]
            for r in [result["run"]]]
    notes = [f"`loomlens train` with the defaults (LoRA {result['run']['targets']} r={result['run']['r']}, "
             f"speed.micro_batch=auto, no gradient checkpointing, precision auto) for {s['steps']} steps on "
             f"{s['device']} ({fmt(s['card_gib'], 0)} GiB card, this process capped at {fmt(s['cap_gib'], 0)} GiB); "
             "random-weight stand-in, synthetic 768x432 frames."]
    return [Table("Training with the defaults on a smaller card",
                  ["stand-in", "cap (GiB)", "batch", "micro-batch chosen", "peak allocated (GiB)",
                   "peak reserved (GiB)", "s / step"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["base", "large"], default="large")
    parser.add_argument("--gib", type=float, default=24.0, help="the card size to emulate (GiB)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 12; 2 with --small)")
    args, cuda = parse_gpu_flags(parser, "fit_gpu", argv, rehearsal="shrunk stand-in, 2 steps")
    from loomlens.model.standin import save_standin, shared_folder

    shape, steps, device = ("shrunk", args.steps or 2, "cpu") if args.small else (args.shape, args.steps or 12, "cuda")
    card, cap = _cap(args.gib) if cuda else (0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_standin(shared_folder(ROOT), Path(tmp) / "standin", shape=shape)
        data = _dataset(Path(tmp), images=24)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        run = _train(folder, data, Path(tmp) / "run", steps, device)
        from transformers import AutoProcessor

        size = AutoProcessor.from_pretrained(folder).image_processor.size.height
    peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) if cuda else (0, 0)
    result = {"run": run, "peak_allocated_gib": peak[0], "peak_reserved_gib": peak[1], "settings": {
        "shape": shape, "image_size": size, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "card_gib": card, "cap_gib": cap, "steps": steps}}
    return publish("fit_gpu", result, args.out, argv, tables, markdown_beside=True)


if __name__ == "__main__":
    raise SystemExit(main())
