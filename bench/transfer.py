"""Does pretraining transfer? The same LoRA fine-tune on synthetic loom data from the shipped
tiny model and from a random-init tiny model of the same shape, in one run.

    python -m bench.transfer                                   # small: ~2 min on 2 cores
    python -m bench.transfer --images 240 --steps 150 --seeds 0 1 2

The random-init model is `build_tiny` of the shape the shipped model was pretrained with
(`pretrain_config.json` beside its weights; `TinyShape()` when there is none, as with the
placeholder weights), i.e. pretraining's own starting point, saved with `save_pretrained`
(model and processor) to a temp folder and trained with `model=<that folder>`. Both runs use
the demo recipe with the same data, steps and seed, and are scored on the same val split:
val loss before and after, mAP50 and mAP50-95 after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    publish,
    Table, common_flags, demo_settings, fmt, loom_data, parse_size, recipe_config,
    set_threads, val_loss,
)

NAME = "transfer"


def random_init(folder: Path) -> dict[str, Any]:
    """Save a random-init tiny model of the shipped model's shape (model + processor) to
    `folder`; returns the shape used and whether it matches the shipped weights' shapes."""
    from loomlens.model import load_model
    from loomlens.model.loader import TINY_DIR
    from loomlens.model.tiny import TinyShape, build_tiny, shape_dict

    record = TINY_DIR / "pretrain_config.json"
    shape = TinyShape(**json.loads(record.read_text())["shape"]) if record.exists() else TinyShape()
    model, processor, shape = build_tiny(shape)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shipped, _ = load_model("tiny")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    same = ours == {k: tuple(v.shape) for k, v in shipped.state_dict().items()}
    return {"shape": shape_dict(shape), "from_record": record.exists(), "same_shape": same,
            "parameters": sum(p.numel() for p in model.parameters()),
            "shipped_parameters": sum(p.numel() for p in shipped.parameters())}


def fine_tune(data: Path, out: Path, model: str, steps: int, seed: int, eval_images: int | None) -> dict[str, Any]:
    """The demo recipe from base `model` for `steps` steps; val loss before, metrics after."""
    from loomlens.model import load_model
    from loomlens.train.recipe import train

    base, processor = load_model(model)
    before = val_loss(base, processor, data / "val.jsonl")
    cfg = recipe_config(data, out, model=model, seed=seed, max_steps=steps, eval_every=steps, time_budget=None,
                        eval_max_images=eval_images, val_loss_max_samples=None)
    result = train(cfg, log=lambda *_: None)
    return {"seed": seed, "steps": result.state.step, "train_seconds": result.state.train_seconds,
            "val_loss_before": before, **{k: result.last_eval.get(k) for k in ("val_loss", "map50", "map50_95")}}


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    init = result["random_init_model"]
    for name in ("pretrained", "random_init"):
        runs = result[name]
        shipped = "shipped tiny (pretrained)" if init["from_record"] else "shipped tiny (placeholder weights)"
        label = shipped if name == "pretrained" else "random init, same shape"
        for r in runs:
            rows.append([f"{label}, seed {r['seed']}", fmt(r["val_loss_before"]), fmt(r["val_loss"]),
                         fmt(r["map50"]), fmt(r["map50_95"])])
        if len(runs) > 1:
            rows.append([f"{label}, mean", fmt(statistics.fmean(r["val_loss_before"] for r in runs)),
                         fmt(statistics.fmean(r["val_loss"] for r in runs)),
                         fmt(statistics.fmean(r["map50"] or 0 for r in runs)),
                         fmt(statistics.fmean(r["map50_95"] or 0 for r in runs))])
    notes = [f"Both: demo recipe, {result['steps']} steps, same data ({result['images']} frames {result['size']}) "
             "and seed; val split scored whole.",
             f"Random init: build_tiny({'the shape in pretrain_config.json' if init['from_record'] else 'TinyShape()'}), "
             f"{init['parameters']:,} parameters against the shipped {init['shipped_parameters']:,}"
             + ("" if init["same_shape"] else " -- NOT the same shape (the shipped weights carry no "
                                             "pretrain_config.json: placeholder)") + "."]
    return [Table("Transfer: LoRA fine-tune from the pretrained tiny model vs from random init",
                  ["start", "val loss before", "val loss after", "mAP50", "mAP50-95"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic frames (flipped copies on top)")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="frame size WxH (demo: 512x288)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each fine-tune")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (each runs both)")
    parser.add_argument("--eval-images", type=int, default=None, help="val images scored (default: all)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="loomlens-transfer-") as tmp_name:
        tmp = Path(tmp_name)
        data = loom_data(tmp / "loom", args.images, args.size, args.data_seed)
        init = random_init(tmp / "random-init")
        shipped = demo_settings().train.get("model", "tiny")
        result = {"images": args.images, "size": "x".join(map(str, args.size)), "steps": args.steps,
                  "random_init_model": init, "pretrained": [], "random_init": []}
        for seed in args.seeds:
            result["pretrained"].append(fine_tune(data, tmp / f"pre-{seed}", shipped, args.steps, seed,
                                                  args.eval_images))
            result["random_init"].append(fine_tune(data, tmp / f"rand-{seed}", str(tmp / "random-init"), args.steps,
                                                   seed, args.eval_images))
    pre, rand = result["pretrained"], result["random_init"]
    result["map50_gain"] = statistics.fmean((a["map50"] or 0) - (b["map50"] or 0) for a, b in zip(pre, rand))
    result["val_loss_gain"] = statistics.fmean(b["val_loss"] - a["val_loss"] for a, b in zip(pre, rand))
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
