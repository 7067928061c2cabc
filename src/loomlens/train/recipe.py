"""The fine-tuning recipe: LoRA/DoRA on Florence-2, one loop, top to bottom.

    load base -> attach LoRA -> datasets -> optimizer + schedule -> accelerate
    -> (resume) -> for each optimizer step: accumulate micro-batches, clip, step
       -> log -> evaluate (val loss + mAP50) -> save last/ (and best/) -> stop?

Everything distributed goes through Hugging Face accelerate: the same code runs on one CPU,
one GPU, or `accelerate launch` across GPUs and nodes. Each process takes every N-th batch
of one shared, seeded batch plan; only the main process writes files.

Exact resume: the batch plan is a pure function of (seed, epoch), the checkpoint stores the
position in it, the optimizer and every process's RNG states, and evaluation
restores the RNG states it found, so when and how often a run evaluates never changes its
weights.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from loomlens.config import TrainConfig, dump_config
from loomlens.data.dataset import Collator, FlorenceDataset, plan_batches
from loomlens.evaluate.runs import DATA_SUMMARY
from loomlens.model.folded_lora import fold_lora
from loomlens.model.lora import apply_lora, load_quantized_base, lower_frozen, trainable_by_tower
from loomlens.model.runtime import cpu_has_bf16, keep_freed_memory
from loomlens.model.vision import split_image_path, stage_count, stage_of
from loomlens.train.checkpoint import (
    TrainerState,
    copy_checkpoint,
    has_checkpoint,
    load_checkpoint,
    recover,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from loomlens.train.curves import MetricsLog, plot_run
from loomlens.train.loss import LossSpec, batch_loss, with_image_embeds
from loomlens.train.schedule import lr_factor, position, warmup_steps


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good state was saved first."""


@dataclass
class TrainResult:
    """What `train` leaves behind: the run folder, the trained peft model, why it stopped."""

    run_dir: Path
    model: Any
    processor: Any
    state: TrainerState
    stopped: str
    last_eval: dict[str, float] = field(default_factory=dict)


def train(
    cfg: TrainConfig, resume: bool = False, stop_at_step: int | None = None, log: Callable[[str], None] = print
) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`, writing the run folder `cfg.out`.

    `resume` continues the run in `cfg.out` from `checkpoints/last/` exactly where it was
    saved. `stop_at_step` stops after that step once saved, as a kill right after a save
    would (the run can be resumed). Raises `TrainingDiverged` on a NaN/inf loss.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    run_dir = Path(cfg.out)
    last_dir, best_dir = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best"
    # accelerate keeps one mixed precision per process, fixed by the first Accelerator; a sweep
    # or a test trains several runs in one process, so forget it (the distributed state stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.precision))
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if main and resume:
        recover(last_dir)  # a kill between the renames of a save: put the previous one back
    accelerator.wait_for_everyone()
    _check_run_dir(run_dir, last_dir, resume)
    say = log if main else (lambda *_: None)

    # Model: the base, frozen, with a fresh adapter (its weights come from last/ on resume).
    set_seed(cfg.seed)
    model, processor = training_model(cfg)
    inputs_dtype = frozen_dtype(cfg.precision)  # pixels in the base's dtype when it is stored lower
    text_config = model.config.text_config
    towers = trainable_by_tower(model)

    # Data: tokenised once, pixels cached on first use.
    max_label = text_config.max_position_embeddings
    # Workers start afresh each epoch, so a pixel cache pays only when batches are made here.
    train_set = FlorenceDataset(cfg.data / "train.jsonl", processor, cfg.tasks, max_label, cfg.num_workers == 0)
    val_path = cfg.data / "val.jsonl"
    val_set = FlorenceDataset(val_path, processor, cfg.tasks, max_label) if _has_samples(val_path) else None
    collate = Collator(processor.tokenizer.pad_token_id)
    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_batches(train_set.tasks, train_set.lengths, cfg.batch_size, cfg.order, cfg.shuffle, cfg.seed,
                            epoch, cfg.group_by_length)

    plan = epoch_plan(0)
    windows_per_epoch = math.ceil(len(plan) // world / cfg.grad_accum)
    if windows_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples are too few for {world} processes")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * windows_per_epoch)

    # Optimizer over the trainable adapter weights only; the schedule steps per optimizer step.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = warmup_steps(cfg.warmup, total_steps)
    lr_factor(0, warmup, total_steps, cfg.schedule)  # a bad schedule name fails now, not at step 1
    spec = LossSpec(
        text_config.decoder_start_token_id, text_config.pad_token_id,
        processor.tokenizer.convert_tokens_to_ids("<loc_0>"), cfg.loc_sigma, cfg.pointer_weight,
        math.isqrt(train_set.examples[0].input_ids.count(model.config.image_token_id) - 1),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(model)
    base = peft_model.get_base_model()
    finish_image = None  # with a partly frozen vision side: cached stage output -> image features
    if cfg.cache_image_features:
        encode, finish_image, part = _image_cache(peft_model, cfg.lora.vision_frozen_stages)
        say(f"encoding {len({ex.image for ex in train_set.examples})} training images once ({part})")
        base.eval()
        train_set.encode_images(lambda pixels: encode(pixels.to(accelerator.device, inputs_dtype)), cfg.eval_batch_size)
    state = TrainerState()
    if resume:
        state = load_checkpoint(last_dir, model=peft_model, optimizer=optimizer, rank=rank,
                                scaler=accelerator.scaler)
        say(f"resumed from {last_dir} at step {state.step} (epoch {state.epoch})")
    if main:
        _write_run_files(cfg, run_dir, world)
    metrics = MetricsLog(run_dir, state.step if resume else None, cfg.tensorboard) if main else None
    say(
        f"training {cfg.model} + LoRA ({cfg.lora.targets}, r={cfg.lora.r}{', DoRA' if cfg.lora.dora else ''}) "
        f"on {len(train_set)} samples, {total_steps} steps x {cfg.batch_size * cfg.grad_accum * world} samples, "
        f"{world} process(es) on {accelerator.device}; trainable: vision {towers['vision']:,}, "
        f"language {towers['language']:,}"
    )
    if train_set.truncated:
        say(f"warning: {train_set.truncated} answers are longer than the decoder's {max_label} positions; cut")

    def checkpoint(improved: bool = False) -> None:
        rng = gather_object([rng_states()])  # collective: every process calls it
        if main:
            save_checkpoint(last_dir, model=peft_model, optimizer=optimizer, state=state, rng=rng,
                            scaler=accelerator.scaler)
            if improved:
                copy_checkpoint(last_dir, best_dir)

    bar = tqdm(total=total_steps, initial=state.step, disable=not (main and cfg.progress), desc="train")
    started, seconds_before = time.monotonic(), state.train_seconds
    stopped, last_eval = ("max_steps" if state.step >= total_steps else ""), {}
    model.train()
    while not stopped:
        batches = epoch_plan(state.epoch)
        mine = batches[: len(batches) // world * world][rank::world]
        windows = [mine[i : i + cfg.grad_accum] for i in range(0, len(mine), cfg.grad_accum)]
        todo = windows[state.window :]
        loader = iter(torch.utils.data.DataLoader(
            train_set, batch_sampler=[idx for window in todo for idx in window], collate_fn=collate,
            num_workers=cfg.num_workers, generator=torch.Generator(),  # its own: the global RNG is dropout's
        ))
        for window in todo:
            # One optimizer step: the loss is summed over the window's tokens on every process
            # and divided by their global count, so accumulation and DDP average per token.
            micro = [next(loader) for _ in window]
            tokens = accelerator.reduce(
                torch.tensor(sum(int((b["labels"] != -100).sum()) for b in micro), device=accelerator.device),
                "sum",
            )
            loss_sum = torch.zeros((), device=accelerator.device)
            for k, batch in enumerate(micro):
                batch = _on_device(batch, accelerator.device, inputs_dtype)
                if "image_features" in batch:
                    if finish_image is not None:
                        batch["image_features"] = finish_image(batch["image_features"])
                    batch = with_image_embeds(batch, base.get_input_embeddings(), base.config.image_token_id)
                sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
                with sync:
                    part, _ = batch_loss(model, batch, spec)
                    accelerator.backward(part * world / tokens)
                loss_sum += part.detach()
            loss = (accelerator.reduce(loss_sum, "sum") / tokens).item()
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                checkpoint()
                raise TrainingDiverged(
                    f"loss is {loss} at step {state.step + 1}; the weights before it are saved in {last_dir}. "
                    "Lower --lr, keep --max-grad-norm on, or use --precision fp32."
                )
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            where = position(state.step, state.train_seconds, total_steps, cfg.time_budget)
            lr = cfg.lr * lr_factor(where, warmup, total_steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.window += 1
            epoch_done = state.window == len(windows)
            if epoch_done:
                state.epoch, state.window = state.epoch + 1, 0
            state.train_seconds = seconds_before + time.monotonic() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=state.epoch)
            if metrics:
                metrics.log({
                    "step": state.step, "epoch": state.epoch + state.window / len(windows),
                    "seconds": state.train_seconds, "lr": lr, "train_loss": loss,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                })

            # Stop? A simulated kill (stop_at_step) only saves; any other stop evaluates first.
            if state.step >= total_steps:
                stopped = "max_steps"
            elif cfg.time_budget and state.train_seconds >= cfg.time_budget:
                stopped = "time_budget"
            elif stop_at_step is not None and state.step >= stop_at_step:
                stopped = "stop_at_step"
            due = (cfg.eval_every and state.step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_done)
            if val_set is not None and (due or stopped in ("max_steps", "time_budget")):
                last_eval = _evaluate(peft_model, processor, val_set, cfg, accelerator, spec.plain)
                by_map = cfg.best_metric == "map50" and "map50" in last_eval
                score = last_eval["map50"] if by_map else -last_eval["val_loss"]
                improved = state.best_metric is None or score > state.best_metric
                if improved:
                    state.best_metric, state.best_step, state.evals_since_best = score, state.step, 0
                else:
                    state.evals_since_best += 1
                if cfg.early_stopping and state.evals_since_best >= cfg.early_stopping and not stopped:
                    stopped = "early_stopping"
                checkpoint(improved)
                if metrics:
                    metrics.log({"step": state.step, "epoch": state.epoch + state.window / len(windows),
                                 "seconds": state.train_seconds, **last_eval})
                    plot_run(run_dir)
                say(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            elif stopped or (cfg.save_every and state.step % cfg.save_every == 0):
                checkpoint()
            if stopped:
                break

    bar.close()
    if metrics:
        metrics.close()
        plot_run(run_dir)
    accelerator.wait_for_everyone()
    say(f"stopped ({stopped}) at step {state.step}; run folder {run_dir}")
    return TrainResult(run_dir, peft_model, processor, state, stopped, last_eval)


def training_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The base model of `cfg` (4-bit with `qlora`) with a fresh adapter, set up to train fast:
    `cfg.attention`'s kernels, the frozen base in bf16 where `cfg.precision` resolves to
    bf16-base (`lower_frozen`), LoRA layers in their cheapest exact form (`fold_lora`), and on
    a CPU freed memory kept for reuse (`keep_freed_memory`). Returns the peft model and the
    processor."""
    if not torch.cuda.is_available():
        keep_freed_memory()
    if cfg.qlora:
        model, processor = load_quantized_base(cfg.model)
    else:
        from loomlens.model import load_model

        model, processor = load_model(cfg.model)
    model.set_attn_implementation(attention_implementation(cfg))
    model = apply_lora(model, cfg.lora)
    if (dtype := frozen_dtype(cfg.precision)) is not None:  # never with qlora: TrainConfig refuses it
        lower_frozen(model, dtype)
    if cfg.fold_lora:
        fold_lora(model)
    return model, processor


def attention_implementation(cfg: TrainConfig) -> str:
    """The attention kernels `cfg` trains with. Eager on a CPU: measured on the tiny model at
    batch 8, SDPA's bf16 backward on the 64-token DaViT windows made a third of the step
    (0.49 s a step against 0.33 s eager; the same in fp32); the pointer loss reads the
    cross-attention weights, which only eager returns."""
    if cfg.pointer_weight or (cfg.attention == "auto" and not torch.cuda.is_available()):
        return "eager"
    return "sdpa" if cfg.attention == "auto" else cfg.attention


def training_precision(precision: str) -> str:
    """The way a config `precision` trains on this machine: `fp32`, `bf16` or `fp16` (autocast
    over fp32 weights) or `bf16-base` (the frozen base stored in bf16, the adapter in fp32, no
    autocast: `lower_frozen`; 6 % faster than bf16 autocast on the demo, but a lower val mAP50,
    docs/training.md). `auto` is bf16 autocast on a CPU with bf16 instructions (AVX512-BF16 or
    AMX: there the demo makes 1.4x the steps at the same val mAP50), fp32 on other CPUs, where
    bf16 would be emulated and slower, and bf16 (else fp16) on CUDA. fp16 is CUDA only."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        return "fp32"
    return precision


def mixed_precision(precision: str) -> str:
    """accelerate's `mixed_precision` (its autocast) for a config `precision`: `no`, `bf16` or
    `fp16` (`bf16-base` autocasts nothing: its activations are bf16 already)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(training_precision(precision), "no")


def frozen_dtype(precision: str) -> torch.dtype | None:
    """The dtype the frozen base is stored in to train with `precision` (None: as loaded)."""
    return torch.bfloat16 if training_precision(precision) == "bf16-base" else None


def _on_device(batch: dict[str, torch.Tensor], device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`batch` on `device`, its float tensors (pixels, cached image features) in `dtype` if given."""
    return {k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            for k, v in batch.items()}


def _check_run_dir(run_dir: Path, last_dir: Path, resume: bool) -> None:
    if resume:
        if not has_checkpoint(last_dir):
            raise FileNotFoundError(f"nothing to resume: {last_dir} has no checkpoint")
    elif last_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick a new --out")


def _image_cache(model, frozen_stages: int):
    """`(encode, finish, what)` for cache_image_features: `encode(pixels)` is what each image
    caches, `finish(cached)` (None: nothing) turns a batch of it into image features every
    step, `what` says which part is cached. A fully frozen vision side caches its image
    features; otherwise its first `frozen_stages` DaViT stages (`lora.vision_frozen_stages`)
    are cached and the rest runs, adapters and all. Raises ValueError when neither is frozen."""
    base = model.get_base_model()
    if frozen_stages == 0 or not _moving_image_side(model):
        _check_frozen_image_side(model)
        return (lambda pixels: base.model.get_image_features(pixels).pooler_output), None, "frozen vision side"
    if frozen_stages >= stage_count(model):
        raise ValueError(f"lora.vision_frozen_stages {frozen_stages} freezes every DaViT stage, but the projector "
                         "still trains: use --freeze vision, or fewer frozen stages")
    moving = [n for n in _moving_image_side(model) if (stage := stage_of(n)) is not None and stage < frozen_stages]
    if moving:
        raise ValueError(f"cache_image_features caches the first {frozen_stages} vision stages, but {moving[0]} "
                         "in them would train")
    head, tail = split_image_path(model, frozen_stages)
    return head, tail, f"the first {frozen_stages} of {stage_count(model)} DaViT stages"


def _moving_image_side(model) -> list[str]:
    """Trainable parameters before the text encoder: vision tower, projector, token embeddings."""
    return [n for n, p in model.named_parameters() if p.requires_grad and
            any(k in n for k in ("vision_tower", "multi_modal_projector", "shared", "embed_tokens"))]


def _check_frozen_image_side(model) -> None:
    """Cached image features must be what the model would compute: nothing before the text
    encoder (vision tower, projector, token embeddings) may train."""
    moving = _moving_image_side(model)
    if moving:
        raise ValueError(
            f"cache_image_features needs a frozen vision side, but {moving[0]} (and {len(moving) - 1} more) "
            "would train: add --freeze vision, use language-only targets, or freeze the first DaViT stages "
            "(lora.vision_frozen_stages=N)"
        )


def _has_samples(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


@torch.no_grad()
def _evaluate(
    model, processor, val_set: FlorenceDataset, cfg: TrainConfig, accelerator, spec: LossSpec
) -> dict[str, float]:
    """Val loss (sharded over processes) on a fixed subset, and val mAP50 on the main process
    via `loomlens.evaluate.evaluate_jsonl`; leaves the RNG states and the attention
    implementation as it found them."""
    found, attention = rng_states(), model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # no attention weights needed here: the fast kernel
    model.eval()
    collate = Collator(processor.tokenizer.pad_token_id)
    subset = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(0)).tolist()
    subset = subset[: cfg.val_loss_max_samples]
    lengths = [val_set.lengths[i] for i in subset]
    batches = plan_batches(["val"] * len(subset), lengths, cfg.eval_batch_size, "interleaved", shuffle=False)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    for idx in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = _on_device(collate([val_set[subset[i]] for i in idx]), accelerator.device, frozen_dtype(cfg.precision))
        part, count = batch_loss(model, batch, spec)
        loss_sum, tokens = loss_sum + part, tokens + count
    result = {"val_loss": (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum")).item()}
    if accelerator.is_main_process:
        result.update(_detection_metrics(model, processor, val_set.jsonl, cfg))
    accelerator.wait_for_everyone()
    model.set_attn_implementation(attention)
    model.train()
    set_rng_states(found)
    return result


def _detection_metrics(model, processor, jsonl: Path, cfg: TrainConfig) -> dict[str, float]:
    """mAP50 (and friends) of the `<OD>` val samples; empty when `eval_max_images` is 0."""
    if cfg.eval_max_images == 0:
        return {}
    from loomlens.evaluate import evaluate_jsonl
    metrics = evaluate_jsonl(model, processor, jsonl, max_images=cfg.eval_max_images, batch_size=cfg.eval_batch_size)
    return {k: float(metrics[k]) for k in ("map50", "map50_95", "map75") if metrics.get(k) is not None}


def _write_run_files(cfg: TrainConfig, run_dir: Path, world: int) -> None:
    """`config.yaml` (resolved), `env.json` (versions, git commit, device), and from the data
    folder `classes.txt` and `summary.json` (as `data_summary.json`: prediction reads the tile
    size the data was cut to from it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "env.json").write_text(json.dumps(environment(world), indent=2) + "\n")
    for name, copy in (("classes.txt", "classes.txt"), ("summary.json", DATA_SUMMARY)):
        if (cfg.data / name).exists():
            shutil.copyfile(cfg.data / name, run_dir / copy)


def environment(world: int = 1) -> dict[str, Any]:
    """Package versions, git commit, Python, platform and device of this process."""
    versions = {}
    for name in ("loomlens", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": versions,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "processes": world,
        "torch_threads": torch.get_num_threads(),
    }
