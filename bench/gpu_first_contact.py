"""First contact with a GPU: the base-shaped stand-in trained and asked, against a seed-style loop.

    python -m bench.gpu_first_contact                # on a CUDA GPU: 50 steps, batch 8, bf16, 768 px
    python -m bench.gpu_first_contact --small        # CPU rehearsal: shrunk stand-in, 3 steps

The stand-in (`loomlens.model.standin`: the real tokenizer, configs and generation settings,
random weights) is saved and loaded back through `loomlens.model.load_model`, so the
from_pretrained path is the one a real checkpoint takes. Then, in one process:

- `loomlens`: `seed` LoRA preset, pixels processed once and kept (as the dataset's cache
  does), batches of `--batch`, bf16 autocast on CUDA, loomlens's loss, AdamW; `--steps` timed
  after two warm-up steps. Then `detect` on `--frames` frames (greedy, batched).
- `seed`: the seed's way, on a fresh copy: batch 1, fp32, the processor on the JPEG every
  step, the transformers loss; then per-frame `generate` with the checkpoint's own settings
  (beam search 3), fp32.

Reported: samples/s and images/s, peak memory per phase (CUDA `max_memory_allocated`; on a
CPU the process's peak RSS so far), and loomlens / seed ratios. Writes the JSON result and,
beside it, the markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, Table, fmt, parse_gpu_flags, peak_memory_mb, publish, ratio

ANSWER = "broken-weft<loc_100><loc_200><loc_300><loc_400>drop<loc_500><loc_510><loc_640><loc_700>"
FRAME_SIZE = (768, 432)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def frames(folder: Path, count: int) -> list[Path]:
    """`count` noise frames saved as JPEGs (what a camera writes), paths returned."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (np.random.default_rng(i).random((FRAME_SIZE[1], FRAME_SIZE[0], 3)) * 255).astype("uint8")
        paths.append(folder / f"frame{i:03d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def lora(folder: Path, device: str):
    """The stand-in from `folder` with a fresh `seed`-preset adapter, on `device`, training."""
    from loomlens.config import LoraSettings
    from loomlens.model import load_model
    from loomlens.model.lora import apply_lora

    model, processor = load_model(str(folder), device=device)
    torch.manual_seed(0)
    return apply_lora(model, LoraSettings(targets="seed", r=8)).train(), processor


def loomlens_training(folder: Path, paths: list[Path], steps: int, batch: int, device: str, bf16: bool) -> dict:
    """Batched steps on cached pixels, loomlens's loss; samples/s over `steps` after two warm-ups."""
    from loomlens.train.loss import LossSpec, batch_loss

    model, processor = lora(folder, device)
    tok = processor.tokenizer
    pixels = torch.cat([processor.image_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")
                        .pixel_values for p in paths[:batch]]).to(device)
    prompt = processor(text=["<OD>"] * batch, images=[Image.open(p).convert("RGB") for p in paths[:batch]],
                       return_tensors="pt")
    labels = tok([ANSWER] * batch, return_tensors="pt").input_ids.to(device)
    inputs = {"input_ids": prompt["input_ids"].to(device), "attention_mask": prompt["attention_mask"].to(device),
              "pixel_values": pixels, "labels": labels}
    spec = LossSpec(decoder_start_token_id=2, pad_token_id=tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    _reset_peak()
    start = 0.0
    for step in range(steps + 2):
        if step == 2:
            _sync()
            start = time.perf_counter()
        with cast:
            loss_sum, tokens = batch_loss(model, inputs, spec)
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - start
    result = {"samples_per_s": steps * batch / seconds, "peak_mb": peak_memory_mb(), "loss": (loss_sum / tokens).item()}
    model.eval()
    _reset_peak()
    from loomlens.infer import detect

    images = [Image.open(p).convert("RGB") for p in paths]
    with cast:
        detect(model, processor, images[:batch], max_boxes=2, batch_size=batch)  # warm-up
        _sync()
        start = time.perf_counter()
        found = detect(model, processor, images, max_boxes=2, batch_size=batch)
        _sync()
    result.update(images_per_s=len(images) / (time.perf_counter() - start), predict_peak_mb=peak_memory_mb(),
                  boxes=sum(len(b) for b in found))
    return result


def seed_training(folder: Path, paths: list[Path], samples: int, predict: int, device: str) -> dict:
    """The seed's loop: batch 1, fp32, the processor on the JPEG every step, the model's own
    loss; then `generate` one frame at a time with the checkpoint's settings."""
    model, processor = lora(folder, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    _reset_peak()
    seconds = 0.0
    for i in range(samples + 1):
        _sync()
        start = time.perf_counter()
        inputs = processor(text=["<OD>"], images=[Image.open(paths[i % len(paths)]).convert("RGB")],
                           return_tensors="pt").to(device)
        labels = processor.tokenizer([ANSWER], return_tensors="pt").input_ids.to(device)
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        seconds += (time.perf_counter() - start) if i else 0.0  # the first is a warm-up
    result = {"samples_per_s": samples / seconds, "peak_mb": peak_memory_mb()}
    model.eval()
    _reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths[:predict]:
            inputs = processor(text=["<OD>"], images=[Image.open(path).convert("RGB")], return_tensors="pt").to(device)
            model.generate(**inputs, max_new_tokens=2 + 2 * 9)
    _sync()
    result.update(images_per_s=predict / (time.perf_counter() - start), predict_peak_mb=peak_memory_mb())
    return result


def tables(result: dict) -> list[Table]:
    """loomlens against the seed's way: training samples/s, prediction images/s, peak memory."""
    ours, seed = result["loomlens"], result["seed"]
    s = result["settings"]
    rows = [
        ["training samples/s", fmt(ours["samples_per_s"], 2), fmt(seed["samples_per_s"], 2),
         ratio(ours["samples_per_s"], seed["samples_per_s"])],
        ["training peak memory (MiB)", fmt(ours["peak_mb"], 0), fmt(seed["peak_mb"], 0), ratio(ours["peak_mb"], seed["peak_mb"])],
        ["prediction images/s", fmt(ours["images_per_s"], 2), fmt(seed["images_per_s"], 2),
         ratio(ours["images_per_s"], seed["images_per_s"])],
        ["prediction peak memory (MiB)", fmt(ours["predict_peak_mb"], 0), fmt(seed["predict_peak_mb"], 0),
         ratio(ours["predict_peak_mb"], seed["predict_peak_mb"])],
    ]
    notes = [f"{s['shape']} stand-in (random weights) at {s['image_size']} px, seed preset r=8, {s['device']}; loomlens: "
             f"batch {s['batch']}, {'bf16 autocast' if s['bf16'] else 'fp32'}, {s['steps']} steps, greedy detect on "
             f"{s['frames']} frames; seed: batch 1, fp32, processor every step, {s['seed_samples']} samples, "
             f"beam-3 generate on {s['seed_frames']} frames.",
             "Peak memory: CUDA max allocated per phase; on a CPU the process's peak RSS so far (not per phase)."]
    return [Table("First contact: loomlens vs the seed's loop", ["", "loomlens", "seed", "ratio"], rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed loomlens steps (default 50; 3 with --small)")
    parser.add_argument("--batch", type=int, default=None, help="loomlens batch (default 8; 2 with --small)")
    parser.add_argument("--frames", type=int, default=None, help="frames to predict (default 64; 4 with --small)")
    parser.add_argument("--shared", type=Path, default=None, help="the real Florence-2 files (default ../shared/florence2)")
    args, cuda = parse_gpu_flags(parser, "gpu_first_contact", argv, rehearsal="shrunk stand-in, a few steps")
    from loomlens.model.standin import save_standin, shared_folder

    steps, batch, count = args.steps or (3 if args.small else 50), args.batch or (2 if args.small else 8), \
        args.frames or (4 if args.small else 64)
    device, bf16 = ("cuda", True) if cuda else ("cpu", False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_standin(args.shared or shared_folder(ROOT), Path(tmp) / "standin", shape="shrunk" if args.small else "base")
        paths = frames(Path(tmp) / "frames", max(count, batch))
        ours = loomlens_training(folder, paths, steps, batch, device, bf16)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        seed_samples, seed_frames = min(steps * batch, 2 if args.small else 50), min(count, 2 if args.small else 16)
        seed = seed_training(folder, paths, seed_samples, seed_frames, device)
        from loomlens.model import load_model

        size = load_model(str(folder))[1].image_processor.size.height
    result = {"loomlens": ours, "seed": seed, "settings": {
        "shape": "shrunk" if args.small else "base", "image_size": size, "device": device, "bf16": bf16,
        "steps": steps, "batch": batch, "frames": count, "seed_samples": seed_samples, "seed_frames": seed_frames}}
    return publish("gpu_first_contact", result, args.out, argv, tables, markdown_beside=True)


if __name__ == "__main__":
    raise SystemExit(main())
