"""Inference speed: loomlens's way of running `<OD>` against the seed's, on the same frames.

    python -m bench.infer_speed                                  # bare tiny model, ~1 min
    python -m bench.infer_speed --adapter runs/demo/run --images 48 --threads 2

A folder of synthetic loom frames (`loomlens synth`, a seed the demo does not train on) is
run five ways in this process, each after a warm-up image, --repeats times in alternating order:

- `seed`: one image at a time, 3 beams, `max_new_tokens=1024` (capped at the decoder's
  position table, as any caller must), the adapter attached unmerged (peft);
- `loomlens`: as `loomlens predict` runs it (`Predictor`): batches of --batch-size, greedy,
  the answer budget bounded by the box count (`box_token_budget(--max-boxes)`), the adapter
  merged into the weights and the weights in the precision `auto` picks for this machine
  (`infer/loading.py`: bf16 on a CPU with AMX or AVX512-BF16, else fp32);
- `loomlens, constrained`: the same through the class grammar (`infer/grammar.py`);
- `loomlens, batch 1`: loomlens one image at a time, to show what batching adds;
- `loomlens, fp32` (or `bf16` where auto picks fp32): the other precision, to show what it adds.

Without --adapter both use the bare base model. Since the gap depends on how long the answers
are (weights that never stop run to the cap; trained ones stop after their boxes), the seed's
way and loomlens's are also timed on answers forced to --answer-boxes boxes.

Reported: images/s, latency p50/p95 per image (an image in a batch waits for its whole
batch), generated tokens per image and mAP50 on the same frames (the seed's row with its
scores = 1, as the seed computed it, and with loomlens's scores on the same generations).
The seed's beam search stops once 3 answers are finished (`early_stopping=True`, as
`loomlens.infer.generate` runs it); Florence-2's sample code passes `early_stopping=False`,
which searches at least as long, so the seed's row is if anything flattered.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    Table, answer_tokens, common_flags, device, fmt, forced_answer_seconds, parse_size, percentile, publish,
    set_threads,
)

NAME = "infer_speed"
SEED_BEAMS = 3
SEED_MAX_NEW_TOKENS = 1024


def load_models(model: str | None, adapter: str | None, precisions: tuple[str, str]):
    """(seed model, {precision: loomlens model}, processor, classes, description): the seed's
    model fp32 with the adapter attached unmerged (peft), as the seed ran it; loomlens's
    prepared as `Predictor` prepares it (merged, cast), once for each of `precisions`."""
    from loomlens.data.synth import CLASSES
    from loomlens.infer.loading import load_for_inference

    seed = load_for_inference(model=model, adapter=adapter)
    fast = {p: load_for_inference(model=model, adapter=adapter, precision=p).model for p in precisions}
    described = f"{seed.base} + {seed.adapter}" if adapter else f"{seed.base} (no adapter)"
    return seed.model, fast, seed.processor, seed.classes or list(CLASSES), described


def open_images(paths: list[Path]):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def loomlens_pass(model, processor, paths: list[Path], batch_size: int, max_boxes: int, constrained: bool,
                  classes: list[str]) -> dict[str, Any]:
    """loomlens's way: batched, greedy, bounded budget; per-image latency = its batch's time."""
    from loomlens.infer.detection import batched, detect_with_details

    latencies, boxes, tokens, seconds = [], [], [], 0.0
    for chunk in batched(paths, batch_size):
        start = time.perf_counter()
        found = detect_with_details(model, processor, open_images(chunk), max_boxes=max_boxes,
                                    batch_size=batch_size, constrained=constrained, classes=classes)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        latencies += [elapsed] * len(chunk)
        boxes += [d.boxes for d in found]
        tokens += [len(d.generation.token_ids) for d in found]
    return {"latencies": latencies, "seconds": seconds, "boxes": boxes, "tokens": tokens}


def seed_pass(model, processor, paths: list[Path]) -> dict[str, Any]:
    """The seed's way: one image per call, 3 beams, max_new_tokens=1024."""
    from loomlens.infer.generation import generate
    from loomlens.infer.scoring import scored_boxes

    latencies, boxes, tokens = [], [], []
    for path in paths:
        start = time.perf_counter()
        (image,) = open_images([path])
        (gen,) = generate(model, processor, [image], ["<OD>"], SEED_MAX_NEW_TOKENS, num_beams=SEED_BEAMS,
                          fast_pixels=False)
        found, _ = scored_boxes(processor.tokenizer, gen, image.width, image.height)
        latencies.append(time.perf_counter() - start)
        boxes.append(found)
        tokens.append(len(gen.token_ids))
    return {"latencies": latencies, "seconds": sum(latencies), "boxes": boxes, "tokens": tokens}


def forced_row(slow, fast, other, processor, paths: list[Path], boxes: int, batch_size: int) -> dict[str, Any]:
    """Seconds per image of answers forced to `boxes` boxes: the seed's way, loomlens's, and
    loomlens's in the other precision."""
    return {"boxes": boxes, "tokens": answer_tokens(processor, boxes, fast),
            "seed_s": forced_answer_seconds(slow, processor, paths, boxes, 1, SEED_BEAMS, fast_pixels=False),
            "loomlens_s": forced_answer_seconds(fast, processor, paths, boxes, batch_size),
            "other_s": forced_answer_seconds(other, processor, paths, boxes, batch_size)}


def merge_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated passes over the same frames as one pass over all of them; `seconds` is the
    median pass's times the passes, so one pass caught in a slow spell does not set the rate."""
    import statistics

    return {"latencies": [v for p in passes for v in p["latencies"]],
            "seconds": statistics.median(p["seconds"] for p in passes) * len(passes),
            "boxes": [b for p in passes for b in p["boxes"]], "tokens": [t for p in passes for t in p["tokens"]]}


def summary(name: str, run: dict[str, Any], truth, classes: list[str], ones: bool = False) -> dict[str, Any]:
    """images/s, latency percentiles, tokens and mAP50 of one pass."""
    from loomlens.evaluate.metrics import coco_metrics

    lat = run["latencies"]
    row = {"way": name, "images": len(lat),
           "images_per_s": len(lat) / run["seconds"],
           "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
           "tokens_per_image": sum(run["tokens"]) / len(lat),
           "map50": coco_metrics(truth, run["boxes"], classes)["map50"],
           "predicted_boxes": sum(len(b) for b in run["boxes"])}
    if ones:  # the seed's own figure: every score 1
        row["map50_scores_1"] = coco_metrics(truth, [[replace(b, score=1.0) for b in bs] for bs in run["boxes"]],
                                             classes)["map50"]
    return row


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    seed = result["rows"][0]
    for r in result["rows"]:
        speed = r["images_per_s"] / seed["images_per_s"]
        m = f"{fmt(r['map50'])}" + (f" ({fmt(r['map50_scores_1'])} with scores = 1)" if "map50_scores_1" in r else "")
        rows.append([r["way"], f"{r['images_per_s']:.2f}", f"{speed:.2f}x", f"{1000 * r['latency_p50_s']:.0f}",
                     f"{1000 * r['latency_p95_s']:.0f}", f"{r['tokens_per_image']:.0f}", m])
    precision, other = result.get("precision", "fp32"), result.get("other_precision", "bf16")
    main = Table(
        f"`<OD>` on {result['images']} synthetic frames {result['size']}, model {result['model']}",
        ["way", "images/s", "vs seed", "p50 ms", "p95 ms", "tokens/image", "mAP50"], rows,
        [f"seed: batch 1, {SEED_BEAMS} beams, max_new_tokens {SEED_MAX_NEW_TOKENS} (capped at "
         f"{result['decoder_limit']} by the decoder), fp32, adapter unmerged; loomlens (as `loomlens predict` runs it): "
         f"batch {result['batch_size']}, greedy, max_new_tokens {result['loomlens_budget']} ({result['max_boxes']} "
         f"boxes), adapter merged, weights in {precision} (`--precision auto` on this machine); constrained: through "
         f"the class grammar; batch 1: loomlens one image at a time (what batching adds); {other}: loomlens with "
         f"{other} weights (what the precision adds).",
         f"Each way ran {result.get('repeats', 1)} pass(es) over the frames, in alternating order; images/s "
         "from the median pass. "
         "Latency of an image in a batch is its batch's time. A model that never stops runs every answer "
         "to its cap, so tokens/image shows how much of the gap is budget.",
         "The frames come from another synthetic camera than the adapter's training frames (--seed), so "
         "mAP50 here measures how the ways compare, not the adapter's own accuracy."],
    )
    found = result.get("forced", [])
    forced = Table(
        f"Per answer of B boxes ({result['answer_images']} frames, every answer forced to that length)",
        ["boxes", "tokens", "seed ms/image", "loomlens ms/image", "loomlens vs seed", f"loomlens, {other}"],
        [[str(f["boxes"]), str(f["tokens"]), f"{1000 * f['seed_s']:.0f}", f"{1000 * f['loomlens_s']:.0f}",
          f"{f['seed_s'] / f['loomlens_s']:.2f}x", f"{1000 * f['other_s']:.0f} ms, {f['seed_s'] / f['other_s']:.2f}x"]
         for f in found],
        [f"min_new_tokens = max_new_tokens: the seed's way (batch 1, {SEED_BEAMS} beams, fp32) and loomlens's "
         f"(batch {result['batch_size']}, greedy, {precision}) on answers of the same length, whatever the weights "
         f"would write. Trained weights that stop after B boxes land on these rows. {other}: loomlens's way "
         f"with {other} weights."],
    )
    return [main, forced] if result.get("forced") else [main]


def main(argv: list[str] | None = None) -> int:
    from loomlens.data.synth import synthesize
    from loomlens.infer.generation import box_token_budget, decoder_limit, label_token_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="frame size WxH (demo: 512x288)")
    parser.add_argument("--seed", type=int, default=1000, help="synth seed (the demo trains on seed 0)")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's, else tiny)")
    parser.add_argument("--adapter", default=None, help="training run or adapter folder")
    parser.add_argument("--batch-size", type=int, default=16, help="loomlens's batch (Predictor's default)")
    parser.add_argument("--max-boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="passes per way (the order alternates)")
    parser.add_argument("--answer-boxes", type=int, nargs="*", default=[0, 1, 4, 16],
                        help="also time answers forced to this many boxes, seed's way and loomlens's")
    parser.add_argument("--answer-images", type=int, default=16, help="frames for the forced-length timing")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from loomlens.infer.loading import resolve_precision

    precision = resolve_precision("auto", device())
    other = "fp32" if precision == "bf16" else "bf16"
    with tempfile.TemporaryDirectory(prefix="loomlens-infer-speed-") as tmp_name:
        tmp = Path(tmp_name)
        records = synthesize(tmp / "frames", images=args.images, seed=args.seed, size=args.size)
        paths, truth = [tmp / "frames" / r.image for r in records], [r.boxes for r in records]
        slow, fast, processor, classes, described = load_models(args.model, args.adapter, (precision, other))

        def loomlens(images, batch_size=args.batch_size, constrained=False, dtype=precision):
            return loomlens_pass(fast[dtype], processor, images, batch_size, args.max_boxes, constrained, classes)

        ways = {
            "seed": lambda images: seed_pass(slow, processor, images),
            "loomlens": loomlens,
            "loomlens, constrained": lambda images: loomlens(images, constrained=True),
            "loomlens, batch 1": lambda images: loomlens(images, batch_size=1),
            f"loomlens, {other}": lambda images: loomlens(images, dtype=other),
        }
        for way in ways.values():
            way(paths[:1])  # warm-up
        runs = {name: [] for name in ways}
        for r in range(args.repeats):  # the order alternates: a slow spell hits every way alike
            for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
                runs[name].append(ways[name](paths))
        some = paths[: args.answer_images]
        forced = [forced_row(slow, fast[precision], fast[other], processor, some, b, args.batch_size)
                  for b in args.answer_boxes]

    rows = [summary(name, merge_passes(passes), truth * args.repeats, classes, ones=name == "seed")
            for name, passes in runs.items()]
    result = {"model": described, "images": args.images, "repeats": args.repeats, "size": "x".join(map(str, args.size)),
              "batch_size": args.batch_size, "max_boxes": args.max_boxes, "classes": classes,
              "decoder_limit": decoder_limit(slow),
              "loomlens_budget": box_token_budget(args.max_boxes, label_token_count(processor.tokenizer, classes)),
              "rows": rows, "forced": forced, "answer_images": len(some), "speedup": rows[1]["images_per_s"] / rows[0]["images_per_s"],
              "speedup_constrained": rows[2]["images_per_s"] / rows[0]["images_per_s"],
              "precision": precision, "other_precision": other,
              "speedup_other_precision": rows[4]["images_per_s"] / rows[0]["images_per_s"]}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
