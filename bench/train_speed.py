"""Training speed: loomlens's loop against the seed's way of training, same model, data, LoRA
settings and samples, in one run.

    python -m bench.train_speed                                   # small: ~2 min on 2 cores
    python -m bench.train_speed --images 240 --epochs 2 --threads 2
    python -m bench.train_speed --also lora.freeze=vision         # also a loomlens variant

Synthetic loom frames are made and converted as the demo does it (`loomlens synth` +
`convert`, flipped copies) into a temp folder. Then, each in a fresh process (so peak memory
is its own):

- `seed`: the seed's loop, written here: batch 1, fp32, the processor called on every step
  (JPEG decode, resize, tokenise), labels given to the model as the tokenizer returns them
  (no -100: pad tokens would count in the loss), no attention mask, AdamW with linear decay
  and no clipping, the transformers loss. It sees exactly the samples loomlens sees, in the
  same order, one at a time.
- `loomlens`: `loomlens.train.recipe.train` with the demo recipe (`configs/demo.yaml`),
  `max_steps` set for the same number of samples; its own `train_seconds` is the loop time.
- `profile`: where the time of loomlens's step goes (data, forward, backward, optimizer,
  `time.perf_counter` around each phase on a few steps: first with the pixel cache cold,
  then warm), pure model compute (forward+backward on one pre-made batch repeated), and what
  the compute costs with one thing changed each: batch 1 in fp32, the recipe in fp32 and
  with the frozen base stored in bf16 (`precision=bf16-base`), peft's LoRA form instead of
  folding, SDPA attention, a frozen vision tower.

Both trained adapters are scored with the same token-mean validation loss
(`bench.common.val_loss`), each on a fresh fp32 copy of the base (`fp32_twin`), whatever
precision it trained in. Samples/s and peak memory (RSS on CPU, `max_memory_allocated` on
CUDA) are reported with their ratios; timed figures never go in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    publish,
    Stopwatch, Table, autocast, common_flags, device, fmt, fp32_twin, lora_model, loom_data, model_batch,
    peak_memory_mb, ratio, recipe_config, recipe_model, rss_mb, set_threads, training_step, val_loss,
)

NAME = "train_speed"


# --- the sample sequence both loops see ----------------------------------------------------

def sample_sequence(cfg, train_set, steps: int) -> list[list[int]]:
    """The first `steps` batches loomlens trains on (its seeded batch plan, epoch after
    epoch); the seed loop takes the same samples one at a time."""
    from loomlens.data.dataset import plan_batches

    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        batches += plan_batches(train_set.tasks, train_set.lengths, cfg.batch_size, cfg.order, cfg.shuffle,
                                cfg.seed, epoch, cfg.group_by_length)
        epoch += 1
    return batches[:steps]


# --- the seed's loop -----------------------------------------------------------------------

def seed_step(model, processor, row: dict, root: Path) -> torch.Tensor:
    """One step of the seed's loop, forward only: the processor on this sample's image and
    prompt, labels straight from the tokenizer (no -100), no attention mask, the model's own
    loss. Returns the loss."""
    from PIL import Image

    with Image.open(root / row["image"]) as im:
        image = im.convert("RGB")
    inputs = processor(text=[row["prefix"]], images=[image], return_tensors="pt", padding=True)
    labels = processor.tokenizer(text=[row["suffix"]], return_tensors="pt", padding=True,
                                 return_token_type_ids=False).input_ids
    dev = next(model.parameters()).device
    return model(input_ids=inputs["input_ids"].to(dev), pixel_values=inputs["pixel_values"].to(dev),
                 labels=labels.to(dev)).loss


def run_seed(cfg, samples: list[int], lr: float) -> tuple[Any, Any, float]:
    """Train with the seed's loop on `samples` (indices into train.jsonl); returns the model,
    processor and loop seconds."""
    from loomlens.data.dataset import read_jsonl
    from loomlens.train.schedule import lr_factor

    model, processor = lora_model(cfg)
    rows = [r for r in read_jsonl(cfg.data / "train.jsonl") if not cfg.tasks or r.get("task") in cfg.tasks]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, 0, len(samples), "linear"))
    model.train()
    start = time.perf_counter()
    for i in samples:
        seed_step(model, processor, rows[i], cfg.data).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return model, processor, time.perf_counter() - start


# --- loomlens's loop -----------------------------------------------------------------------

def run_loomlens(cfg) -> tuple[Any, Any, float, dict]:
    """`train(cfg)` itself; returns the trained model, processor, loop seconds (the recipe's
    own `train_seconds`, evaluation excluded) and the recipe's final evaluation."""
    from loomlens.train.recipe import train

    result = train(cfg, log=lambda *_: None)
    return result.model, result.processor, result.state.train_seconds, result.last_eval


# --- where loomlens's step spends its time ---------------------------------------------------

def phase_times(cfg, batches: list[list[int]]) -> dict[str, Any]:
    """Seconds per phase of loomlens's step over `batches`, run twice: pixel cache cold
    (the first epoch) and warm (every later epoch)."""
    from loomlens.data.dataset import Collator, FlorenceDataset

    model, processor = recipe_model(cfg)
    text = model.config.text_config
    train_set = FlorenceDataset(cfg.data / "train.jsonl", processor, cfg.tasks, text.max_position_embeddings)
    collate = Collator(processor.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    out = {}
    for cache in ("cold", "warm"):
        clock = Stopwatch()
        for idx in batches:
            with clock("data"):
                batch = model_batch(collate([train_set[i] for i in idx]), model)
            training_step(model, params, optimizer, batch, cfg, clock)
        samples = sum(len(idx) for idx in batches)
        out[cache] = {phase: seconds / samples for phase, seconds in clock.seconds.items()}
    return out


def fwd_bwd_seconds(model, batch: dict, cfg, precision: str | None = None) -> float:
    """Seconds of one forward+backward of `model` on the pre-made `batch` (no optimizer), under
    the recipe's autocast or `precision`'s."""
    from loomlens.train.loss import LossSpec, batch_loss

    text = model.config.text_config
    model.train()
    start = time.perf_counter()
    with autocast(cfg, precision):
        part, tokens = batch_loss(model, batch, LossSpec(text.decoder_start_token_id, text.pad_token_id))
    (part / tokens).backward()
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compute_levers(cfg, first: list[int], repeats: int) -> list[dict[str, Any]]:
    """Pure compute per sample (forward+backward on one pre-made batch, best of `repeats`
    after a warm-up round, the variants timed round-robin so a slow spell hits them alike)
    for loomlens's batch as the recipe runs it and, one change each: batch 1 in fp32 (the
    seed's shape and precision), the recipe in fp32 and in the other bf16 way (autocast, or the
    base stored in bf16), peft's LoRA form (no folding), SDPA attention, the vision tower's
    adapters frozen (no backward through it)."""
    from loomlens.data.dataset import Collator, FlorenceDataset
    from loomlens.train.recipe import training_precision

    model, processor = recipe_model(cfg)
    fp32 = recipe_model(cfg, precision="fp32")[0]
    runs = training_precision(cfg.speed.precision, cfg.device)
    data = FlorenceDataset(cfg.data / "train.jsonl", processor, cfg.tasks, model.config.text_config.max_position_embeddings)
    batch = Collator(processor.tokenizer.pad_token_id)([data[i] for i in first])
    single = {k: v[:1] for k, v in batch.items()}
    n = len(first)
    levers = [(f"recipe batch {n} ({runs})", model, batch, None), ("batch 1, fp32", fp32, single, "fp32"),
              (f"batch {n}, fp32", fp32, batch, "fp32")]
    for other in [p for p in ("bf16", "bf16-base") if p != runs]:  # autocast, or the base stored in bf16
        levers.append((f"batch {n}, {other}", recipe_model(cfg, precision=other)[0], batch, other))
    variants = {"peft's LoRA form (fold_lora=false)": {"fold_lora": False},
                "SDPA attention (attention=sdpa)": {"attention": "sdpa"},
                "vision adapters frozen": {"lora": cfg.lora.model_copy(update={"freeze": "vision"})}}
    levers += [(f"batch {n} ({runs}), {name}", recipe_model(cfg, **change)[0], batch, None)
               for name, change in variants.items()]
    levers = [(name, net, model_batch(b, net), precision) for name, net, b, precision in levers]
    best = [float("inf")] * len(levers)
    for round_ in range(repeats + 1):  # round 0 warms every variant up
        for k, (_, net, b, precision) in enumerate(levers):
            seconds = fwd_bwd_seconds(net, b, cfg, precision) / len(b["labels"])
            best[k] = min(best[k], seconds) if round_ else best[k]
    return [{"compute": name, "s_per_sample": s} for (name, *_), s in zip(levers, best)]


# --- workers (one process each) --------------------------------------------------------------

def worker(kind: str, args) -> dict[str, Any]:
    """Run one part in this process and return its figures."""
    set_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.variant) if args.variant else {}
    probe = recipe_config(args.data, args.tmp / "probe", **overrides)
    steps = max(1, args.samples // probe.batch_size)
    cfg = recipe_config(args.data, args.tmp / args.json.stem, max_steps=steps, eval_every=steps, time_budget=None,
                        eval_max_images=0, val_loss_max_samples=args.val_samples, **overrides)
    from loomlens.data.dataset import Collator, FlorenceDataset
    from loomlens.model import load_model

    base, processor = load_model(cfg.model)
    train_set = FlorenceDataset(cfg.data / "train.jsonl", processor, cfg.tasks,
                                base.config.text_config.max_position_embeddings)
    del base
    batches = sample_sequence(cfg, train_set, steps)
    samples = [i for idx in batches for i in idx]
    val = cfg.data / "val.jsonl"
    if kind == "profile":
        model, processor = lora_model(cfg)  # untrained: the same either way
        return {"untrained_val_loss": val_loss(model, processor, val, args.val_samples),
                "phases": phase_times(cfg, batches[: args.profile_steps]),
                "compute": compute_levers(cfg, batches[0], args.profile_steps)}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = rss_mb()
    if kind == "seed":
        model, processor, seconds = run_seed(cfg, samples, args.seed_lr or cfg.lr)
        extra = {"lr": args.seed_lr or cfg.lr, "batch_size": 1, "steps": len(samples)}
    else:
        model, processor, seconds, last_eval = run_loomlens(cfg)
        extra = {"lr": cfg.lr, "batch_size": cfg.batch_size, "steps": steps, "recipe_val_loss": last_eval.get("val_loss"),
                 "overrides": overrides}
    peak = peak_memory_mb()
    # The pure compute of this loop's own batch shape, in the same process right after it:
    # how much of the loop is model compute, without comparing across processes and moments.
    shape = batches[0][: extra["batch_size"]]
    batch = model_batch(Collator(processor.tokenizer.pad_token_id)([train_set[i] for i in shape]), model)
    precision = "fp32" if kind == "seed" else None  # the seed trains in fp32; loomlens as its recipe says
    compute = min(fwd_bwd_seconds(model, batch, cfg, precision) for _ in range(args.profile_steps + 1)) / len(shape)
    return {"samples": len(samples), "seconds": seconds, "samples_per_s": len(samples) / seconds,
            "peak_memory_mb": peak, "rss_before_loop_mb": before, "compute_s_per_sample": compute,
            "compute_share": compute * len(samples) / seconds,
            "val_loss": val_loss(fp32_twin(model, cfg), processor, val, args.val_samples), **extra}


def spawn(kind: str, args, data: Path, tmp: Path, variant: list[str] = ()) -> dict[str, Any]:
    """Run `worker(kind)` in a fresh Python process and return its JSON."""
    out = tmp / f"{kind}-{len(list(tmp.glob('*.json')))}.json"
    cmd = [sys.executable, "-m", "bench.train_speed", "--worker", kind, "--data", str(data), "--tmp", str(tmp),
           "--json", str(out), "--samples", str(args.samples), "--profile-steps", str(args.profile_steps),
           "--val-samples", str(args.val_samples)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--seed-lr", str(args.seed_lr)] if args.seed_lr else []
    for kv in variant:
        cmd += ["--variant", kv]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


# --- result -----------------------------------------------------------------------------------

def tables(result: dict[str, Any]) -> list[Table]:
    """The loops, the phases of loomlens's step and the compute, as tables."""
    seed, loops, profile = result["seed"], result["loomlens"], result["profile"]
    def share(run: dict) -> str:
        if "compute_share" not in run:
            return "-"
        # above 100 %: the loop skips part of the full model's work (cached image features)
        return f"{100 * run['compute_share']:.0f}%" if run["compute_share"] <= 1 else "skips work"

    rows = [["seed's loop (batch 1, processor every step, pad in loss, no mask)", f"{seed['samples_per_s']:.2f}",
             "1.00x", share(seed), f"{seed['peak_memory_mb']:.0f}", fmt(seed["val_loss"])]]
    for run in loops:
        name = "loomlens recipe" + (f" ({', '.join(f'{k}={v}' for k, v in run['overrides'].items())})"
                                    if run["overrides"] else "")
        name += f" (batch {run['batch_size']})"
        speedup = result["speedup"] if run is loops[0] else run["samples_per_s"] / seed["samples_per_s"]
        rows.append([name, f"{run['samples_per_s']:.2f}", f"{speedup:.2f}x", share(run),
                     f"{run['peak_memory_mb']:.0f}", fmt(run["val_loss"])])
    m = result["machine"]
    speed = Table(
        f"Training: {seed['samples']} samples each, {result['train_samples']} train / {result['val_samples']} val "
        f"samples ({result['images']} frames {result['size']}), model {result['model']}",
        ["loop", "samples/s", "vs seed", "pure compute", "peak MB", "val loss"], rows,
        [f"val loss: cross-entropy per label token on {result['val_scored']} val samples (untrained: "
         f"{fmt(profile['untrained_val_loss'])}), of the weights each loop ends with: the seed's last step's, "
         "loomlens's moving average of its steps (`ema_decay`; `--also ema_decay=0` adds a run of its last step's); peak MB: "
         + ("CUDA max allocated" if m["gpu"] else "peak RSS of the loop's own process") + ".",
         f"optimizer steps: seed {seed['steps']} (batch 1, lr {seed['lr']:g}, linear decay), loomlens "
         f"{loops[0]['steps']} (batch {loops[0]['batch_size']}, lr {loops[0]['lr']:g}, the recipe's warmup + cosine); "
         f"samples/s: median of {result['repeats']} alternating run(s).",
         "pure compute: the share of the loop's time that forward+backward of its own batch shape takes, "
         "timed in the loop's process right after it (the rest is data, optimizer and overhead); "
         "cache_image_features runs the vision side once per image, so later epochs skip it."],
    )
    phases = profile["phases"]
    cold, warm = phases["cold"], phases["warm"]
    total = {k: sum(v.values()) for k, v in phases.items()}
    phase_rows = [[p, f"{1000 * cold[p]:.1f}", f"{100 * cold[p] / total['cold']:.0f}%",
                   f"{1000 * warm[p]:.1f}", f"{100 * warm[p] / total['warm']:.0f}%"]
                  for p in ("data", "forward", "backward", "optimizer")]
    phase_rows.append(["total", f"{1000 * total['cold']:.1f}", "100%", f"{1000 * total['warm']:.1f}", "100%"])
    where = Table(f"Where loomlens's step goes (ms per sample, {result['profile_steps']} steps)",
                  ["phase", "first epoch", "share", "cached pixels", "share"], phase_rows,
                  ["first epoch: each image decoded and processed on first use; later epochs read the cache."])
    compute = profile["compute"]
    compute_rows = [[c["compute"], f"{1000 * c['s_per_sample']:.1f}", f"{1 / c['s_per_sample']:.2f}",
                     ratio(1 / c["s_per_sample"], seed["samples_per_s"])] for c in compute]
    levers = Table("Pure model compute (forward+backward on one pre-made batch, repeated)",
                   ["compute", "ms/sample", "samples/s", "vs seed's loop"], compute_rows,
                   ["Timed round-robin in one process, so the rows compare with each other; the last column "
                    "compares with the seed's loop, timed in another process.",
                    "The recipe's precision is `auto`: bf16 autocast on a CPU with bf16 instructions (this one "
                    "has them when the first row says bf16) and on CUDA, fp32 on other CPUs; bf16-base: the frozen "
                    "base stored in bf16, the adapter in fp32, no autocast."])
    return [speed, where, levers]


def run(args) -> dict[str, Any]:
    """Make the data, run the workers, gather the result."""
    from loomlens.data.dataset import read_jsonl

    with tempfile.TemporaryDirectory(prefix="loomlens-train-speed-") as tmp_name:
        tmp = Path(tmp_name)
        data = loom_data(tmp / "loom", args.images, args.size, args.data_seed)
        train_rows, val_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "val.jsonl")
        seeds, loops = [], []
        for r in range(args.repeats):  # alternate the order: a slow spell hits both loops alike
            for kind in ("seed", "loomlens") if r % 2 == 0 else ("loomlens", "seed"):
                (seeds if kind == "seed" else loops).append(spawn(kind, args, data, tmp))
        variants = [spawn("loomlens", args, data, tmp, v.split(",")) for v in args.also]
        profile = spawn("profile", args, data, tmp)
    seed, loop = summarise(seeds), summarise(loops)
    return {"model": "tiny", "images": args.images, "size": "x".join(map(str, args.size)),
            "train_samples": len(train_rows), "val_samples": len(val_rows),
            "val_scored": min(len(val_rows), args.val_samples or len(val_rows)),
            "profile_steps": args.profile_steps, "repeats": args.repeats, "device": device(),
            "seed": seed, "loomlens": [loop, *variants], "profile": profile,
            "speedup": statistics.median(b["samples_per_s"] / a["samples_per_s"] for a, b in zip(seeds, loops)),
            "val_loss_delta": loop["val_loss"] - seed["val_loss"]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's figures with the median samples/s over the repeats (and all of them)."""
    speeds = [r["samples_per_s"] for r in runs]
    return {**runs[0], "samples_per_s": statistics.median(speeds), "samples_per_s_each": speeds}


def main(argv: list[str] | None = None) -> int:
    from bench.common import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="synthetic frames (flipped copies on top)")
    parser.add_argument("--size", type=parse_size, default=(512, 288), help="frame size WxH (demo: 512x288)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=128, help="training samples each loop sees")
    parser.add_argument("--val-samples", type=int, default=64, help="val samples the val loss is computed on")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps timed per phase / compute repeats")
    parser.add_argument("--repeats", type=int, default=1, help="seed/loomlens pairs (order alternates)")
    parser.add_argument("--seed-lr", type=float, default=None, help="the seed loop's lr (default: the recipe's)")
    parser.add_argument("--also", action="append", default=[], metavar="K=V[,K=V]",
                        help="another loomlens run with these recipe overrides (repeatable)")
    common_flags(parser, NAME)
    # internal: one part in a child process
    parser.add_argument("--worker", choices=["seed", "loomlens", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.json.write_text(json.dumps(worker(args.worker, args)))
        return 0
    set_threads(args.threads)
    result = run(args)
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
