"""Does tiling find the small defects a whole-frame pass loses? On synthetic 2560x1440 loom
frames, whole-frame inference against tiled inference, each with the adapter trained for it.

    python -m bench.tiling                                    # small: ~3 min on 2 cores
    python -m bench.tiling --train-frames 96 --steps 700 --frames 8 --adapter runs/bench/accuracy-runs/seed0

Squeezed whole into the tiny model's 256 px input, a 2560x1440 frame's defects shrink to a
few pixels; cut into overlapping tiles they keep their size, but only a model that has seen
defects at tile scale can read them. So the benchmark:

1. draws --train-frames frames 2560x1440 of camera 0 (the demo's camera) and converts them
   as `loomlens convert --flip --tile T` does (whole frames plus T px tiles);
2. fine-tunes the demo recipe on that for --steps steps: the *tile-trained* adapter;
3. detects on --frames held-out frames of the same camera (frame indices after the training
   ones) whole and tiled, with the tile-trained adapter and, with --adapter, a whole-frame
   adapter (the accuracy benchmark's, trained on the demo's 512x288 frames of camera 0).

For each row: the median shorter side of the small defects as the model sees them (in
model-input pixels: what tiling changes), recall at IoU >= 0.5 on small defects (shorter side
under --small px in the frame) and on all defects, mAP50 (COCO, real scores), boxes and
seconds per frame.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Table, common_flags, fmt, parse_size, publish, recipe_config, set_threads

NAME = "tiling"
CAMERA = 0  # the demo's synthetic camera: the whole-frame adapter was trained on it


def recall(truth, predicted, keep) -> tuple[int, int]:
    """(found, total) of the true boxes for which `keep(box)` holds, same class, IoU >= 0.5."""
    from loomlens.evaluate.matching import match_image

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


def measure(predictor, frames, truth, tile: str, small: float, adapter: str) -> dict[str, Any]:
    """One row: `predictor` on `frames` with tiling `tile` (on | off), scored against `truth`."""
    from loomlens.evaluate.metrics import coco_metrics

    model_input = int(predictor.loaded.processor.image_processor.size["height"])
    window = predictor.tile_size if tile == "on" else None
    predictor.predict(frames[:1], "od", tile=tile)  # warm-up
    start = time.perf_counter()
    predicted = [p.boxes for p in predictor.predict(frames, "od", tile=tile)]
    seconds = (time.perf_counter() - start) / len(frames)
    small_found, small_total = recall(truth, predicted, lambda b: min(b.width, b.height) < small)
    all_found, all_total = recall(truth, predicted, lambda b: True)
    return {
        "adapter": adapter, "tile": tile, "tile_size": window,
        "small_recall": small_found / max(1, small_total), "small_defects": small_total,
        "recall": all_found / max(1, all_total), "defects": all_total,
        "map50": coco_metrics(truth, predicted, predictor.loaded.classes)["map50"],
        "predicted_boxes": sum(len(p) for p in predicted), "seconds_per_frame": seconds,
        "small_defect_px_at_model_input": seen_size(truth, frames[0].size, window, model_input, small),
    }


def tile_trained(folder: Path, frames: int, size: tuple[int, int], tile: int, steps: int, seed: int) -> dict:
    """Draw `frames` training frames, convert them with flips and `tile` px tiles, fine-tune
    the demo recipe for `steps` steps; returns the run folder and what the data held."""
    from loomlens.data.convert import convert
    from loomlens.data.synth import synthesize
    from loomlens.train.recipe import train

    synthesize(folder / "synth", images=frames, seed=CAMERA, size=size)
    report = convert(folder / "synth", folder / "data", flip=True, tile=tile, seed=seed)
    cfg = recipe_config(folder / "data", folder / "run", seed=seed, max_steps=steps, time_budget=None,
                        eval_every=steps, eval_max_images=0)
    result = train(cfg, log=lambda *_: None)
    return {"run": folder / "run", "train_samples": report.splits["train"]["samples"],
            "train_tile_samples": report.splits["train"]["tile_samples"], "steps": result.state.step,
            "train_seconds": result.state.train_seconds}


def held_out(start: int, count: int, size: tuple[int, int]):
    """`count` frames of the camera after the first `start` (never trained on), each with at
    least one defect, and their boxes."""
    from loomlens.data.synth import render_frame

    drawn = [render_frame(CAMERA, i, size, negative=False) for i in range(start, start + count)]
    return [im for im, _ in drawn], [boxes for _, boxes in drawn]


def main(argv: list[str] | None = None) -> int:
    from loomlens.predict import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(2560, 1440), help="frame size WxH")
    parser.add_argument("--train-frames", type=int, default=24, help="frames the tile-trained adapter learns from")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the tile-trained fine-tune")
    parser.add_argument("--tile", type=int, default=512, help="tile edge in frame pixels (training and inference)")
    parser.add_argument("--frames", type=int, default=4, help="held-out frames scored")
    parser.add_argument("--adapter", default=None, help="a whole-frame run to compare (e.g. the accuracy bench's)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--small", type=float, default=48.0, help="px: a defect's shorter side below this is small")
    parser.add_argument("--max-boxes", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    frames, truth = held_out(args.train_frames, args.frames, args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loomlens-tiling-") as tmp:
        trained = tile_trained(Path(tmp), args.train_frames, args.size, args.tile, args.steps, args.seed)
        runs = {"tile-trained": trained["run"], **({"whole-frame": args.adapter} if args.adapter else {})}
        for name, run in runs.items():
            predictor = Predictor(adapter=run, max_boxes=args.max_boxes, batch_size=args.batch_size,
                                  tile_size=args.tile)
            for tile in ("off", "on"):
                rows.append(measure(predictor, frames, truth, tile, args.small, name))
    trained["run"] = str(trained["run"])
    result = {"frames": args.frames, "size": "x".join(map(str, args.size)), "small_px": args.small,
              "tile": args.tile, "train_frames": args.train_frames, "tile_trained": trained,
              "whole_frame_adapter": args.adapter, "rows": rows}
    by = {(r["adapter"], r["tile"]): r for r in rows}
    best_whole = max(r["small_recall"] for r in rows if r["tile"] == "off")
    result["small_recall_gain"] = by["tile-trained", "on"]["small_recall"] - best_whole
    return publish(NAME, result, args.out, argv, tables)


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    for r in result["rows"]:
        mode = "whole frame" if r["tile"] == "off" else f"tiles {r['tile_size']} px"
        rows.append([r["adapter"], mode, f"{r['small_defect_px_at_model_input']:.1f} px",
                     f"{fmt(r['small_recall'])} of {r['small_defects']}", f"{fmt(r['recall'])} of {r['defects']}",
                     fmt(r["map50"]), str(r["predicted_boxes"]), f"{r['seconds_per_frame']:.1f}"])
    t = result["tile_trained"]
    notes = [f"tile-trained: the demo recipe, {t['steps']} steps ({t['train_seconds']:.0f} s), on "
             f"{result['train_frames']} frames {result['size']} with flipped copies, cut into {result['tile']} px tiles "
             f"as `loomlens convert --flip --tile {result['tile']}` does ({t['train_samples']} samples, "
             f"{t['train_tile_samples']} of them tiles)."]
    if result.get("whole_frame_adapter"):
        notes.append(f"whole-frame: {result['whole_frame_adapter']} (the demo recipe on 512x288 frames of the same "
                     "camera; a 2560x1440 frame squeezed to the input looks as they do).")
    notes += [f"Held-out frames of the same camera, each with 1-3 defects. small: shorter side under "
              f"{result['small_px']:g} px in the frame; recall at IoU >= 0.5, same class. Small-defect recall, "
              f"tiled minus the best whole-frame row: {result['small_recall_gain']:+.3f}."]
    return [Table(f"Tiling: {result['frames']} frames {result['size']}, embedded tiny model",
                  ["adapter", "mode", "small defect at input", "small recall", "recall", "mAP50", "boxes", "s/frame"],
                  rows, notes)]


if __name__ == "__main__":
    sys.exit(main())
