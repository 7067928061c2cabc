"""Accuracy of the default recipe (`configs/demo.yaml`) on synthetic loom data: val mAP50 across
seeds (mean and spread) and how it grows with training time.

    python -m bench.accuracy                                         # small: ~3 min on 2 cores
    python -m bench.accuracy --images 240 --seeds 0 1 2 3 4 --budget 330 --budgets 60 120 240
    python -m bench.accuracy --keep runs/bench/accuracy-runs          # keep the run folders
    python -m bench.accuracy --set lora.freeze=vision --set cache_image_features=true

For each seed, frames are drawn and converted as the demo does it (`loomlens synth` with that
seed, `convert` with flipped copies) and the demo recipe is trained with that seed for
--budget seconds (the recipe's own `time_budget`, as `loomlens demo --time-budget`), then
scored on the whole val split (mAP50, mAP50-95, val loss). On seed 0's data, runs with the
shorter --budgets give the growth curve (a budget cuts the same schedule, as the demo's does),
and the untrained base gives its starting point.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    publish,
    Table, common_flags, fmt, loom_data, parse_size, recipe_config, set_threads,
)

NAME = "accuracy"
NEVER = 10**9  # eval_every: evaluate only when the run stops


def train_run(data: Path, out: Path, seed: int, budget: float, eval_images: int | None,
              overrides: dict[str, str]) -> dict[str, Any]:
    """The demo recipe (with `overrides`) for `budget` seconds; its final evaluation and how
    far it got."""
    from loomlens.train.recipe import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = recipe_config(data, out, seed=seed, time_budget=budget, eval_every=NEVER, eval_max_images=eval_images,
                        val_loss_max_samples=None, **overrides)
    result = train(cfg, log=lambda *_: None)
    return {"seed": seed, "budget_s": budget, "steps": result.state.step, "samples": result.state.step * cfg.batch_size,
            "train_seconds": result.state.train_seconds, "stopped": result.stopped, "run": str(out),
            **{k: result.last_eval.get(k) for k in ("map50", "map50_95", "val_loss")}}


def untrained(data: Path, eval_images: int | None) -> dict[str, Any]:
    """The base model with no adapter on the same val split (budget 0)."""
    from bench.common import demo_settings, val_loss
    from loomlens.evaluate import evaluate_jsonl
    from loomlens.model import load_model

    model, processor = load_model(demo_settings().train.get("model", "tiny"))
    metrics = evaluate_jsonl(model, processor, data / "val.jsonl", max_images=eval_images)
    return {"seed": 0, "budget_s": 0, "steps": 0, "samples": 0, "train_seconds": 0.0, "stopped": "untrained",
            "map50": metrics["map50"], "map50_95": metrics["map50_95"],
            "val_loss": val_loss(model, processor, data / "val.jsonl")}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def tables(result: dict[str, Any]) -> list[Table]:
    def row(name: str, r: dict) -> list[str]:
        return [name, str(r["steps"]), f"{r['train_seconds']:.0f}", fmt(r["val_loss"]), fmt(r["map50"]),
                fmt(r["map50_95"])]

    runs = result["seeds"]
    s = result["summary"]
    recipe = "Demo recipe" + "".join(f", {k}={v}" for k, v in result.get("overrides", {}).items())
    seeds = Table(
        f"{recipe}, {result['budget_s']:g} s each, {len(runs)} seeds ({result['images']} frames "
        f"{result['size']} per seed, {result['val_images']} val images)",
        ["seed", "steps", "train s", "val loss", "mAP50", "mAP50-95"],
        [row(str(r["seed"]), r) for r in runs] + [[
            "mean ± std", "", "", f"{fmt(s['val_loss']['mean'])} ± {fmt(s['val_loss']['std'])}",
            f"{fmt(s['map50']['mean'])} ± {fmt(s['map50']['std'])}",
            f"{fmt(s['map50_95']['mean'])} ± {fmt(s['map50_95']['std'])}"]],
        [f"mAP50 ranges {fmt(s['map50']['min'])} .. {fmt(s['map50']['max'])} over the seeds; each seed draws its own "
         "frames and trains with that seed."],
    )
    growth = Table(
        "mAP50 against training time (seed 0's data and seed)",
        ["budget", "steps", "train s", "val loss", "mAP50", "mAP50-95"],
        [row("untrained" if r["budget_s"] == 0 else f"{r['budget_s']:g} s", r) for r in result["growth"]],
        ["train s excludes the final evaluation; a budget stops the same cosine schedule early, as the demo's does. "
         "A budget is wall time: how many steps fit in it depends on the machine's load."],
    )
    return [seeds, growth]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic frames per seed (flipped copies on top)")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="frame size WxH (demo: 512x288)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=30.0, help="training seconds per seed")
    parser.add_argument("--budgets", type=float, nargs="*", default=[10.0, 20.0],
                        help="shorter budgets for the growth curve (seed 0); --budget is its last point")
    parser.add_argument("--eval-images", type=int, default=None, help="val images scored (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="K=V",
                        help="a recipe override on top of the demo config (repeatable), e.g. lora.freeze=vision")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)

    with tempfile.TemporaryDirectory(prefix="loomlens-accuracy-") as tmp_name:
        runs_dir = args.keep or Path(tmp_name)  # kept runs keep their data beside them
        data = {seed: loom_data(runs_dir / f"data-{seed}", args.images, args.size, seed) for seed in args.seeds}
        runs = [train_run(data[seed], runs_dir / f"seed{seed}", seed, args.budget, args.eval_images, overrides)
                for seed in args.seeds]
        first = args.seeds[0]
        growth = [untrained(data[first], args.eval_images)]
        growth += [train_run(data[first], runs_dir / f"seed{first}-{b:g}s", first, b, args.eval_images, overrides)
                   for b in sorted(args.budgets) if b < args.budget]
        growth.append(runs[0])
        val_images = sum(1 for line in open(data[first] / "val.jsonl") if line.strip())

    summary = {k: spread([r[k] for r in runs if r[k] is not None] or [0.0]) for k in ("map50", "map50_95", "val_loss")}
    result = {"images": args.images, "size": "x".join(map(str, args.size)), "val_images": val_images,
              "overrides": overrides,
              "budget_s": args.budget, "seeds": runs, "summary": summary, "growth": growth,
              "kept": str(args.keep) if args.keep else None}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
