"""Which confidence score, does loomlens's parser read what Florence-2's processor reads, and is
constrained `<OD>` decoding worth it? Measured on a split.

    python -m bench.decoding --data runs/demo/data --adapter runs/demo/run

One free-running generation per image, the model as `loomlens eval` runs it (adapter merged,
--precision), is read several ways; the generation is the same, only the reading changes:

- scored by each of `infer/scoring.py`'s formulas: `product` (label probability x
  geometric-mean coordinate probability, the default), `mean` (geometric mean over all the
  box's tokens), `label` (the label's probability alone); a coordinate's probability is that of
  the bins near the chosen one (`Generation.loc_near`), and one more row reads it, as before,
  from the chosen token alone; and one more gives each box also under the other classes the
  model nearly wrote for it (`scoring.other_labels`), as `loomlens eval` counts boxes;
- every score 1 (the seed's way), with loomlens's parser;
- every score 1, read by Florence-2's processor (`batch_decode` + `post_process_generation`,
  `bench.common.processor_boxes`): the seed's whole reading of the same tokens, so a
  difference to the row above is the parser's alone.

Then the same images are decoded through the class grammar (`infer/grammar.py`). Reports
mAP50-95 / mAP50 / mAP75, dropped malformed parts, seconds per image, and how sure each row's
difference to the default is (a bootstrap over the frames, 90 % interval of mAP50-95), as a
table and JSON. Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.common import paired_resamples, processor_boxes
from loomlens.data.yolo import read_class_names
from loomlens.evaluate.metrics import coco_metrics
from loomlens.evaluate.report import od_images
from loomlens.infer.detection import batched, detect_with_details
from loomlens.infer.loading import load_for_inference
from loomlens.infer.scoring import SCORE_METHODS, class_spellings, scored_boxes


def row(name: str, truth, predicted, classes, dropped: int, seconds: float) -> dict:
    m = coco_metrics(truth, predicted, classes)
    return {"decoding": name, "map50_95": m["map50_95"], "map50": m["map50"], "map75": m["map75"],
            "predicted_boxes": m["predicted_boxes"], "dropped_parts": dropped, "seconds_per_image": seconds,
            "boxes": predicted}


def run(loaded, images, classes, batch_size: int, max_boxes: int, constrained: bool):
    """Detections for every image, and the wall time per image."""
    found = []
    start = time.perf_counter()
    for chunk in batched(images, batch_size):
        pictures = [Image.open(e.path).convert("RGB") for e in chunk]
        found += [(p.size, d) for p, d in zip(pictures, detect_with_details(
            loaded.model, loaded.processor, pictures, max_boxes=max_boxes, batch_size=batch_size,
            constrained=constrained, classes=classes))]
    return found, (time.perf_counter() - start) / max(1, len(images))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="converted folder (or a .jsonl split)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16, as `loomlens eval` takes it")
    parser.add_argument("--max-images", type=int, default=None, help="the first N images (default: all)")
    parser.add_argument("--max-boxes", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--draws", type=int, default=200, help="bootstrap resamples (0: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/decoding.json"))
    args = parser.parse_args(argv)

    jsonl = args.data if args.data.suffix == ".jsonl" else args.data / f"{args.split}.jsonl"
    loaded = load_for_inference(model=args.model, adapter=args.adapter, precision=args.precision)
    classes = loaded.classes or read_class_names(jsonl.parent / "classes.txt")
    images = od_images(jsonl, args.max_images)
    truth = [e.truth for e in images]
    tokenizer = loaded.processor.tokenizer

    free, free_seconds = run(loaded, images, classes, args.batch_size, args.max_boxes, constrained=False)
    dropped = sum(d.dropped for _, d in free)
    rows = []
    for method in SCORE_METHODS:
        predicted = [scored_boxes(tokenizer, d.generation, w, h, None, method)[0][: args.max_boxes]
                     for (w, h), d in free]
        rows.append(row(f"free, score={method}", truth, predicted, classes, dropped, free_seconds))
    ones = [[replace(b, score=1.0) for b in d.boxes] for _, d in free]
    rows.append(row("free, score=1", truth, ones, classes, dropped, free_seconds))
    read = [processor_boxes(loaded.processor, d.generation.token_ids, size) for size, d in free]
    rows.append(row("free, the processor's parse, score=1 (seed)", truth, [b for b, _ in read], classes,
                    sum(n for _, n in read), free_seconds))
    if classes:
        grammar, seconds = run(loaded, images, classes, args.batch_size, args.max_boxes, constrained=True)
        dropped = sum(d.dropped for _, d in grammar)
        for method in ("product", "label"):
            predicted = [scored_boxes(tokenizer, d.generation, w, h, None, method)[0][: args.max_boxes]
                         for (w, h), d in grammar]
            rows.append(row(f"constrained, score={method}", truth, predicted, classes, dropped, seconds))
        own = [scored_boxes(tokenizer, replace(d.generation, loc_near={}), w, h)[0][: args.max_boxes]
               for (w, h), d in grammar]
        rows.append(row("constrained, score=product, coordinates by their own token", truth, own, classes, dropped,
                        seconds))
        spellings = class_spellings(tokenizer, classes)
        others = [scored_boxes(tokenizer, d.generation, w, h, spellings=spellings)[0][: args.max_boxes]
                  for (w, h), d in grammar]
        rows.append(row("constrained, score=product, also under the classes nearly written (eval's way)", truth,
                        others, classes, dropped, seconds))
        rows.append(row("constrained, score=1", truth, [[replace(b, score=1.0) for b in d.boxes] for _, d in grammar],
                        classes, dropped, seconds))
    for r in rows:  # how sure each difference to the default reading is
        r["vs_product"] = (paired_resamples(truth, r["boxes"], rows[0]["boxes"], classes, draws=args.draws)
                           if args.draws and r is not rows[0] else None)
    for r in rows:
        del r["boxes"]

    result = {"data": str(jsonl), "images": len(images), "model": loaded.base, "precision": loaded.precision,
              "adapter": str(loaded.adapter) if loaded.adapter else None, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"{len(images)} images of {jsonl}, model {loaded.base}, {loaded.precision}")
    for column in ("decoding", "mAP50-95", "mAP50", "mAP75", "boxes", "dropped", "s/image",
                   "mAP50-95 - free product (90 %)"):
        table.add_column(column, justify="right")
    for r in rows:
        sure = r["vs_product"]
        spread = f"{sure['map50_95']['low']:+.3f} .. {sure['map50_95']['high']:+.3f}" if sure else "-"
        table.add_row(r["decoding"], f"{r['map50_95']:.3f}", f"{r['map50']:.3f}", f"{r['map75']:.3f}",
                      str(r["predicted_boxes"]), str(r["dropped_parts"]), f"{r['seconds_per_image']:.2f}", spread)
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
