"""Inference speed and accuracy: loomlens's way of running `<OD>` against the seed's, on the same frames.

    python -m bench.infer_speed                                  # bare tiny model, ~1 min
    python -m bench.infer_speed --data runs/demo/data --adapter runs/demo/run --repeats 3 --threads 2

With --data, the frames are the `<OD>` samples of that converted folder's --split (the whole
split, or the first --images), scored against their own truth: give the adapter's own data
(its val split) to measure what each way gives back of its accuracy. Without --data, a folder
of synthetic loom frames (`loomlens synth`, a --seed the demo does not train on) is used, on
which a trained adapter scores near 0 (mAP there compares the ways, not the adapter).

Seven ways (eight with an adapter trained on mirrors) run in this process, each after a
warm-up image, --repeats times in alternating order:

- `seed`: the seed's inference (`bench.common.seed_detect`: Florence-2's sample code): one
  image at a time, the processor's inputs, 3 beams, `max_new_tokens=1024` (capped at the
  decoder's position table, as any caller must), the adapter attached unmerged (peft), fp32,
  `post_process_generation`, every score 1;
- `seed, greedy`: the same with one beam;
- `loomlens`: as `loomlens predict --tta off` and `eval --tta off` run it: batches of --batch-size,
  greedy, through the class grammar when the run has classes (`infer/grammar.py`), the answer
  budget bounded by the box count (`box_token_budget(--max-boxes)`), the adapter merged into
  the weights and the weights in the precision `auto` picks for this machine
  (`infer/loading.py`: bf16 on a CPU with AMX or AVX512-BF16, else fp32), scores from the
  generation (`infer/scoring.py`);
- `loomlens, free form` (or `constrained`, when the run has no classes and the default is
  free): the other decoding;
- `loomlens, batch 1`: loomlens one image at a time, to show what batching adds;
- `loomlens, fp32` (or `bf16` where auto picks fp32): the other precision;
- `loomlens, one stream`: each batch as one call, to show what running its halves at once
  adds on a CPU (`infer/streams.py`);
- `loomlens, N views fused`: each image also through the mirrors the adapter was trained on,
  their boxes fused (`infer/tta.py`): what `predict` and `eval` do by default (`--tta auto`).

Without --adapter all use the bare base model. Since the gap depends on how long the answers
are (weights that never stop run to the cap; trained ones stop after their boxes), the seed's
way and loomlens's are also timed on answers forced to --answer-boxes boxes.

Reported: images/s, latency p50/p95 per image (an image in a batch waits for its whole
batch), generated tokens per image, mAP50 and mAP50-95 on the same frames, and for loomlens's
rows the same boxes with every score 1 (what the scores add to the ranking). How sure the
difference loomlens - seed is: a bootstrap over the frames (90 % interval) and, when there
are more than --sample frames, the share of random --sample-frame subsets on which loomlens
scores under the seed (a small sample can turn either way).
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
    SEED_BEAMS, SEED_MAX_NEW_TOKENS, Table, answer_tokens, common_flags, device, fmt, forced_answer_seconds,
    paired_resamples, parse_size, percentile, publish, seed_detect, set_threads,
)
from loomlens.config import INFER_BATCH_SIZE

NAME = "infer_speed"


def load_models(model: str | None, adapter: str | None, precisions: tuple[str, str]):
    """(seed model, {precision: loomlens model}, processor, classes, description): the seed's
    model fp32 with the adapter attached unmerged (peft), as the seed ran it; loomlens's
    prepared as `Predictor` prepares it (merged, cast), once for each of `precisions`.
    `classes` are the run's (empty without an adapter or a classes.txt)."""
    from loomlens.infer.loading import load_for_inference

    seed = load_for_inference(model=model, adapter=adapter)
    fast = {p: load_for_inference(model=model, adapter=adapter, precision=p).model for p in precisions}
    described = f"{seed.base} + {seed.adapter}" if adapter else f"{seed.base} (no adapter)"
    return seed.model, fast, seed.processor, list(seed.classes), described


def open_images(paths: list[Path]):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def split_frames(data: Path, split: str, images: int | None) -> tuple[list[Path], list, list[str]]:
    """The `<OD>` frames of a converted folder's `split` (the first `images`, None: all), their
    true boxes and the folder's classes."""
    from loomlens.data.yolo import read_class_names
    from loomlens.evaluate.report import od_images

    jsonl = data if data.suffix == ".jsonl" else data / f"{split}.jsonl"
    if not jsonl.exists():
        raise SystemExit(f"no split at {jsonl}")
    found = od_images(jsonl, images)
    if not found:
        raise SystemExit(f"no <OD> samples in {jsonl}")
    return [e.path for e in found], [e.truth for e in found], read_class_names(jsonl.parent / "classes.txt")


def loomlens_pass(model, processor, paths: list[Path], batch_size: int, max_boxes: int, constrained: bool,
                  classes: list[str], streams: int | None = None, views: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """loomlens's way: batched, greedy, bounded budget, a batch's halves at once on a CPU
    (`streams` None; 1: one call at a time), each image through `views` (`infer/tta.py`);
    per-image latency = its batch's time."""
    from loomlens.infer.detection import batched, detect_with_details

    latencies, boxes, tokens, seconds = [], [], [], 0.0
    for chunk in batched(paths, batch_size):
        start = time.perf_counter()
        found = detect_with_details(model, processor, open_images(chunk), max_boxes=max_boxes,
                                    batch_size=batch_size, constrained=constrained, classes=classes,
                                    streams=streams, views=views)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        latencies += [elapsed] * len(chunk)
        boxes += [d.boxes for d in found]
        tokens += [len(d.generation.token_ids) for d in found]
    return {"latencies": latencies, "seconds": seconds, "boxes": boxes, "tokens": tokens}


def seed_pass(model, processor, paths: list[Path], num_beams: int = SEED_BEAMS) -> dict[str, Any]:
    """The seed's way (`seed_detect`): one image per call, `num_beams`, scores 1."""
    latencies, boxes, tokens, unheld = [], [], [], 0
    for path in paths:
        start = time.perf_counter()
        (image,) = open_images([path])
        found, bad, count = seed_detect(model, processor, image, num_beams)
        latencies.append(time.perf_counter() - start)
        boxes.append(found)
        tokens.append(count)
        unheld += bad
    return {"latencies": latencies, "seconds": sum(latencies), "boxes": boxes, "tokens": tokens, "unheld": unheld}


def forced_row(slow, fast, other, processor, paths: list[Path], boxes: int, batch_size: int) -> dict[str, Any]:
    """Seconds per image of answers forced to `boxes` boxes: the seed's way, loomlens's, and
    loomlens's in the other precision."""
    return {"boxes": boxes, "tokens": answer_tokens(processor, boxes, fast),
            "seed_s": forced_answer_seconds(slow, processor, paths, boxes, 1, SEED_BEAMS, fast_pixels=False),
            "loomlens_s": forced_answer_seconds(fast, processor, paths, boxes, batch_size),
            "other_s": forced_answer_seconds(other, processor, paths, boxes, batch_size)}


def merge_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated passes over the same frames as one pass over all of them; `seconds` is the
    median pass's times the passes, so one pass caught in a slow spell does not set the rate.
    Boxes are the first pass's (every pass writes the same answers)."""
    import statistics

    return {"latencies": [v for p in passes for v in p["latencies"]],
            "seconds": statistics.median(p["seconds"] for p in passes) * len(passes),
            "boxes": passes[0]["boxes"], "tokens": passes[0]["tokens"], "unheld": passes[0].get("unheld", 0)}


def summary(name: str, run: dict[str, Any], truth, classes: list[str], ones: bool = False) -> dict[str, Any]:
    """images/s, latency percentiles, tokens, mAP50 and mAP50-95 of one way; with `ones`, the
    same boxes with every score 1 too."""
    from loomlens.evaluate.metrics import coco_metrics

    lat = run["latencies"]
    metrics = coco_metrics(truth, run["boxes"], classes)
    row = {"way": name, "images": len(run["boxes"]),
           "images_per_s": len(lat) / run["seconds"],
           "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
           "tokens_per_image": sum(run["tokens"]) / len(run["tokens"]),
           "map50": metrics["map50"], "map50_95": metrics["map50_95"],
           "predicted_boxes": sum(len(b) for b in run["boxes"]), "unheld_boxes": run["unheld"]}
    if ones:  # what the scores add: the same boxes ranked by file order alone
        flat = coco_metrics(truth, [[replace(b, score=1.0) for b in bs] for bs in run["boxes"]], classes)
        row["map50_scores_1"], row["map50_95_scores_1"] = flat["map50"], flat["map50_95"]
    return row


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    seed = result["rows"][0]
    for r in result["rows"]:
        speed = r["images_per_s"] / seed["images_per_s"]
        flat = (f"{fmt(r['map50_scores_1'])} / {fmt(r['map50_95_scores_1'])}" if "map50_scores_1" in r
                else "(scores are 1)")
        rows.append([r["way"], f"{r['images_per_s']:.2f}", f"{speed:.2f}x", f"{1000 * r['latency_p50_s']:.0f}",
                     f"{1000 * r['latency_p95_s']:.0f}", f"{r['tokens_per_image']:.0f}",
                     f"{fmt(r['map50'])} / {fmt(r.get('map50_95'))}", flat])
    precision, other = result.get("precision", "fp32"), result.get("other_precision", "bf16")
    loomlens_decoding = "through the class grammar" if result.get("constrained") else "free form"
    own = result.get("data")
    where = (f"{result['images']} frames of {own} ({result.get('split', 'val')}, the adapter's own data)" if own
             else f"{result['images']} synthetic frames {result['size']}")
    notes = [
        (f"seed: the seed's inference, batch 1, {SEED_BEAMS} beams (greedy: 1), max_new_tokens {SEED_MAX_NEW_TOKENS} "
        f"(capped at {result['decoder_limit']} by the decoder), fp32, adapter unmerged, the processor's "
        "post_process_generation, every score 1; loomlens (as `loomlens predict --tta off` runs it): "
        f"batch {result['batch_size']}, greedy, {loomlens_decoding}, max_new_tokens {result['loomlens_budget']} "
        f"({result['max_boxes']} boxes), adapter merged, weights in {precision} (`--precision auto` on this "
        f"machine), scores from the generation, on a CPU each batch as two halves at once; batch 1: loomlens one "
        f"image at a time (what batching adds); {other}: loomlens with {other} weights (what the precision adds); "
        "one stream: each batch as one call (what its halves at once add); N views fused: each image also "
        "through the mirrors the adapter was trained on, boxes fused (`predict`'s and `eval`'s default, "
        "`--tta auto`)."),
        (f"Each way ran {result.get('repeats', 1)} pass(es) over the frames, in alternating order; images/s "
        "from the median pass. Latency of an image in a batch is its batch's time. A model that never stops "
        "runs every answer to its cap, so tokens/image shows how much of the gap is budget."),
    ]
    if seed.get("unheld_boxes"):
        notes.append(f"The seed's parse returned {seed['unheld_boxes']} reversed or zero-sized box(es), left out "
                     "(no COCO evaluation matches one); loomlens's parser drops and counts them.")
    sure = result.get("difference")
    if sure:
        boot = sure["bootstrap"]
        line = (f"loomlens - seed over {boot['draws']} bootstrap resamples of the frames (90 %): mAP50 "
                f"{boot['map50']['low']:+.3f} .. {boot['map50']['high']:+.3f}, mAP50-95 "
                f"{boot['map50_95']['low']:+.3f} .. {boot['map50_95']['high']:+.3f}.")
        sample = sure.get("sample")
        if sample:
            line += (f" On {sample['draws']} random samples of {sample['frames']} of these frames, loomlens scored "
                     f"under the seed in {100 * sample['map50']['below']:.0f} % (mAP50) and "
                     f"{100 * sample['map50_95']['below']:.0f} % (mAP50-95) of them.")
        notes.append(line)
    if not own:
        notes.append("The frames come from another synthetic camera than the adapter's training frames (--seed), so "
                     "mAP here measures how the ways compare, not the adapter's own accuracy (--data gives that).")
    main = Table(f"`<OD>` on {where}, model {result['model']}",
                 ["way", "images/s", "vs seed", "p50 ms", "p95 ms", "tokens/image", "mAP50 / mAP50-95",
                  "same boxes, scores = 1"], rows, notes)
    found = result.get("forced", [])
    forced = Table(
        f"Per answer of B boxes ({result['answer_images']} frames, every answer forced to that length)",
        ["boxes", "tokens", "seed ms/image", "loomlens ms/image", "loomlens vs seed", f"loomlens, {other}"],
        [[str(f["boxes"]), str(f["tokens"]), f"{1000 * f['seed_s']:.0f}", f"{1000 * f['loomlens_s']:.0f}",
          f"{f['seed_s'] / f['loomlens_s']:.2f}x", f"{1000 * f['other_s']:.0f} ms, {f['seed_s'] / f['other_s']:.2f}x"]
         for f in found],
        [(f"min_new_tokens = max_new_tokens: the seed's way (batch 1, {SEED_BEAMS} beams, fp32) and loomlens's "
         f"(batch {result['batch_size']}, greedy, {precision}) on answers of the same length, whatever the weights "
         f"would write. Trained weights that stop after B boxes land on these rows. {other}: loomlens's way "
         f"with {other} weights.")],
    )
    return [main, forced] if found else [main]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's settings from the command line (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="converted folder (or a .jsonl split) whose frames and truth to use (default: synth)")
    parser.add_argument("--split", default="val", help="split of --data")
    parser.add_argument("--images", type=int, default=None,
                        help="frames (default: 16 synthetic, or the whole split of --data)")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="synthetic frame size WxH (demo: 512x288)")
    parser.add_argument("--seed", type=int, default=1000, help="synth seed (the demo trains on seed 0)")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's, else tiny)")
    parser.add_argument("--adapter", default=None, help="training run or adapter folder")
    parser.add_argument("--batch-size", type=int, default=INFER_BATCH_SIZE, help="loomlens's batch (predict's default)")
    parser.add_argument("--max-boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="passes per way (the order alternates)")
    parser.add_argument("--answer-boxes", type=int, nargs="*", default=[0, 1, 4, 16],
                        help="also time answers forced to this many boxes, seed's way and loomlens's")
    parser.add_argument("--answer-images", type=int, default=16, help="frames for the forced-length timing")
    parser.add_argument("--sample", type=int, default=32,
                        help="frames per random sample in the how-sure note (the size of a quick check)")
    parser.add_argument("--draws", type=int, default=200, help="resamples in the how-sure note (0: none)")
    common_flags(parser, NAME)
    return parser.parse_args(argv)


def frames(args: argparse.Namespace, folder: Path) -> tuple[list[Path], list, list[str]]:
    """The frames to run on, their true boxes and their classes: --data's split, else
    synthetic frames written into `folder`."""
    if args.data is not None:
        return split_frames(args.data, args.split, args.images)
    from loomlens.data.synth import CLASSES, synthesize

    records = synthesize(folder, images=args.images or 16, seed=args.seed, size=args.size)
    return [folder / r.image for r in records], [r.boxes for r in records], list(CLASSES)


def ways(args: argparse.Namespace, slow, fast: dict, processor, classes: list[str], constrained: bool,
         views: tuple[str, ...], precisions: tuple[str, str]) -> dict[str, Any]:
    """Each way to time, by its row's name: paths -> a pass's result (`loomlens_pass`,
    `seed_pass`). `main`'s speedups read the rows by place (0, 2, 3, 5 and 7), so the order is fixed."""
    precision, other = precisions

    def loomlens(images, batch_size=args.batch_size, grammar=constrained, dtype=precision, streams=None,
                 mirrors=("",)):
        return loomlens_pass(fast[dtype], processor, images, batch_size, args.max_boxes, grammar, classes, streams,
                             mirrors)

    found = {
        "seed": lambda images: seed_pass(slow, processor, images),
        "seed, greedy": lambda images: seed_pass(slow, processor, images, num_beams=1),
        "loomlens": loomlens,
        ("loomlens, free form" if constrained else "loomlens, constrained"):
            lambda images: loomlens(images, grammar=not constrained),
        "loomlens, batch 1": lambda images: loomlens(images, batch_size=1),
        f"loomlens, {other}": lambda images: loomlens(images, dtype=other),
        "loomlens, one stream": lambda images: loomlens(images, streams=1),
    }
    if len(views) > 1:
        found[f"loomlens, {len(views)} views fused"] = lambda images: loomlens(images, mirrors=views)
    return found


def timed(found: dict[str, Any], paths: list[Path], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every way's passes over `paths`, after a one-image warm-up each, `repeats` times in
    alternating order (a slow spell hits every way alike)."""
    for way in found.values():
        way(paths[:1])
    passes = {name: [] for name in found}
    for r in range(repeats):
        for name in list(found)[:: 1 if r % 2 == 0 else -1]:
            passes[name].append(found[name](paths))
    return passes


def main(argv: list[str] | None = None) -> int:
    from loomlens.infer.generation import box_token_budget, decoder_limit, label_token_count
    from loomlens.infer.loading import resolve_precision
    from loomlens.run import Run

    args = parse_args(argv)
    set_threads(args.threads)
    precision = resolve_precision("auto", device())
    other = "fp32" if precision == "bf16" else "bf16"
    with tempfile.TemporaryDirectory(prefix="loomlens-infer-speed-") as tmp_name:
        slow, fast, processor, classes, described = load_models(args.model, args.adapter, (precision, other))
        paths, truth, data_classes = frames(args, Path(tmp_name) / "frames")
        classes = classes or data_classes
        constrained = bool(classes) and args.adapter is not None  # `predict`'s default: the run's classes
        views = Run(args.adapter).views if args.adapter else ("",)  # what `predict --tta auto` looks through
        runs = timed(ways(args, slow, fast, processor, classes, constrained, views, (precision, other)), paths,
                     args.repeats)
        some = paths[: args.answer_images]
        forced = [forced_row(slow, fast[precision], fast[other], processor, some, b, args.batch_size)
                  for b in args.answer_boxes]

    merged = {name: merge_passes(passes) for name, passes in runs.items()}
    rows = [summary(name, merged[name], truth, classes, ones=name.startswith("loomlens")) for name in runs]
    difference = None
    if args.draws:
        a, b = merged["loomlens"]["boxes"], merged["seed"]["boxes"]
        difference = {"bootstrap": paired_resamples(truth, a, b, classes, draws=args.draws)}
        if len(paths) > args.sample:
            difference["sample"] = paired_resamples(truth, a, b, classes, size=args.sample, draws=args.draws)
    result = {"model": described, "images": len(paths), "repeats": args.repeats,
              "data": str(args.data) if args.data is not None else None, "split": args.split,
              "size": "x".join(map(str, args.size)),
              "batch_size": args.batch_size, "max_boxes": args.max_boxes, "classes": classes,
              "constrained": constrained, "decoder_limit": decoder_limit(slow),
              "loomlens_budget": box_token_budget(args.max_boxes, label_token_count(processor.tokenizer, classes)),
              "rows": rows, "forced": forced, "answer_images": len(some), "difference": difference,
              "speedup": rows[2]["images_per_s"] / rows[0]["images_per_s"],
              "speedup_other_decoding": rows[3]["images_per_s"] / rows[0]["images_per_s"],
              "precision": precision, "other_precision": other,
              "speedup_other_precision": rows[5]["images_per_s"] / rows[0]["images_per_s"],
              "views": list(views),
              "speedup_views": rows[7]["images_per_s"] / rows[0]["images_per_s"] if len(rows) > 7 else None}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
