"""How training step time and inference time grow with the number of images, the boxes per
image and the input (frame) size, on the tiny model with the demo's LoRA.

    python -m bench.scaling                                            # small: ~2 min on 2 cores
    python -m bench.scaling --images 16 64 256 --boxes 0 4 16 32 --sizes 512x288 2560x1440

Three sweeps, one variable each, the others at their defaults (--base-images frames of
--base-size with --base-boxes boxes):

- images: one epoch of loomlens's step over N frames (pixel cache cold: each image decoded
  and processed once) and `<OD>` inference over the same N frames;
- boxes per image: the label (training) and the answer (inference) hold B boxes; training
  uses the warm cache, so only the label length changes;
- frame size: the processor squeezes every frame to the model's input, so only decoding and
  resizing grow: training with the cache cold and warm, inference with decoding included.

Inference answers are forced to the length of B boxes (`min_new_tokens = max_new_tokens =
box_token_budget(B)`), so the figures do not depend on what the weights happen to write.
Writes the table, the JSON and a PNG plot (--plot, default docs/images/scaling.png).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Table, common_flags, command_line, describe, demo_settings, forced_answer_seconds, model_batch, parse_size,
    recipe_config, recipe_model, set_threads, show, training_step, write_result,
)

NAME = "scaling"


def frames(folder: Path, images: int, size: tuple[int, int], boxes: int, seed: int = 0) -> Path:
    """`images` synthetic frames with a JSONL whose `<OD>` labels hold `boxes` boxes each
    (random boxes of the loom classes: only their token count matters); returns the JSONL."""
    from loomlens.data.florence_text import boxes_to_text
    from loomlens.data.records import Box
    from loomlens.data.synth import CLASSES, synthesize

    records = synthesize(folder, images=images, seed=seed, size=size)
    rng = random.Random(seed)
    width, height = size
    lines = []
    for r in records:
        fake = []
        for _ in range(boxes):
            x, y = rng.uniform(0, width * 0.9), rng.uniform(0, height * 0.9)
            fake.append(Box(rng.choice(CLASSES), x, y, x + width * 0.05, y + height * 0.05))
        lines.append({"prefix": "<OD>", "suffix": boxes_to_text(fake, width, height), "image": r.image,
                      "width": width, "height": height, "task": "od"})
    jsonl = folder / f"boxes{boxes}.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jsonl


class Trainer:
    """The demo recipe's model (as the recipe trains it), adapter and optimizer, kept across
    measurements (warmed up once)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.model, self.processor = recipe_model(cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr)
        self.model.train()

    def dataset(self, jsonl: Path):
        from loomlens.data.dataset import FlorenceDataset

        return FlorenceDataset(jsonl, self.processor, (), self.model.config.text_config.max_position_embeddings)

    def epoch(self, data) -> float:
        """Seconds per sample of one pass over `data` (batches made in the loop, as the recipe)."""
        from loomlens.data.dataset import Collator

        collate = Collator(self.processor.tokenizer.pad_token_id)
        size = self.cfg.batch_size
        start = time.perf_counter()
        for i in range(0, len(data), size):
            batch = collate([data[j] for j in range(i, min(i + size, len(data)))])
            training_step(self.model, self.params, self.optimizer, model_batch(batch, self.model), self.cfg)
        return (time.perf_counter() - start) / len(data)


def measure(trainer: Trainer, folder: Path, images: int, size: tuple[int, int], boxes: int,
            batch_size: int) -> dict[str, Any]:
    """Training s/sample (cache cold, then warm) and inference s/image for one setting."""
    jsonl = frames(folder, images, size, boxes)
    data = trainer.dataset(jsonl)
    cold = trainer.epoch(data)
    warm = trainer.epoch(data)
    paths = [folder / json.loads(line)["image"] for line in jsonl.read_text().splitlines()]
    return {"images": images, "size": "x".join(map(str, size)), "boxes": boxes,
            "label_tokens": sum(data.lengths) / len(data) - len(data.examples[0].input_ids),
            "train_cold_s": cold, "train_warm_s": warm,
            "infer_s": forced_answer_seconds(trainer.model, trainer.processor, paths, boxes, batch_size)}


def plot(result: dict[str, Any], path: Path) -> None:
    """Three panels (images, boxes, frame size): ms per sample/image for training and inference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, (("images", "images in the set"), ("boxes", "boxes per image"),
                                       ("size", "frame size"))):
        rows = result["sweeps"][key]
        xs = list(range(len(rows)))
        ax.plot(xs, [1000 * r["train_cold_s"] for r in rows], "o-", label="train, first epoch")
        ax.plot(xs, [1000 * r["train_warm_s"] for r in rows], "s-", label="train, cached pixels")
        ax.plot(xs, [1000 * r["infer_s"] for r in rows], "^-", label="<OD> inference")
        ax.set_xticks(xs, [str(r[key]) for r in rows])
        ax.set_xlabel(label)
        ax.set_ylabel("ms per sample / image")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"loomlens scaling, tiny model + LoRA ({m['date']}, {m['cores']} cores, "
                 f"{m['torch_threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(result: dict[str, Any]) -> list[Table]:
    rows = []
    for key, label in (("images", "images"), ("boxes", "boxes/image"), ("size", "frame size")):
        for r in result["sweeps"][key]:
            rows.append([f"{label} = {r[key]}", f"{r['label_tokens']:.0f}", f"{1000 * r['train_cold_s']:.0f}",
                         f"{1000 * r['train_warm_s']:.0f}", f"{1000 * r['infer_s']:.0f}"])
    b = result["base"]
    return [Table(
        f"Scaling (ms per sample / image); defaults {b['images']} images {b['size']} with {b['boxes']} boxes",
        ["setting", "label tokens", "train, first epoch", "train, cached", "`<OD>` inference"], rows,
        [f"Training: loomlens's step (demo recipe, batch {result['batch_size']}); inference: batch "
         f"{result['batch_size']}, greedy, answers forced to the boxes' length. Plot: {result['plot']}."],
    )]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[8, 16, 32], help="images sweep")
    parser.add_argument("--boxes", type=int, nargs="+", default=[0, 2, 8, 16], help="boxes-per-image sweep")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(512, 288), (1280, 720), (2560, 1440)],
                        help="frame-size sweep, WxH")
    parser.add_argument("--base-images", type=int, default=8)
    parser.add_argument("--base-size", type=parse_size, default=(512, 288))
    parser.add_argument("--base-boxes", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=Path("docs/images/scaling.png"))
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="loomlens-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        trainer = Trainer(recipe_config(tmp, tmp / "run"))
        batch = trainer.cfg.batch_size
        trainer.epoch(trainer.dataset(frames(tmp / "warmup", batch, args.base_size, args.base_boxes, seed=99)))

        def at(images=args.base_images, size=args.base_size, boxes=args.base_boxes) -> dict[str, Any]:
            folder = tmp / f"i{images}-{size[0]}x{size[1]}-b{boxes}"
            return measure(trainer, folder, images, size, boxes, batch)

        sweeps = {"images": [at(images=n) for n in args.images], "boxes": [at(boxes=b) for b in args.boxes],
                  "size": [at(size=s) for s in args.sizes]}
    result = {"model": demo_settings().train.get("model", "tiny"), "batch_size": batch, "plot": str(args.plot),
              "base": {"images": args.base_images, "size": "x".join(map(str, args.base_size)),
                       "boxes": args.base_boxes}, "sweeps": sweeps}
    path = write_result(NAME, result, args.out, command_line("bench.scaling", argv))
    result = json.loads(path.read_text())
    plot(result, args.plot)
    print(describe(result["machine"]))
    show(tables(result))
    print(f"wrote {path} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
