"""What each choice of the default recipe is worth: the default `loomlens train` against the
same run with one choice turned off (or, for the defect crop, on), on AITEX and on synthetic
loom frames.

    python -m bench.ablate                                   # synthetic frames, every variant but crop-on (~70 min on 2 cores)
    python -m bench.ablate --data aitex --variants default augment-off balance-off r32   # ~1.5 h
    python -m bench.ablate --data aitex-flip --variants default crop-on                  # ~50 min
    python -m bench.ablate --variants default no-flips --steps 400                        # a quick look

Each run is `loomlens train --data D --out R` with no flag but fixed steps (`max_steps`, so busy
cores do not change what is compared) and evaluations (`eval_every`; each on the default 200 val
images, the whole val split of both data sets), plus the variant's overrides. Reported per run from its metrics.csv: the best and the last val mAP50,
the last val loss, and the share of val frames holding a defect answered with no box. A run
folder that already holds a finished run of the same settings is read, not trained again, and
an unfinished one resumes (`train --resume`): an interrupted sweep loses nothing.

Data: `synth` draws the demo's frames (`bench.common.loom_data`, seed 0); `aitex` converts
../shared/data/aitex as `bench.real` does (the tiles `--tile auto` picks, flipped copies, split
seed 0); `aitex-flip` converts it with whole frames only (`convert --flip --tile off`, the same
split), where the defect crop is the choice that matters.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import real
from bench.common import RESULTS, Table, common_flags, describe, fmt, loom_data, machine, publish

NAME = "ablate"
WORK = RESULTS / NAME

#: variant -> its `key=value` overrides of the default recipe (`TrainConfig`'s defaults).
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "augment-off": ["augment=false"],
    "balance-off": ["balance.negative_share=null", "balance.repeat_threshold=0"],
    "no-flips": ["augment.hflip=0", "augment.vflip=0"],
    "no-photometric": ["augment.brightness=0", "augment.contrast=0", "augment.gamma=0", "augment.grey=0"],
    "no-scale": ["augment.scale=0"],
    "no-paste": ["augment.paste=0"],
    "r32": ["lora.r=32"],
    # Evaluate, keep and ship each step's weights instead of their moving average.
    "no-average": ["ema_decay=0"],
    # The default has no LoRA dropout, so its layers run in their fastest form (docs/training.md):
    # this is the default before, 0.05, at twice the time a step.
    "dropout": ["lora.dropout=0.05"],
    # Not a choice turned off but one to turn on: the defect crop, off by default (it did not
    # earn its place on aitex-flip: docs/training.md).
    "crop-on": ["augment.crop=0.5"],
}
#: What runs without --variants: the crop, which is off by default and acts only on frames longer
#: than the input (AITEX's whole strips, not its tiles), runs only when asked for (on aitex-flip).
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "crop-on"]
#: data -> (fixed steps, steps between evaluations) at the default size.
SIZES = {"synth": (800, 200), "aitex": (1000, 100), "aitex-flip": (1000, 100)}


def prepare(data: str) -> Path:
    """The converted folder for `data` (`synth`, `aitex` or `aitex-flip`), made once and then
    reused (`aitex`'s is `bench.real`'s own)."""
    folder = real.WORK if data == "aitex" else WORK / data
    if (folder / "data" / "val.jsonl").exists():
        return folder / "data"
    if data == "aitex":
        real.convert(real.AITEX, folder / "data")
    elif data == "aitex-flip":  # whole frames, no tiles: where the defect crop matters
        real.loomlens("convert", str(real.AITEX), str(folder / "data"), "--flip", "--tile", "off", *real.SPLIT)
    else:
        loom_data(folder, images=480)
    return folder / "data"


def settings(steps: int, every: int, overrides: list[str]) -> dict[str, str]:
    """The `key=value` settings of one run: fixed steps and evaluations, the variant's."""
    fixed = {"max_steps": str(steps), "eval_every": str(every)}
    return {**fixed, **dict(o.split("=", 1) for o in overrides)}


#: settings that do not change what a run learns (the micro-batch keeps the step exact).
IGNORED = ("progress", "tensorboard", "speed.micro_batch")


def finished(run: Path, data: Path, chosen: dict[str, str]) -> bool | None:
    """True if `run` holds a finished run of these settings, False if an unfinished one
    (resume it), None if none, or one of other settings (train afresh)."""
    from loomlens.config import TrainConfig, changed_settings, load_config, load_recorded

    if not (run / "config.yaml").exists():
        return None
    saved = load_recorded(run / "config.yaml", {"out": str(run)})
    wanted = load_config(TrainConfig, overrides={"data": str(data), "out": str(run), **chosen})
    if any(k not in IGNORED for k in changed_settings(saved, wanted)):
        return None
    rows = rows_of(run)
    return bool(rows) and int(rows[-1]["step"]) >= int(chosen["max_steps"]) and bool(rows[-1].get("map50"))


def rows_of(run: Path) -> list[dict[str, str]]:
    """The rows of `run`'s metrics.csv (none if it has none)."""
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_variant(data: Path, run: Path, steps: int, every: int, overrides: list[str]) -> None:
    """Train (or resume, or keep) one variant's run in `run`."""
    chosen = settings(steps, every, overrides)
    state = finished(run, data, chosen)
    if state:
        return
    if state is False:
        real.loomlens("train", "--resume", str(run))
        return
    shutil.rmtree(run, ignore_errors=True)
    real.loomlens("train", "--data", str(data), "--out", str(run), *(f"{k}={v}" for k, v in chosen.items()))


def summary(run: Path) -> dict[str, Any]:
    """Best and last val mAP50, last val loss and empty share, rollbacks (from metrics.csv), and
    the commit the run was trained at (from env.json)."""
    rows = rows_of(run)
    evals = [r for r in rows if r.get("map50")]
    best = max(evals, key=lambda r: float(r["map50"]))
    last = evals[-1]
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    return {"steps": int(rows[-1]["step"]), "seconds": float(rows[-1]["seconds"]),
            "commit": (env.get("git_commit") or "?")[:7],
            "best_map50": float(best["map50"]), "best_step": int(best["step"]),
            "last_map50": float(last["map50"]), "last_map50_95": float(last["map50_95"]),
            "last_f1": float(last["best_f1"]), "last_val_loss": float(last["val_loss"]),
            "last_empty": float(last["empty_on_defects"]),
            "events": [f"{r['step']}: {r['event']}" for r in rows if r.get("event")]}


def tables(result: dict[str, Any]) -> list[Table]:
    """One table per data set measured, the default run first."""
    out = []
    for data, part in sorted(result["data"].items(), key=lambda kv: kv[0] != "aitex"):
        rows = [[r["variant"], " ".join(r["overrides"]) or "-", f"{fmt(r['best_map50'])} ({r['best_step']})",
                 fmt(r["last_map50"]), fmt(r["last_map50_95"]), fmt(r["last_f1"]), fmt(r["last_val_loss"], 2),
                 f"{r['last_empty']:.0%}", f"{r['seconds']:.0f}", "; ".join(r["events"]) or "-", r.get("commit", "?")]
                for r in part["runs"]]
        notes = [f"{part['steps']} steps of 8 samples per run, evaluated every {part['every']} steps on the whole "
                 f"val split; one run per variant, seed 0; table made {part['measured']} (a finished run is read from its "
                 f"folder: `trained at` is the commit it was trained at)",
                 "last empty: the share of val frames with a defect answered with no box at the last evaluation",
                 "train s: the run's wall-clock seconds at its last step, validations included (metrics.csv)"]
        out.append(Table(f"The default recipe, one choice off at a time ({data})",
                         ["variant", "overrides", "best val mAP50 (step)", "last val mAP50", "last mAP50-95",
                          "last F1", "last val loss", "last empty", "train s", "guard events", "trained at"], rows, notes))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(SIZES), default="synth", help="synthetic frames or AITEX")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 800 synth, 1000 aitex and aitex-flip)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    if args.data.startswith("aitex") and not real.AITEX.exists():
        parser.error(f"no AITEX at {real.AITEX}: expected ../shared/data/aitex beside the checkout")
    steps, every = SIZES[args.data]
    steps = args.steps or steps
    every = min(every, steps)
    data = prepare(args.data)
    runs = []
    for variant in args.variants:
        run = WORK / args.data / "runs" / variant
        train_variant(data, run, steps, every, VARIANTS[variant])
        runs.append({"variant": variant, "overrides": VARIANTS[variant], **summary(run)})
    # The other data set's figures, from an earlier run of this benchmark, stay beside these.
    earlier = json.loads(args.out.read_text()).get("data", {}) if args.out.exists() else {}
    part = {"steps": steps, "every": every, "runs": runs, "measured": describe(machine())}
    return publish(NAME, {"data": {**earlier, args.data: part}}, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
