"""Does tiling find the small defects a whole-frame pass loses? Measured on synthetic 2560x1440
loom frames (`loomlens synth --size 2560x1440`), whole frame against tiles.

    python bench/tiling.py --frames 4 --out runs/bench/tiling.json
    python bench/tiling.py --adapter runs/demo/run --tile-sizes 256 512 768

For each mode it reports the median shorter side of the small defects as the model sees them
(in model-input pixels: what tiling changes), recall at IoU >= 0.5 on small defects (shorter side under
--small px in the frame) and on all defects, mAP50 (COCO, real scores) and seconds per frame,
prints a table and writes the same numbers as JSON. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from loomlens.data.synth import synthesize
from loomlens.evaluate.matching import match_image
from loomlens.evaluate.metrics import coco_metrics
from loomlens.predict import Predictor


def recall(truth, predicted, keep) -> tuple[int, int]:
    """(found, total) of the true boxes for which `keep(box)` holds, same class, IoU >= 0.5."""
    found = total = 0
    for gt, pred in zip(truth, predicted):
        matched = {i for i, _ in match_image(gt, pred).pairs}
        for i, box in enumerate(gt):
            if keep(box):
                total += 1
                found += i in matched
    return found, total


def seen_size(truth, frame_size: tuple[int, int], window: int | None, model_input: int, small: float) -> float:
    """Median shorter side, in model-input pixels, of the small defects: the processor
    squeezes the whole frame (or a `window` x `window` tile) to `model_input` squared."""
    width, height = frame_size
    sx, sy = (model_input / window,) * 2 if window else (model_input / width, model_input / height)
    sides = sorted(min(b.width * sx, b.height * sy) for gt in truth for b in gt if min(b.width, b.height) < small)
    return sides[len(sides) // 2] if sides else 0.0


def measure(predictor: Predictor, frames, truth, tile: str, small: float) -> dict:
    model_input = int(predictor.loaded.processor.image_processor.size["height"])
    window = predictor.tile_size if tile == "on" else None
    start = time.perf_counter()
    predicted = [p.boxes for p in predictor.predict(frames, "od", tile=tile)]
    seconds = (time.perf_counter() - start) / len(frames)
    small_found, small_total = recall(truth, predicted, lambda b: min(b.width, b.height) < small)
    all_found, all_total = recall(truth, predicted, lambda b: True)
    return {
        "tile": tile, "tile_size": predictor.tile_size if tile == "on" else None,
        "small_recall": small_found / max(1, small_total), "small_defects": small_total,
        "recall": all_found / max(1, all_total), "defects": all_total,
        "map50": coco_metrics(truth, predicted, predictor.loaded.classes)["map50"],
        "predicted_boxes": sum(len(p) for p in predicted), "seconds_per_frame": seconds,
        "small_defect_px_at_model_input": seen_size(truth, frames[0].size, window, model_input, small),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the adapter's, else tiny)")
    parser.add_argument("--adapter", default=None, help="training run or adapter folder")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", default="2560x1440")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[0], help="0 = the model's input size")
    parser.add_argument("--small", type=float, default=48.0, help="px: a defect's shorter side below this is small")
    parser.add_argument("--max-boxes", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tiling.json"))
    args = parser.parse_args(argv)

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        records = synthesize(tmp, images=args.frames, seed=args.seed, size=(width, height), negative_fraction=0.0)
        frames = [Image.open(Path(tmp) / r.image).convert("RGB") for r in records]
    truth = [r.boxes for r in records]
    rows = []
    for tile_size in args.tile_sizes:
        predictor = Predictor(args.model, args.adapter, max_boxes=args.max_boxes, batch_size=args.batch_size,
                              tile_size=tile_size or None)
        if not rows:
            rows.append(measure(predictor, frames, truth, "off", args.small))
        rows.append(measure(predictor, frames, truth, "on", args.small))

    result = {"frames": args.frames, "size": args.size, "small_px": args.small, "model": predictor.info(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"{args.frames} frames {args.size}, model {predictor.loaded.base}"
                  f"{' + ' + str(predictor.loaded.adapter) if predictor.loaded.adapter else ''}")
    for column in ("mode", "small defect at input", "small recall", "recall", "mAP50", "boxes", "s/frame"):
        table.add_column(column, justify="right")
    for r in rows:
        mode = "whole frame" if r["tile"] == "off" else f"tiles {r['tile_size']} px"
        table.add_row(mode, f"{r['small_defect_px_at_model_input']:.1f} px", f"{r['small_recall']:.3f} of {r['small_defects']}", f"{r['recall']:.3f} of {r['defects']}",
                      f"{r['map50']:.3f}", str(r["predicted_boxes"]), f"{r['seconds_per_frame']:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
