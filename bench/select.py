"""Does `loomlens select` pick frames worth labelling? The same labelling budget spent on the
frames it picks and on frames drawn at random, each added to the same labelled pool and
fine-tuned the same way; val mAP50 says which taught the run more.

    python -m bench.select --small                          # a plumbing check: ~4 min on 2 free cores
    python -m bench.select                                  # the measurement: ~20 min on 2 free cores
    python -m bench.select --n 24 --random-seeds 0 1 2 3 4

One set of synthetic loom frames (`loomlens synth`, one camera) is cut into a labelled pool, an
unlabelled pool and a val split. A start run is trained on the labelled pool (demo recipe,
--start-steps). `select` (through `loomlens.predict.select.select_frames`, as the command runs
it) then picks --n frames of the unlabelled pool with the start run; each random arm draws --n
frames with its seed. Every arm, and one that adds nothing, then fine-tunes from the start run
(its adapter merged into the base, a fresh LoRA on top) on the labelled pool plus its frames,
with their true boxes, for --steps steps with the same seed, and is scored on the whole val
split. The frames' annotations are the generator's, so "labelling" costs nothing here; what is
measured is only which frames are worth it.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Table,
    common_flags,
    demo_settings,
    device,
    fmt,
    parse_size,
    publish,
    recipe_config,
    set_threads,
)

NAME = "select"
#: --small: a plumbing check that finishes in minutes (mAP50 this short is mostly noise).
SMALL = {"labelled": 16, "pool": 48, "val": 24, "n": 8, "start_steps": 120, "steps": 60, "random_seeds": [0]}


def layout(folder: Path, synth: Path, train: list, val: list) -> Path:
    """A LabelImg dataset with its own split (`train/`, `valid/`, images and VOC files linked
    from the synthetic set), the layout `convert` keeps the split of."""
    from loomlens.data.atomic import atomic_copy

    shutil.rmtree(folder, ignore_errors=True)
    for split, records in (("train", train), ("valid", val)):
        for r in records:
            for rel, sub in ((r.image, "images"), (r.source, "annotations")):
                atomic_copy(synth / rel, folder / split / sub / Path(rel).name, link=True)
    return folder


def fine_tune(work: Path, name: str, synth: Path, train: list, val: list, model: str, steps: int,
              seed: int) -> dict[str, Any]:
    """Convert `train` + `val` as the demo does, fine-tune `model` for `steps` steps (demo recipe,
    `seed`, evaluation at the end on the whole val split); the final metrics."""
    from loomlens.data.convert import convert
    from loomlens.train.recipe import train as train_run

    demo = demo_settings()
    data = work / f"data-{name}"
    shutil.rmtree(data, ignore_errors=True)
    convert(layout(work / f"src-{name}", synth, train, val), data, tasks=demo.tasks, flip=demo.flip, seed=seed)
    cfg = recipe_config(data, work / f"run-{name}", model=model, seed=seed, max_steps=steps, eval_every=steps,
                        time_budget=None, eval_max_images=None, val_loss_max_samples=None, early_stopping=0)
    result = train_run(cfg, log=lambda *_: None)
    return {"run": str(work / f"run-{name}"), "steps": result.state.step, "train_seconds": result.state.train_seconds,
            **{k: result.last_eval.get(k) for k in ("map50", "map50_95", "val_loss", "best_f1")}}


def picked(records: list) -> dict[str, Any]:
    """What a set of added frames holds: frames, defect boxes, defect-free frames."""
    return {"frames": len(records), "boxes": sum(len(r.boxes) for r in records),
            "defect_free": sum(not r.boxes for r in records), "images": [r.image for r in records]}


def tables(result: dict[str, Any]) -> list[Table]:
    def row(label: str, arm: dict) -> list[str]:
        return [label, str(arm["added"]["frames"]), str(arm["added"]["boxes"]), str(arm["added"]["defect_free"]),
                fmt(arm["map50"]), fmt(arm["map50_95"]), fmt(arm["val_loss"])]

    start = result["start"]
    rows = [["start run (labelled pool only)", "-", "-", "-", fmt(start["map50"]), fmt(start["map50_95"]),
             fmt(start["val_loss"])]]
    rows += [row(arm["arm"], arm) for arm in result["arms"]]
    randoms = [a for a in result["arms"] if a["arm"].startswith("random")]
    if len(randoms) > 1:
        rows.append(["random, mean", "", f"{statistics.fmean(a['added']['boxes'] for a in randoms):.1f}",
                     f"{statistics.fmean(a['added']['defect_free'] for a in randoms):.1f}",
                     fmt(statistics.fmean(a["map50"] or 0 for a in randoms)),
                     fmt(statistics.fmean(a["map50_95"] or 0 for a in randoms)),
                     fmt(statistics.fmean(a["val_loss"] for a in randoms))])
    s = result["settings"]
    notes = [
        (f"{s['labelled']} labelled, {s['pool']} unlabelled and {s['val']} val frames {s['size']} from one synthetic "
        f"camera (seed {s['data_seed']}); the start run: demo recipe, {s['start_steps']} steps on the labelled pool."),
        (f"Each arm adds {s['n']} frames of the unlabelled pool with their true boxes and fine-tunes from the start run "
        f"(merged, a fresh LoRA) for {s['steps']} steps, seed {s['seed']}; val split scored whole."),
        (f"select: threshold {s['threshold'] if s['threshold'] is not None else 'default'}, diversity "
        f"{s['diversity']}, mirrored frames on; it ranked {s['pool']} frames in {result['select_seconds']:.0f} s."),
        (f"select minus the random mean: mAP50 {result['gain_map50']:+.3f}. With a val split this small one defect "
        "found or missed moves mAP50 by several points: read a gain within the random arms' spread as none."),
    ]
    return [Table("Active selection: frames `loomlens select` picks vs frames drawn at random",
                  ["arm", "frames added", "defect boxes in them", "defect-free", "val mAP50", "mAP50-95",
                   "val loss"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="a plumbing check in minutes: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    parser.add_argument("--labelled", type=int, default=96, help="frames of the labelled pool")
    parser.add_argument("--pool", type=int, default=240, help="frames of the unlabelled pool")
    parser.add_argument("--val", type=int, default=96, help="val frames")
    parser.add_argument("--n", type=int, default=48, help="frames each arm adds (the labelling budget)")
    parser.add_argument("--start-steps", type=int, default=600, help="steps of the start run")
    parser.add_argument("--steps", type=int, default=300, help="steps of each arm's fine-tune")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2], help="one random arm each")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="frame size WxH (demo: 512x288)")
    parser.add_argument("--data-seed", type=int, default=7, help="seed of the synthetic camera and frames")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--threshold", type=float, default=None, help="select's score threshold (default: its own)")
    parser.add_argument("--diversity", type=float, default=0.5, help="select's diversity")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    if args.small:
        for key, value in SMALL.items():
            setattr(args, key, value)
    set_threads(args.threads)

    from loomlens.data.synth import synthesize
    from loomlens.model.merge import merge_adapter
    from loomlens.predict import Predictor
    from loomlens.predict.select import select_frames

    with tempfile.TemporaryDirectory(prefix="loomlens-select-") as tmp_name:
        work = args.keep or Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        synth = work / "synth"
        records = synthesize(synth, images=args.labelled + args.pool + args.val, seed=args.data_seed, size=args.size)
        labelled = records[: args.labelled]
        pool = records[args.labelled : args.labelled + args.pool]
        val = records[args.labelled + args.pool :]
        base = demo_settings().train.get("model", "tiny")
        start = fine_tune(work, "start", synth, labelled, val, base, args.start_steps, args.seed)
        merged = merge_adapter(start["run"], work / "start-merged", checkpoint="last", dtype="fp32")

        began = time.perf_counter()
        predictor = Predictor(adapter=start["run"], checkpoint="last", device=device(), tta="off")
        summary = select_frames(predictor, [str(synth / r.image) for r in pool], work / "selected", n=args.n,
                                threshold=args.threshold, diversity=args.diversity)
        select_seconds = time.perf_counter() - began
        by_path = {str(synth / r.image): r for r in pool}
        del predictor

        arms = [("nothing added", []), ("select", [by_path[p] for p in summary["chosen"]])]
        arms += [(f"random, seed {s}", random.Random(s).sample(pool, args.n)) for s in args.random_seeds]
        results = []
        for label, added in arms:
            name = label.replace(",", "").replace(" ", "-")
            arm = fine_tune(work, name, synth, labelled + added, val, str(merged), args.steps, args.seed)
            results.append({"arm": label, "added": picked(added), **arm})

    chosen = next(a for a in results if a["arm"] == "select")
    randoms = [a for a in results if a["arm"].startswith("random")]
    settings = {k: getattr(args, k) for k in ("labelled", "pool", "val", "n", "start_steps", "steps", "random_seeds",
                                              "data_seed", "seed", "threshold", "diversity")}
    result = {"settings": {**settings, "size": "x".join(map(str, args.size)), "small": args.small},
              "start": start, "arms": results, "select_seconds": select_seconds,
              "gain_map50": (chosen["map50"] or 0) - statistics.fmean(a["map50"] or 0 for a in randoms),
              "kept": str(args.keep) if args.keep else None}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
