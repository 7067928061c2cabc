"""Mirrors fused (test-time augmentation, `infer/tta.py`): what looking at each frame through
one, two or four mirrors gives and costs, on adapters and the splits they were scored on.

    python -m bench.tta --case demo runs/demo/run runs/demo/data val
    python -m bench.tta --case aitex runs/bench/real/runs/default runs/bench/real/data test

Each --case (name, run folder, converted data folder, split) is evaluated as `loomlens eval`
evaluates it (the best adapter merged, `--precision auto`, the class grammar when the run has
classes, large frames tiled as the run predicts them) once per set of views: as it is; with its
left-right mirror; with its top-bottom mirror; with all four; once and with all four again
with each box edge at its chosen bin's centre instead of the mean bin near it
(`infer/generation.py`, `expected_bins`). Reported per row: mAP50,
mAP50-95, mAP75, the best F1, the OK/NG AUROC and recall at <= 1 % false alarms, and the
seconds a frame against one look. `loomlens eval --tta auto` takes the views the run was trained
on (the default recipe: all four).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import Table, common_flags, device, fmt, publish, set_threads
from loomlens.infer import generation
from loomlens.infer.tta import FUSE_IOU

NAME = "tta"
#: The view sets compared, by name: one look, each single mirror added, all four.
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "once": ("",), "+ left-right": ("", "h"), "+ top-bottom": ("", "v"), "all four": ("", "h", "v", "hv"),
}
#: View sets measured again with each box edge at its chosen bin's centre (`LOC_WINDOW` 0, as
#: Florence-2's processor reads a box) instead of the mean bin near it: what that placement gives.
AT_CENTRES = ("once", "all four")


def measure_case(name: str, run: Path, data: Path, split: str, images: int | None) -> dict[str, Any]:
    """Every view set of `VIEW_SETS` on one split, as `loomlens eval` runs the run's best adapter."""
    from loomlens.evaluate.report import od_images, run_split, split_metrics
    from loomlens.infer.loading import load_for_inference
    from loomlens.run import Run

    loaded = load_for_inference(adapter=run, checkpoint="best", device=device(), precision="auto")
    tile = Run(run).tile
    frames = od_images(data / f"{split}.jsonl", images, frames_only=tile is not None)
    rows = []
    looks = [(label, views, generation.LOC_WINDOW) for label, views in VIEW_SETS.items()]
    looks += [(f"{label}, bin centres", VIEW_SETS[label], 0) for label in AT_CENTRES]
    for label, views, window in looks:
        start = time.perf_counter()
        with mock.patch.object(generation, "LOC_WINDOW", window):
            found = run_split(loaded.model, loaded.processor, frames, loaded.classes, constrained=bool(loaded.classes),
                              tile=tile, views=views)
        seconds = (time.perf_counter() - start) / len(frames)
        m = split_metrics(found, loaded.classes).metrics
        rows.append({"views": label, "map50": m["map50"], "map50_95": m["map50_95"], "map75": m["map75"],
                     "best_f1": m["best_f1"], "auroc": m["image_level"]["auroc"],
                     "recall_at_1pct": m["image_level"]["recall_at_fpr"].get("0.01"), "seconds_per_frame": seconds})
    return {"name": name, "run": str(run), "data": str(data), "split": split, "frames": len(frames), "tile": tile,
            "trained_views": list(Run(run).views), "rows": rows}


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    for case in result["cases"]:
        once = case["rows"][0]["seconds_per_frame"]
        for r in case["rows"]:
            rows.append([case["name"], r["views"], *(fmt(r[k]) for k in ("map50", "map50_95", "map75", "best_f1",
                                                                          "auroc", "recall_at_1pct")),
                         f"{r['seconds_per_frame']:.3f}", f"{r['seconds_per_frame'] / once:.1f}x"])
    notes = [f"{c['name']}: {c['frames']} frames of {c['data']} ({c['split']})"
             + (f", large frames in {c['tile']} px tiles" if c["tile"] else "")
             + f"; the run learnt the views {c['trained_views']} (what `--tta auto` takes)" for c in result["cases"]]
    notes.append("Each row as `loomlens eval` runs the best adapter, each frame (each tile) also looked at through "
                 f"the views named and the boxes fused (weighted boxes fusion at IoU {result.get('fuse_iou', 0.4)}, "
                 "duplicates inside a better box dropped); box edges at the mean bin near each chosen "
                 f"`<loc_N>` (±{result.get('loc_window', 0)} bins), or, in the rows 'bin centres', at the chosen "
                 "bin's centre as Florence-2's processor reads them; one process, in this order")
    return [Table("Mirrors fused: one, two or four looks a frame",
                  ["case", "views", "mAP50", "mAP50-95", "mAP75", "best F1", "AUROC", "recall @1% FA",
                   "s/frame", "time"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tta", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=4, action="append", required=True, metavar=("NAME", "RUN", "DATA", "SPLIT"),
                        help="a run folder and the converted data split to score it on (repeatable)")
    parser.add_argument("--images", type=int, default=None, help="the first N frames of each split (default: all)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    for name, run, data, split in args.case:
        if not (Path(data) / f"{split}.jsonl").exists():
            parser.error(f"case {name}: no split at {Path(data) / f'{split}.jsonl'}")
    cases = [measure_case(name, Path(run), Path(data), split, args.images) for name, run, data, split in args.case]
    result = {"cases": cases, "fuse_iou": FUSE_IOU, "loc_window": generation.LOC_WINDOW}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
