"""onnxruntime against torch on the same frames, in one run: images/s beside mAP50, so the
speed of each way is read at its accuracy.

    python -m bench.onnx_speed --images 4 --batch-size 4 --max-boxes 4     # a smoke run, bare tiny model
    python -m bench.onnx_speed --adapter runs/demo/run --images 64 --repeats 3 --threads 2

The adapter's own val frames (the `<OD>` samples of its run's data, `DATA/val.jsonl`, the run's
`data` read from the working directory as training read it; `--val` names another split; the
demo's synthetic camera when there is none) run five ways in this process, each after a warm-up
batch, --repeats times in alternating order, all greedy, batches of --batch-size, the same
answer budget:

- `torch`: as `loomlens predict` runs it (adapter merged, `--precision auto` on this machine);
- `torch fp32`: the same in fp32, what the export is traced from and checked against (only when
  auto picks bf16);
- `onnx fp32`: the export's parts on onnxruntime, the decoder with its KV cache (`--backend onnx`);
- `onnx fp32, no cache`: the same parts with the decoder's first-step part rerun over the whole
  answer at every step (what the export did before the cache; an upper bound, since that part
  also computes the logits and key/values of every earlier position);
- `onnx int8`: the `--int8` parts (`export.onnx.INT8_RECIPE`), written without the export's
  check, which refuses them where they move answers: the mAP50 and the agreement column say by
  how much.

Reported per way: images/s, ms per image (p50; an image in a batch waits for its batch), tokens
per image, mAP50 against the frames' truth, and frames whose boxes match torch fp32's (the
export check's test: same boxes, each coordinate within 1 location bin, scores within 0.01);
and the parts' sizes. Torch and onnxruntime get the same number of threads (--threads; default
torch's own and onnxruntime's, one per core).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Table,
    common_flags,
    fmt,
    parse_size,
    percentile,
    publish,
    set_threads,
)

NAME = "onnx_speed"


def val_frames(adapter: str | None, val: Path | None, images: int, size: tuple[int, int], folder: Path):
    """(images, true boxes, what they are): `val`, else the adapter's run's val split, else
    `images` synthetic frames of the demo's camera written to `folder`."""
    from PIL import Image

    from loomlens.evaluate.report import od_images

    if val is None and adapter:
        from loomlens.run import Run

        data = Run(adapter).config.get("data")
        val = Path(data) / "val.jsonl" if data else None
    if val is not None and val.is_file():
        found = od_images(val, images)
        return [Image.open(e.path).convert("RGB") for e in found], [e.truth for e in found], f"{val} ({len(found)})"
    from loomlens.data.synth import synthesize

    records = synthesize(folder / "frames", images=images, seed=1000, size=size)
    return ([Image.open(folder / "frames" / r.image).convert("RGB") for r in records], [r.boxes for r in records],
            f"{images} synthetic frames {size[0]}x{size[1]} (the run has no val split here)")


def no_cache(folder: Path, threads: int | None):
    """The export run as before its KV cache: each step reruns the first-step decoder over the
    whole answer so far."""
    import numpy as np

    from loomlens.infer.onnx_runtime import OnnxFlorence

    class NoCache(OnnxFlorence):
        def first_step(self, tokens, states, mask):
            logits, _ = super().first_step(tokens, states, mask)
            return logits, {"tokens": tokens, "states": states}

        def next_step(self, token, mask, cache):
            tokens = np.concatenate([cache["tokens"], token[:, None]], axis=1)
            logits, _ = super().first_step(tokens, cache["states"], mask)
            return logits, {"tokens": tokens, "states": cache["states"]}

    return NoCache(folder, threads=threads)


def one_pass(model, processor, images, batch_size: int, max_boxes: int, classes: list[str]) -> dict[str, Any]:
    """`<OD>` on every frame, `batch_size` at a time; an image's time is its batch's over its images."""
    from loomlens.infer.detection import batched, detect_with_details

    latencies, boxes, tokens, seconds = [], [], [], 0.0
    for chunk in batched(images, batch_size):
        start = time.perf_counter()
        found = detect_with_details(model, processor, chunk, max_boxes=max_boxes, batch_size=batch_size,
                                    classes=classes)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        latencies += [elapsed / len(chunk)] * len(chunk)
        boxes += [d.boxes for d in found]
        tokens += [len(d.generation.token_ids) for d in found]
    return {"latencies": latencies, "seconds": seconds, "boxes": boxes, "tokens": tokens}


def part_sizes(folder: Path, int8: bool) -> float:
    """MB of the five parts the way loads (fp32 parts where the recipe leaves them)."""
    import json

    from loomlens.infer.onnx_runtime import MANIFEST, PARTS

    quantised = set(json.loads((folder / MANIFEST).read_text())["int8_parts"]) if int8 else set()
    return sum((folder / f"{p}{'_int8' if p in quantised else ''}.onnx").stat().st_size for p in PARTS) / 1e6


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    base = result["rows"][0]["images_per_s"]
    for r in result["rows"]:
        rows.append([r["way"], f"{r['images_per_s']:.2f}", f"{r['images_per_s'] / base:.2f}x",
                     f"{1000 * r['latency_p50_s']:.0f}", f"{r['tokens_per_image']:.1f}", fmt(r["map50"]),
                     f"{r['as_torch']}/{r['images']}", "-" if r["parts_mb"] is None else f"{r['parts_mb']:.1f}"])
    return [Table(
        f"`<OD>` on {result['frames']}, model {result['model']}",
        ["way", "images/s", "vs torch", "ms/image p50", "tokens/image", "mAP50", "frames as torch fp32", "parts MB"],
        rows,
        [(f"All greedy, batches of {result['batch_size']}, up to {result['max_boxes']} boxes; torch as `loomlens "
          f"predict` runs it ({result['precision']} on this machine); torch threads {result['threads']}, "
          f"onnxruntime threads {result['ort_threads']}. Each way ran {result['repeats']} pass(es) in "
          "alternating order after a warm-up batch; images/s from the median pass; ms/image: a batch's time "
          "over its images, the median image."),
         ("onnx fp32, no cache: the first-step decoder rerun over the whole answer at every step (the export "
          "before its KV cache, an upper bound: that part also computes every earlier position's logits)."),
         ("onnx int8: the --int8 parts written without the export's check. frames as torch fp32: same boxes as "
          "torch fp32, coordinates within 1 location bin, scores within 0.01 (the export's check).")],
    )]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="val frames (at most)")
    parser.add_argument("--adapter", default=None, help="training run or adapter folder (default: the bare base)")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's, else tiny)")
    parser.add_argument("--val", type=Path, default=None, help="a converted split's JSONL (default: the run's val)")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="synthetic frames' size when no val split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="passes per way (the order alternates)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    from loomlens.data.synth import CLASSES
    from loomlens.evaluate.metrics import coco_metrics
    from loomlens.export.onnx import compare, write_export
    from loomlens.infer.loading import load_for_inference, resolve_precision
    from loomlens.infer.onnx_runtime import OnnxFlorence

    precision = resolve_precision("auto")
    with tempfile.TemporaryDirectory(prefix="loomlens-onnx-speed-") as tmp_name:
        tmp = Path(tmp_name)
        images, truth, frames = val_frames(args.adapter, args.val, args.images, args.size, tmp)
        fp32 = load_for_inference(model=args.model, adapter=args.adapter, precision="fp32")
        processor, classes = fp32.processor, fp32.classes or list(CLASSES)
        export = tmp / "onnx"
        export.mkdir()
        write_export(fp32, export, int8=True, log=lambda line: print(line, flush=True))
        model = fp32.model if precision == "fp32" else load_for_inference(
            model=args.model, adapter=args.adapter, precision=precision).model
        ways: dict[str, tuple[Any, Path | None, bool]] = {"torch": (model, None, False)}
        if precision != "fp32":
            ways["torch fp32"] = (fp32.model, None, False)
        ort_threads = args.threads  # None: onnxruntime's own default
        ways["onnx fp32"] = (OnnxFlorence(export, threads=ort_threads), export, False)
        ways["onnx fp32, no cache"] = (no_cache(export, ort_threads), export, False)
        ways["onnx int8"] = (OnnxFlorence(export, int8=True, threads=ort_threads), export, True)

        def run(model):
            return one_pass(model, processor, images, args.batch_size, args.max_boxes, classes)

        for model, _, _ in ways.values():
            one_pass(model, processor, images[: args.batch_size], args.batch_size, args.max_boxes, classes)
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in ways}
        for r in range(args.repeats):
            for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
                passes[name].append(run(ways[name][0]))
        reference = passes["torch fp32" if "torch fp32" in ways else "torch"][0]["boxes"]
        sizes = [im.size for im in images]
        rows = []
        for name, runs in passes.items():
            first = runs[0]
            agree = compare(reference, first["boxes"], sizes, parts=name, box_bins=1.0, score_tol=0.01)
            _, folder, int8 = ways[name]
            lat = [v for p in runs for v in p["latencies"]]
            rows.append({
                "way": name, "images": len(images),
                "images_per_s": len(images) / statistics.median(p["seconds"] for p in runs),
                "latency_p50_s": percentile(lat, 0.5), "tokens_per_image": sum(first["tokens"]) / len(images),
                "map50": coco_metrics(truth, first["boxes"], classes)["map50"],
                "as_torch": sum(c.ok for c in agree),
                "parts_mb": None if folder is None else part_sizes(folder, int8)})
    described = f"{fp32.base} + {fp32.adapter}" if fp32.adapter else f"{fp32.base} (no adapter)"
    result = {"model": described, "frames": frames, "batch_size": args.batch_size, "max_boxes": args.max_boxes,
              "repeats": args.repeats, "precision": precision, "threads": threads,
              "ort_threads": args.threads or "onnxruntime's default (one per core)", "classes": classes, "rows": rows}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
