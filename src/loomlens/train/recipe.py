"""The fine-tuning recipe: LoRA/DoRA on Florence-2, one loop, top to bottom.

`setup` builds a `Session` (accelerator, base + fresh adapter, datasets, optimizer and
schedule, a `BatchPreparer` that hides the speed settings, the micro-batch that fits memory,
and on resume the saved state); `train` then runs one loop of named steps:

    for each optimizer step: forward_backward (accumulate a window) -> optimizer_step
       -> advance -> log_step -> stop_reason -> validate_and_keep_best | save -> stop?

A window is `grad_accum` planned batches of `batch_size` samples, each passed through the
model in micro-batches of `speed.micro_batch` samples; the loss is normalised by the window's
tokens, so how a window is split changes the step only by rounding (and, with dropout, which
masks are drawn).

Everything distributed goes through Hugging Face accelerate: the same code runs on one CPU,
one GPU, or `accelerate launch` across GPUs and nodes. Each process takes every N-th batch
of one shared, seeded batch plan; only the main process writes files.

Exact resume: the batch plan is a pure function of (seed, epoch), the checkpoint stores the
position in it, the optimizer and every process's RNG states, and evaluation
restores the RNG states it found, so when and how often a run evaluates never changes its
weights.
"""

from __future__ import annotations

import errno
import json
import math
import platform
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from loomlens.config import RESUMABLE, TrainConfig, changed_settings, dump_config, load_recorded
from loomlens.data.atomic import atomic_copy, atomic_write, recover_folder
from loomlens.data.augment import Augment
from loomlens.data.convert import unconverted
from loomlens.data.dataset import (
    IGNORE_INDEX, Collator, FlorenceDataset, default_cache_bytes, plan_batches,
)
from loomlens.data.sampling import Balance
from loomlens.data.tiles import VANISHING_PX, VANISHING_SHARE
from loomlens.data.yolo import CLASSES_FILE, read_class_names
from loomlens.infer.generation import MAX_BOXES
from loomlens.model.folded_lora import fold_lora
from loomlens.model.lora import apply_lora, load_quantized_base, lower_frozen, trainable_by_tower
from loomlens.model.memory import enable_gradient_checkpointing, smaller_micro_batch
from loomlens.model.runtime import cpu_has_bf16, keep_freed_memory, resolve_device
from loomlens.model.vision import split_image_path, stage_count, stage_of
from loomlens.run import CROP, DATA_SUMMARY, Run, check_output_folder
from loomlens.train.average import WeightAverage
from loomlens.train.checkpoint import (
    TrainerState,
    copy_checkpoint,
    has_checkpoint,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from loomlens.train.curves import MetricsLog, plot_run
from loomlens.train.guard import Evaluation, Guard
from loomlens.train.loss import LossSpec, batch_loss, with_image_embeds
from loomlens.train.micro_batch import (
    cut_pieces, recorded_micro_batch, settle_micro_batch, split_batch, with_micro_batch,
)
from loomlens.train.schedule import lr_factor, plan_steps, warmup_steps

#: Batches timed (after one untimed pass over them) to plan a time-budgeted run, and the fewest
#: steps between two evaluations.
TIMED_PASSES, MIN_EVAL_EVERY = 3, 25


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite and no rollback was left; the last
    finite weights were saved first."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after saving `last/`."""


@dataclass
class TrainResult:
    """What `train` leaves behind: the run folder, the trained peft model, why it stopped."""

    run_dir: Path
    model: Any
    processor: Any
    state: TrainerState
    stopped: str
    last_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class Session:
    """Everything the loop works with, built once by `setup`: the accelerate-wrapped `model`
    and its peft `adapter`, data, optimizer and schedule, how batches reach the model
    (`prepare`), where the run stands (`state`) and where it writes (`run_dir`)."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    adapter: Any
    processor: Any
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    train_set: FlorenceDataset
    val_set: FlorenceDataset | None
    collate: Collator
    spec: LossSpec
    prepare: BatchPreparer
    total_steps: int  # planned (`plan_run`); `nominal_steps` is what max_steps or epochs asked for
    warmup: int
    state: TrainerState
    run_dir: Path
    metrics: MetricsLog | None
    say: Callable[[str], None]
    nominal_steps: int | None = None
    eval_every: int = 0
    evaluated_at: int = 0  # the step of the last evaluation (or where this process started)
    guard: Guard = field(default_factory=Guard)
    losses: list[float] = field(default_factory=list)  # train losses since the last evaluation
    signalled: str = ""  # the signal that asked the run to stop
    epoch_length: int = 0  # optimizer steps in this epoch, for the fractional epoch logged
    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0  # training seconds of the runs this one resumes
    cache_said: bool = False  # whether the run has said that the train set's image cache is full
    start: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapter's weights this process began from
    start_step: int = 0  # ... and their step (0, or the step a resumed run went on from)
    average: WeightAverage | None = None  # the weights evaluated and saved (`ema_decay`; None: the last step's)
    paced_from: tuple[int, float] | None = None  # step and stepping seconds when `keep_to_budget` last timed steps

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    @property
    def epoch(self) -> float:
        return self.state.epoch + self.state.window / max(1, self.epoch_length)

    @property
    def micro_batch(self) -> int:
        """Samples per forward + backward: `speed.micro_batch` once `setup` has resolved it."""
        size = self.cfg.speed.micro_batch
        return size if isinstance(size, int) else self.cfg.batch_size


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`, writing the run folder `cfg.out`.

    `resume` continues the run in `cfg.out` from `checkpoints/last/` exactly where it was
    saved, also after a kill (a save is atomic, so `last/` is always a whole checkpoint).
    SIGINT/SIGTERM save `last/` at the next step boundary and raise `TrainingInterrupted`.
    Raises `TrainingDiverged` on NaN/inf with no rollback left.
    """
    from tqdm.auto import tqdm

    s = setup(cfg, resume=resume, log=log)
    cfg = s.cfg  # with the micro-batch resolved
    main = s.accelerator.is_main_process
    # None: tqdm draws only on a terminal, so an unattended run's log file holds no bar redrawn per step
    bar = tqdm(total=s.total_steps, initial=s.state.step, disable=None if main and cfg.progress else True, desc="train")
    stopped, last_eval = stop_reason(s), {}
    s.model.train()
    with _signals_saved_as_stops(s):
        while not stopped:
            for micro in window_batches(s, epoch_windows(s)):
                loss = forward_backward(s, micro)
                lr, grad_norm = optimizer_step(s, loss)
                epoch_done = advance(s)
                log_step(s, bar, loss=loss, lr=lr, grad_norm=grad_norm)
                stopped = stop_reason(s)
                if s.val_set is not None and (eval_due(s, epoch_done) or stopped in ("max_steps", "time_budget")):
                    last_eval, stopped = validate_and_keep_best(s, stopped)
                elif stopped or (cfg.save_every and s.state.step % cfg.save_every == 0):
                    save(s, improved=s.val_set is None and bool(stopped) and stopped != "interrupted")  # unjudged
                if stopped:
                    break
    bar.close()
    if s.average:  # the model returned is the one last/ holds
        s.average.install()
    _finish(s, stopped)
    return TrainResult(s.run_dir, s.adapter, s.processor, s.state, stopped, last_eval)


def _finish(s: Session, stopped: str) -> None:
    """Close the logs and say why the run stopped; an interrupted run says how to resume."""
    if s.metrics:
        s.metrics.close()
        plot_run(s.run_dir)
    s.accelerator.wait_for_everyone()
    if stopped == "interrupted":
        raise TrainingInterrupted(
            f"{s.signalled} at step {s.state.step}: saved in {s.last_dir}; resume with "
            f"`loomlens train --resume {s.run_dir}`"
        )
    best = f"; best/ is step {s.state.best_step}" if s.state.best_step is not None else (
        "; best/ is the last step (no val split)" if s.val_set is None else "")
    if s.state.step == s.start_step and stopped in ("max_steps", "time_budget"):
        best += f" (nothing trained: the run had already reached its {stopped}; resume with a larger one to go on)"
    s.say(f"stopped ({stopped}) at step {s.state.step}{best}; run folder {s.run_dir}")


# --- setup: one helper per part ------------------------------------------------------------


def param_groups(model: torch.nn.Module, plus_ratio: float) -> list[dict[str, Any]]:
    """The adapter's trainable weights as AdamW groups, each with the multiple of the scheduled
    lr it learns at (`lr_ratio`). LoRA+ (Hayou et al. 2024, §3): B, which starts at zero, learns
    `plus_ratio` times faster than A; 1-D weights (DoRA magnitudes) go with B, as in peft's
    `create_loraplus_optimizer`, whose fixed per-group lrs the schedule here would overwrite."""
    a, b = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if plus_ratio != 1 and ("lora_B" in name or p.ndim == 1) else a).append(p)
    return [{"params": a, "lr_ratio": 1.0}] + ([{"params": b, "lr_ratio": plus_ratio}] if b else [])


def setup(cfg: TrainConfig, *, resume: bool, log: Callable[[str], None]) -> Session:
    """Build the `Session` of `cfg`: accelerator, model with a fresh adapter, data, optimizer,
    schedule and batch preparer; on `resume`, the state of `checkpoints/last/`."""
    from accelerate.utils import set_seed

    run_dir = Path(cfg.out)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main and resume:
        recover_folder(run_dir / "checkpoints" / "last")  # a kill between a save's renames: the previous one back
    accelerator.wait_for_everyone()
    _check_data(cfg, resume=resume)  # first: --out given the data folder is named as that
    _check_run_dir(run_dir, run_dir / "checkpoints" / "last", resume)
    say = log if main else (lambda *_: None)
    set_seed(cfg.seed)  # the adapter's initial weights (they come from last/ on resume)
    model, processor = training_model(cfg)
    train_set, val_set = datasets(cfg, processor, model.config.text_config.max_position_embeddings,
                                  processes=accelerator.num_processes)
    _check_classes(cfg, train_set)
    nominal = step_count(cfg, train_set, accelerator.num_processes)
    params = [p for p in model.parameters() if p.requires_grad]  # the adapter's weights only
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lora.plus_ratio), lr=cfg.lr, weight_decay=cfg.weight_decay)
    spec = loss_spec(cfg, model=model, processor=processor, train_set=train_set)
    towers = trainable_by_tower(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    adapter = accelerator.unwrap_model(model)
    prepare = batch_preparer(cfg, adapter=adapter, train_set=train_set, device=accelerator.device, say=say)
    s = Session(cfg, accelerator, model, adapter, processor, optimizer, params, train_set, val_set,
                Collator(processor.tokenizer.pad_token_id), spec, prepare, 0, 0, TrainerState(),
                run_dir, None, say, nominal_steps=nominal, guard=make_guard(cfg))
    cfg = s.cfg = settle_micro_batch(s, resume=resume)
    if cfg.ema_decay:
        s.average = WeightAverage({n: p for n, p in adapter.named_parameters() if p.requires_grad}, cfg.ema_decay)
    if resume:
        s.state = load_checkpoint(s.last_dir, model=adapter, optimizer=optimizer, rank=accelerator.process_index,
                                  scaler=accelerator.scaler, average=s.average)
        s.guard.restore(s.state.guard)
        amended = amend_config(cfg, run_dir, s.state.step, say=say)
        # Against the checkpoint's own record (config.yaml may hold a change whose resume died before a
        # save); a checkpoint from before the record was kept has only config.yaml to go by
        planned = s.state.planned_for
        if planned != run_length(cfg) if planned else amended & set(run_length(cfg)):
            s.state.planned_steps = None  # plan the rest again, at the rate measured so far
        say(f"resumed from {s.last_dir} at step {s.state.step} (epoch {s.state.epoch})")
        resume_stopped(s, amended)
    plan_run(s)
    if main:
        _write_run_files(cfg, run_dir, accelerator.num_processes, train_set.crop_window)
        s.metrics = MetricsLog(run_dir, s.state.step if resume else None, cfg.tensorboard)
    _describe(s, towers)
    s.started, s.seconds_before = time.monotonic(), s.state.train_seconds
    s.evaluated_at = s.state.step
    s.start = {name: p.detach().clone() for name, p in adapter.named_parameters() if p.requires_grad}
    s.start_step = s.state.step
    return s


def resume_stopped(s: Session, amended: set[str]) -> None:
    """A resumed run the guard had ended stays ended, saying so, unless `early_stopping` is
    not the patience it stopped with (more, or off) after a plateau: another evaluation would
    only repeat the verdict, and after a collapse the run already ended on best/'s weights.
    The patience is the checkpoint's own (`Guard.state`), so a resume that gave more and died
    before its first save goes on when run again."""
    why = s.state.stopped
    stopped_with = s.state.guard.get("patience")  # absent in checkpoints from before it was kept
    changed = "early_stopping" in amended if stopped_with is None else s.cfg.early_stopping != stopped_with
    if why == "early_stopping" and changed:
        s.state.stopped = ""  # the guard counts the evaluations since the best against the new patience
    elif why:
        more = ("resume with early_stopping=<more evaluations> (or 0, off) to train on" if why == "early_stopping"
                else "start a new run (--out) with a lower lr to try again")
        s.say(f"this run had already stopped ({why}) at step {s.state.step}: nothing to train; {more}")


def make_accelerator(cfg: TrainConfig):
    """accelerate's `Accelerator` for `cfg`: on the CPU unless `cfg.device` resolves to CUDA
    (the GPU of each process is accelerate's pick), autocast as `cfg.speed.precision` says."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed precision per process, fixed by the first Accelerator; a sweep
    # or a test trains several runs in one process, so forget it (the distributed state stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    device = resolve_device(cfg.device)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision(cfg.speed.precision, device))


def datasets(cfg: TrainConfig, processor, max_label: int, processes: int = 1
             ) -> tuple[FlorenceDataset, FlorenceDataset | None]:
    """The train set (augmented as `cfg.augment` says) and the val set (None when `val.jsonl` is
    empty or missing), tokenised, answers cut at `max_label` tokens. Workers start afresh each
    epoch, so the train set caches only when batches are made in the loop (`speed.num_workers` 0);
    each of the machine's `processes` keeps its share of the image cache's budget."""
    aug = cfg.augment
    on = aug.enabled and not cfg.speed.cache_image_features  # cached features are of the plain pictures
    augment = Augment(**aug.model_dump(exclude={"enabled"})) if on else None
    budget = default_cache_bytes() // max(1, processes)
    train_set = FlorenceDataset(cfg.data / "train.jsonl", processor, cfg.tasks, max_label,
                                cache_bytes=budget if cfg.speed.num_workers == 0 else 0, augment=augment, seed=cfg.seed)
    if train_set.absent_tasks:  # else config.yaml would record tasks the run never learnt
        raise ValueError(f"tasks {', '.join(train_set.absent_tasks)} have no sample in {train_set.jsonl}: drop them "
                         "from tasks=, or convert with --tasks naming them")
    val_path = cfg.data / "val.jsonl"
    val_set = (FlorenceDataset(val_path, processor, cfg.tasks, max_label, cache_bytes=budget)
               if _has_samples(val_path) else None)
    return train_set, val_set


def epoch_plan(cfg: TrainConfig, train_set: FlorenceDataset, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches of sample indices, shared by every process (a pure function of
    the seed and the epoch: what makes resume exact)."""
    balance = Balance(**cfg.balance.model_dump())
    return plan_batches(train_set.tasks, train_set.lengths, cfg.batch_size, cfg.order, cfg.shuffle, cfg.seed,
                        epoch, cfg.group_by_length, labels=train_set.classes, balance=balance)


#: A run that sets neither max_steps, epochs nor a time budget makes this many steps, or
#: `DEFAULT_EPOCHS` passes where those are more: the default recipe's runs peak after a number
#: of steps more than of passes, about what the 20-minute CPU budget makes (docs/training.md,
#: "Without a time budget"), so passes alone left a small set under-trained. The plateau stop
#: ends a run that has stopped improving.
DEFAULT_STEPS = 3000
DEFAULT_EPOCHS = 3


def step_count(cfg: TrainConfig, train_set: FlorenceDataset, world: int) -> int | None:
    """Optimizer steps the run asks for: `max_steps`, else `epochs` of accumulation windows,
    else None with a time budget (it decides: `plan_run`), else `DEFAULT_STEPS` or
    `DEFAULT_EPOCHS`, whichever is more. Raises ValueError when the data is too small to give
    each of `world` processes a window."""
    windows_per_epoch = math.ceil(len(epoch_plan(cfg, train_set, 0)) // world / cfg.grad_accum)
    if windows_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples are too few for {world} processes")
    if cfg.max_steps or cfg.epochs:
        return cfg.max_steps or math.ceil(cfg.epochs * windows_per_epoch)
    return None if cfg.time_budget else max(DEFAULT_STEPS, math.ceil(DEFAULT_EPOCHS * windows_per_epoch))


def make_guard(cfg: TrainConfig) -> Guard:
    """The collapse and plateau guard of `cfg` (with `guard.collapse` off: no rollback ever)."""
    g = cfg.guard
    return Guard(patience=cfg.early_stopping, rising=g.rising, empty_share=g.empty_share,
                 max_rollbacks=g.max_rollbacks if g.collapse else 0, explode=g.explode)


def run_length(cfg: TrainConfig) -> dict:
    """The settings the steps of a run are planned from (`plan_run`)."""
    return {"time_budget": cfg.time_budget, "max_steps": cfg.max_steps, "epochs": cfg.epochs}


def plan_run(s: Session) -> None:
    """Fix the steps the run makes (`state.planned_steps`, kept on resume), its warmup and how
    often it evaluates. A time budget is turned into steps from the step rate measured before
    the first step (`measure_step_seconds`), so warmup and decay fit the steps really made."""
    cfg, state = s.cfg, s.state
    if state.planned_steps is None:
        rate = 0.0
        if cfg.time_budget:
            rate = state.train_seconds / state.step if state.step else measure_step_seconds(s)
        state.planned_steps = plan_steps(nominal=s.nominal_steps, time_budget=cfg.time_budget, seconds_per_step=rate,
                                         done_steps=state.step, done_seconds=state.train_seconds)
        state.planned_for = run_length(cfg)
        if cfg.time_budget:
            s.say(f"planned {state.planned_steps} steps: {rate:.3f} s a step measured, {cfg.time_budget:.0f} s budget")
        elif not (cfg.max_steps or cfg.epochs):
            s.say(f"planned {state.planned_steps} steps, the default without a time budget, max_steps or epochs "
                  "(--time-budget S fits a run to S seconds)")
    s.total_steps = state.planned_steps
    s.warmup = warmup_steps(cfg.warmup, s.total_steps)
    lr_factor(0, s.warmup, s.total_steps, cfg.schedule)  # a bad schedule name fails now, not at step 1
    every = cfg.eval_every
    s.eval_every = max(MIN_EVAL_EVERY, math.ceil(s.total_steps / 10)) if every is None else every


def eval_due(s: Session, epoch_done: bool) -> bool:
    """Whether the step just made is evaluated: every `eval_every` steps (its multiples when
    set by hand; counted from the last evaluation when automatic, so re-spacing them in
    `keep_to_budget` never puts two close together), or at each epoch's end with `eval_every: 0`."""
    if not s.eval_every:
        return epoch_done
    if s.cfg.eval_every is None:
        return s.state.step - s.evaluated_at >= s.eval_every
    return s.state.step % s.eval_every == 0


def measure_step_seconds(s: Session) -> float:
    """Seconds one optimizer step takes here, once each picture is cached: forward and backward
    passes over the first `TIMED_PASSES` batches, made twice and timed the second time (the
    first pass pays one-off costs: kernels, each image's processing). Nothing is stepped and the
    RNG states are put back, so the run trains as if it had not been measured. The slowest
    process counts. Timed in training mode, so dropout and gradient checkpointing cost what they
    will cost in the loop."""
    from accelerate.utils import gather_object

    found, mode = rng_states(), s.model.training
    s.model.train()
    plan = epoch_plan(s.cfg, s.train_set, 0)
    batches = [plan[i % len(plan)] for i in range(TIMED_PASSES)]
    timed = 0.0
    for k, idx in enumerate(batches * 2):
        start = time.perf_counter()
        for piece in split_batch(idx, s.micro_batch):
            batch = s.prepare(s.collate([s.train_set[i] for i in piece]))
            loss, _ = batch_loss(s.model, batch, s.spec)
            s.accelerator.backward(loss)
        if k >= TIMED_PASSES:
            timed += time.perf_counter() - start
    s.optimizer.zero_grad(set_to_none=True)
    set_rng_states(found)
    s.model.train(mode)
    return max(gather_object([timed / TIMED_PASSES * s.cfg.grad_accum]))


def loss_spec(cfg: TrainConfig, *, model, processor, train_set: FlorenceDataset) -> LossSpec:
    """The loss's ids and optional terms for `model`; the pointer's grid (cells per side) is
    read from the number of image tokens in a prompt (one pooled token plus the grid)."""
    text_config = model.config.text_config
    image_tokens = train_set.examples[0].input_ids.count(model.config.image_token_id)
    return LossSpec(
        text_config.decoder_start_token_id, text_config.pad_token_id,
        processor.tokenizer.convert_tokens_to_ids("<loc_0>"), cfg.loc_sigma, cfg.pointer_weight,
        math.isqrt(image_tokens - 1),
    )


def _describe(s: Session, towers: dict[str, int]) -> None:
    cfg, world = s.cfg, s.accelerator.num_processes
    s.say(
        f"training {cfg.model} + LoRA ({cfg.lora.targets}, r={cfg.lora.r}{', DoRA' if cfg.lora.dora else ''}) "
        f"on {len(s.train_set)} samples, {s.total_steps} steps x {cfg.batch_size * cfg.grad_accum * world} samples, "
        f"{world} process(es) on {s.accelerator.device}; trainable: vision {towers['vision']:,}, "
        f"language {towers['language']:,}"
    )
    if s.train_set.truncated:
        limit = s.adapter.config.text_config.max_position_embeddings
        s.say(f"warning: {s.train_set.truncated} answers are longer than the decoder's {limit} positions; cut")
    _warn_unlearnable(s)
    _warn_unjudged(s)
    if cfg.augment.enabled and cfg.speed.cache_image_features:
        s.say("warning: speed.cache_image_features encodes each picture once, as it is, so the online augmentation "
              "is off for this run (its mirrors, scale and photometric changes); set augment=false to say so, or "
              "drop the cache to keep them")
    small, edge = s.train_set.vanishing, s.train_set.edge
    # Not for data cut into tiles (its whole frames are kept beside them) or a cropping run.
    if small and small >= VANISHING_SHARE * s.train_set.boxes and Run(s.run_dir).tile is None:
        s.say(f"warning: {small} of {s.train_set.boxes} training boxes are under {VANISHING_PX:g} px on their "
              f"shorter side once their frames are squeezed to the model's {edge}x{edge} input, where the model "
              f"barely sees them; convert with --tile {edge} so that defects keep their pixels")


def _warn_unjudged(s: Session) -> None:
    """Warn when validation cannot judge the run: no val split (then `best/` is the last
    step's weights) or one without a defect box (mAP undefined: `best/` by val loss alone, and
    no collapse to "no defect" can be seen)."""
    if s.val_set is None:
        s.say("warning: no val split, so nothing is evaluated: best/ will be the last step's weights, and neither "
              "a collapse nor a plateau can be caught; convert with a --val-fraction that leaves some images")
    elif (labelled := [c for c in s.val_set.classes if c is not None]) and not any(labelled):  # none with a box
        s.say("warning: the val split holds no defect box, so its mAP is undefined: best/ follows the val loss "
              "alone and a collapse to 'no defect' cannot be seen; convert with --resplit, or label more defects")


def _warn_unlearnable(s: Session) -> None:
    """Warn when training samples with boxes hold no box at all, or none of a class the data's
    `classes.txt` lists: the run would spend its budget without seeing that defect (a split
    that put them all in val or test, which `convert` reports too)."""
    labelled = [c for c in s.train_set.classes if c is not None]  # samples that answer boxes
    seen = frozenset().union(*labelled)
    if labelled and not seen:
        s.say("warning: no training sample holds a defect box, so the run can only learn 'no defect'; convert "
              "with --resplit, or move defective images into the train split")
    elif missing := [c for c in Run(s.run_dir).classes if labelled and c not in seen]:
        s.say(f"warning: class(es) {', '.join(missing)} have no box in the training samples, so the run cannot "
              "learn them; convert with --resplit, or label more images of them")


# --- the loop's steps ------------------------------------------------------------------------


def epoch_windows(s: Session) -> list[list[list[int]]]:
    """This process's accumulation windows of the current epoch: every N-th batch of the
    shared plan (N processes), grouped `grad_accum` at a time."""
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    s.train_set.set_epoch(s.state.epoch)
    batches = epoch_plan(s.cfg, s.train_set, s.state.epoch)
    mine = batches[: len(batches) // world * world][rank::world]
    windows = [mine[i : i + s.cfg.grad_accum] for i in range(0, len(mine), s.cfg.grad_accum)]
    s.epoch_length = len(windows)
    return windows


def window_batches(s: Session, windows: list[list[list[int]]]) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The collated micro-batches of each window not yet done in this epoch, in order: each
    planned batch cut into pieces of `s.micro_batch` samples (`split_batch`)."""
    todo = [[piece for idx in window for piece in split_batch(idx, s.micro_batch)]
            for window in windows[s.state.window :]]
    loader = iter(torch.utils.data.DataLoader(
        s.train_set, batch_sampler=[piece for window in todo for piece in window], collate_fn=s.collate,
        num_workers=s.cfg.speed.num_workers, generator=torch.Generator(),  # its own: the global RNG is dropout's
    ))
    for window in todo:
        yield [next(loader) for _ in window]


def forward_backward(s: Session, micro: list[dict[str, torch.Tensor]]) -> float:
    """Accumulate the gradients of one window; return its mean loss per token. A pass that runs
    CUDA out of memory halves the micro-batch (`shrink_micro_batch`) and the window is made
    again in smaller pieces: the same samples, so the same gradient up to rounding (with
    dropout on, other masks). A time budget re-plans its steps at the next evaluation, as it
    does whenever the step rate moves (`keep_to_budget`)."""
    while True:
        try:
            return window_loss(s, cut_pieces(micro, s.micro_batch))
        except torch.cuda.OutOfMemoryError:
            pass  # out of the handler first: its traceback holds the failed pass's tensors
        shrink_micro_batch(s)


def shrink_micro_batch(s: Session) -> None:
    """After CUDA ran out of memory mid-window: clear the window's gradients, free the cached
    memory, and take the next smaller micro-batch from here on, recorded in `s.cfg`, the run's
    config.yaml (a resume takes it) and metrics.csv. RuntimeError, saying what to change, when
    one sample a pass already ran out, or with several processes (their passes stay in step)."""
    size, world = s.micro_batch, s.accelerator.num_processes
    smaller = smaller_micro_batch(size, s.cfg.batch_size)
    if smaller is None or world > 1:
        less = (f"speed.micro_batch={smaller} or " if smaller else "") + "speed.gradient_checkpointing=both"
        go_on = (f"the last save is in {s.last_dir}: resume with `loomlens train --resume {s.run_dir}` and {less} "
                 "(a lower image size or LoRA rank needs a new run)" if has_checkpoint(s.last_dir) else
                 f"nothing was saved yet: start again with {less}, a lower image size or a lower LoRA rank")
        raise RuntimeError(f"CUDA ran out of memory at step {s.state.step + 1} with {size} sample(s) a pass"
                           f"{f' on one of {world} processes' if world > 1 else ''}; {go_on}")
    s.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    s.cfg = with_micro_batch(s.cfg, smaller)
    if s.accelerator.is_main_process:
        dump_config(s.cfg, s.run_dir / "config.yaml")
    event(s, f"CUDA out of memory with {size} samples a pass: micro-batch {smaller} from here, the step unchanged")


def window_loss(s: Session, micro: list[dict[str, torch.Tensor]]) -> float:
    """Accumulate the gradients of one window's micro-batches; return its mean loss per token.
    The loss is summed over the window's tokens on every process and divided by their global
    count, so accumulation and DDP average per token."""
    accelerator, world = s.accelerator, s.accelerator.num_processes
    count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
    tokens = accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum")
    loss_sum = torch.zeros((), device=accelerator.device)
    for k, batch in enumerate(micro):
        sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(s.model)
        with sync:
            part, _ = batch_loss(s.model, s.prepare(batch), s.spec)
            accelerator.backward(part * world / tokens)
        loss_sum += part.detach()
    return (accelerator.reduce(loss_sum, "sum") / tokens).item()


def optimizer_step(s: Session, loss: float) -> tuple[float, float | None]:
    """Clip, set the scheduled learning rate and step; return `(lr, grad norm)`. A NaN/inf loss
    or gradient norm never reaches the weights: the step is skipped and `diverged` decides."""
    cfg, state = s.cfg, s.state
    grad_norm = float(s.accelerator.clip_grad_norm_(s.params, cfg.max_grad_norm or math.inf))
    lr = cfg.lr * state.lr_scale * lr_factor(state.step, s.warmup, s.total_steps, cfg.schedule)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        s.optimizer.zero_grad(set_to_none=True)
        diverged(s, f"loss {loss}, gradient norm {grad_norm} at step {state.step + 1}")
        return lr, grad_norm
    exploded = s.guard.exploded(loss, step=state.step + 1)
    if exploded:  # the weights that gave this loss are already spoilt: go back past them
        s.optimizer.zero_grad(set_to_none=True)
        diverged(s, f"{exploded} at step {state.step + 1}", spoilt=True)
        return lr, grad_norm
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.average:
        s.average.update(state.step + 1)
    return lr, grad_norm


def diverged(s: Session, what: str, *, spoilt: bool = False) -> None:
    """After a non-finite step (or, `spoilt`, one whose loss says the weights blew up): roll
    back to the best checkpoint at a lower learning rate while the guard has rollbacks left;
    else save finite weights (never spoilt ones) and raise."""
    g = s.guard
    if g.rollbacks < g.max_rollbacks:
        g.rollbacks += 1
        roll_back(s, f"diverged ({what})", spoilt=spoilt)
        return
    kept = f"step {s.state.step}" if not spoilt else restore_sound(s, spoilt=True)
    save(s)
    raise TrainingDiverged(
        f"{what}; the weights of {kept} are saved in {s.last_dir}. "
        "Lower --lr, keep --max-grad-norm on, or use --precision fp32."
    )


def roll_back(s: Session, why: str, *, spoilt: bool = False) -> None:
    """Load the best checkpoint's adapter and optimizer (else keep the weights as they are, or
    for `spoilt` ones go back to those this process began from), cut the learning rate by
    `guard.rollback_lr`, and record the event. The step count, the data's position and the
    time spent go on."""
    if has_checkpoint(s.best_dir) or spoilt:
        back = f"back to {restore_sound(s, spoilt=spoilt)}"
    else:
        back = "no best checkpoint yet"
    s.state.lr_scale *= s.cfg.guard.rollback_lr
    event(s, f"{why}: {back}, learning rate x{s.state.lr_scale:g}")


def restore_sound(s: Session, *, spoilt: bool) -> str:
    """Put back the best checkpoint (adapter and optimizer), else the weights this process
    began from (step 0, or the step it resumed at) with a fresh optimizer; say which step.
    After a blow-up (`spoilt`) best/ must be older than the last sound train loss: the loss of
    step k is that of the weights of step k - 1, so a later best/ may hold blown-up weights."""
    best = s.state.best_step
    if has_checkpoint(s.best_dir) and (not spoilt or (best is not None and best < s.guard.sound_step)):
        load_checkpoint(s.best_dir, model=s.adapter, optimizer=s.optimizer, rank=s.accelerator.process_index,
                        scaler=s.accelerator.scaler, average=s.average)
        return f"step {s.state.best_step}"
    with torch.no_grad():
        for name, p in s.adapter.named_parameters():
            if name in s.start:
                p.copy_(s.start[name])
    if s.average:
        s.average.restart()
    s.optimizer.state.clear()  # the moments of the blow-up would push the same way again
    return f"step {s.start_step}"


def event(s: Session, text: str) -> None:
    """Say what the run did, and put it in metrics.csv's `event` column at this step."""
    s.say(f"step {s.state.step}: {text}")
    if s.metrics:
        s.metrics.log({"step": s.state.step, "epoch": s.epoch, "seconds": s.state.train_seconds, "event": text})


def advance(s: Session) -> bool:
    """Count the step (and the training time); return whether it ended the epoch."""
    state = s.state
    state.step += 1
    state.window += 1
    epoch_done = state.window == s.epoch_length
    if epoch_done:
        state.epoch, state.window = state.epoch + 1, 0
    state.train_seconds = s.seconds_before + time.monotonic() - s.started
    return epoch_done


def log_step(s: Session, bar, *, loss: float, lr: float, grad_norm: float | None) -> None:
    """The step on the progress bar and in the metrics log; once, that the image cache is full."""
    if s.train_set.cache_full and not s.cache_said:
        s.cache_said = True
        event(s, f"image cache full ({s.train_set.cached_bytes / 2**30:.1f} GiB): "
              "images past it are decoded each time they are used (the same pixels, more slowly)")
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=s.state.epoch)
    if s.guard.sound_step == s.state.step:  # not a NaN or blown-up one: those would skew the over-fitting check
        s.losses.append(loss)
    if s.metrics:
        s.metrics.log({"step": s.state.step, "epoch": s.epoch, "seconds": s.state.train_seconds, "lr": lr,
                       "train_loss": loss, "grad_norm": grad_norm})


#: The stops the guard makes: a resume keeps them (`resume_stopped`).
GUARD_STOPS = ("early_stopping", "collapsed")


def stop_reason(s: Session) -> str:
    """Why the run stops after this step ("" if it goes on)."""
    if s.state.stopped:
        return s.state.stopped
    if s.state.step >= s.total_steps:
        return "max_steps" if s.nominal_steps is not None and s.total_steps >= s.nominal_steps else "time_budget"
    if s.cfg.time_budget and s.state.train_seconds >= s.cfg.time_budget:
        return "time_budget"
    if s.signalled:
        return "interrupted"
    return ""


def validate_and_keep_best(s: Session, stopped: str) -> tuple[dict[str, float], str]:
    """Evaluate, let the guard judge (a collapse rolls back, a plateau or a second collapse
    stops, the latter with best/'s weights put back), save `last/` (copied to `best/` when the
    score improved), log; return the evaluation and the stop reason."""
    cfg, state = s.cfg, s.state
    started, s.evaluated_at = time.monotonic(), state.step
    with averaged(s):
        result = _evaluate(s)
    state.eval_seconds += time.monotonic() - started
    state.train_seconds = s.seconds_before + time.monotonic() - s.started  # the evaluation counts
    keep_to_budget(s, time.monotonic() - started)
    score = selection_score(result, cfg.best_metric)
    train_loss = sum(s.losses) / len(s.losses) if s.losses else None
    s.losses.clear()
    verdict = s.guard.judge(Evaluation(step=state.step, score=score, val_loss=result["val_loss"],
                                       train_loss=train_loss, empty_on_defects=result.get("empty_on_defects")))
    improved = state.best_metric is None or score > state.best_metric
    if improved:
        state.best_metric, state.best_step = score, state.step
    if s.metrics:
        s.metrics.log({"step": state.step, "epoch": s.epoch, "seconds": state.train_seconds, "score": score, **result})
        plot_run(s.run_dir)
    s.say(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if verdict.action == "rollback":
        roll_back(s, verdict.reason)
    elif verdict.action == "collapsed":  # a collapsed model is worth nothing: the run ends on best/
        kept = f"; last/ is best/ ({restore_sound(s, spoilt=False)})" if has_checkpoint(s.best_dir) else ""
        event(s, verdict.reason + kept)
        stopped = stopped or "collapsed"
    elif verdict.action == "plateau" and not stopped:
        event(s, verdict.reason)
        stopped = "early_stopping"
    state.stopped = stopped if stopped in GUARD_STOPS else ""
    save(s, improved=improved)
    return result, stopped


#: The share of a run's time evaluations may take: the steps between two evaluations take at
#: least this many times as long as one evaluation.
EVAL_SHARE = 0.1
#: The fewest steps a rate is measured over; fewer are noise, and the whole run's rate is used.
RATE_STEPS = 20
#: How far (a share of the plan) the steps the budget holds may stray before the run is planned
#: again: a measurement's jitter rarely moves the schedule, a machine's change of pace does.
REPLAN = 0.05


def keep_to_budget(s: Session, eval_seconds: float) -> None:
    """After an evaluation that took `eval_seconds`: space evaluations (when their cadence is
    automatic, `eval_every: null`) so that they take at most `EVAL_SHARE` of the time, and with a
    time budget, plan the steps again at the rate measured (evaluations excluded), with room for
    the evaluations still to come at this one's cost, when the budget holds `REPLAN` more or
    fewer than planned: a machine slower than planned still anneals by the deadline, and the
    share the first plan kept back for evaluations (`schedule.PLAN_SHARE`) is spent on steps.
    Both are logged when they change. The rate is that of the steps since the last call when
    there were at least `RATE_STEPS` (else of the whole run), so a machine that slows, or speeds
    up once every picture is cached, is planned at the pace it has now."""
    state, budget = s.state, s.cfg.time_budget
    stepping = state.train_seconds - state.eval_seconds
    since_step, since_seconds = s.paced_from or (0, 0.0)
    if state.step - since_step < RATE_STEPS:
        since_step, since_seconds = 0, 0.0
    step_seconds = max(1e-6, (stepping - since_seconds) / max(1, state.step - since_step))
    s.paced_from = (state.step, stepping)
    spaced = math.ceil(eval_seconds * (1 - EVAL_SHARE) / EVAL_SHARE / step_seconds)
    if s.cfg.eval_every is None and spaced > s.eval_every:
        event(s, f"an evaluation takes {eval_seconds:.0f} s: evaluating every {spaced} steps, not {s.eval_every}")
        s.eval_every = spaced
    if budget:
        fits = plan_steps(nominal=s.nominal_steps, time_budget=budget, seconds_per_step=step_seconds,
                          done_steps=state.step, done_seconds=state.train_seconds,
                          evaluation=(eval_seconds, s.eval_every or s.epoch_length))
        if abs(fits - s.total_steps) > REPLAN * s.total_steps:
            event(s, f"{step_seconds:.2f} s a step, {eval_seconds:.0f} s an evaluation: the budget holds {fits} "
                  f"steps, not {s.total_steps}")
            s.total_steps = state.planned_steps = fits


#: Weight of the val loss in the selection score: it only breaks ties (a run that has found
#: nothing yet scores 0 at every evaluation, and the later, better-fitted one should win).
TIEBREAK = 1e-6


def selection_score(result: dict[str, float], metric: str) -> float:
    """What picks `best/` (higher is better): `map50_f1` = the mean of mAP50 and the best F1
    (mAP50 alone when F1 is missing), `map50`, `map50_95`, or minus the val loss (also when
    no mAP was measured); equal scores are told apart by the lower val loss."""
    if "map50" not in result or metric == "val_loss":
        return -result["val_loss"]
    if metric == "map50_f1":
        score = (result["map50"] + result.get("best_f1", result["map50"])) / 2
    else:
        score = result[metric]
    return score - TIEBREAK * result["val_loss"]


def averaged(s: Session):
    """A context in which the adapter holds the weights a run evaluates and saves: the moving
    average (yielding the raw weights), or, without one, the weights as they are (yielding None)."""
    return s.average.applied() if s.average else nullcontext()


def save(s: Session, *, improved: bool = False) -> None:
    """Save `last/` (and copy it to `best/` if `improved`). Collective: every process calls
    it with its RNG states; only the main process writes. Weights that are not finite are
    never written (the checkpoint there stays), and a full disk says so."""
    from accelerate.utils import gather_object

    rng = gather_object([rng_states()])
    if not s.accelerator.is_main_process:
        return
    if not all(torch.isfinite(p).all() for p in [*s.params, *(s.average.shadow.values() if s.average else ())]):
        raise TrainingDiverged(f"the weights at step {s.state.step} are not finite; {s.last_dir} keeps the last "
                               "finite ones. Lower --lr or use --precision fp32.")
    s.state.guard = s.guard.state()
    try:
        with averaged(s) as raw:
            save_checkpoint(s.last_dir, model=s.adapter, optimizer=s.optimizer, state=s.state, rng=rng,
                            scaler=s.accelerator.scaler, raw=raw)
        if improved:
            copy_checkpoint(s.last_dir, s.best_dir)
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise OSError(err.errno, f"{'the disk is full' if full else err.strerror}: step {s.state.step} was not "
                      f"saved; the checkpoints already in {s.run_dir / 'checkpoints'} are intact (saves replace "
                      "them only once complete). Free some space and resume.") from err


class _signals_saved_as_stops:
    """Within it, SIGINT and SIGTERM ask the loop to stop at the next step boundary (it then
    saves and says how to resume) instead of killing it mid-save; a second one kills as usual."""

    def __init__(self, s: Session) -> None:
        self.s, self.before = s, {}

    def _ask(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.s.signalled:
            signal.signal(number, self.before[number])
            signal.raise_signal(number)
        self.s.signalled = name
        self.s.say(f"{name}: stopping after this step and saving (again to stop at once)")

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.before[number] = signal.signal(number, self._ask)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.before.items():
            signal.signal(number, handler)


# --- the model and how batches reach it ------------------------------------------------------


def training_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The base model of `cfg` (4-bit with `qlora`) with a fresh adapter, set up to train fast
    (`cfg.speed`): its attention kernels, the frozen base in bf16 where the precision resolves
    to bf16-base (`lower_frozen`), LoRA layers in their cheapest exact form (`fold_lora`), and
    on a CPU freed memory kept for reuse (`keep_freed_memory`). Returns `(peft model, processor)`."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if cfg.qlora:
        model, processor = load_quantized_base(cfg.model, dora=cfg.lora.dora)
    else:
        from loomlens.model import load_model

        model, processor = load_model(cfg.model)
    model.set_attn_implementation(attention_implementation(cfg))
    model = apply_lora(model, cfg.lora, vision_frozen_stages=cfg.speed.vision_frozen_stages)
    if (dtype := frozen_dtype(cfg.speed.precision, device)) is not None:  # never with qlora: TrainConfig refuses it
        lower_frozen(model, dtype)
    if cfg.speed.fold_lora:
        fold_lora(model)
    if (gc := cfg.speed.gradient_checkpointing) != "none":
        enable_gradient_checkpointing(model, vision=gc in ("vision", "both"), language=gc in ("language", "both"))
    return model, processor


def attention_implementation(cfg: TrainConfig) -> str:
    """The attention kernels `cfg` trains with: `speed.attention`, where `auto` is eager on a
    CPU (SDPA's bf16 backward is slow on DaViT's small windows: docs/training.md) and SDPA on
    CUDA. The pointer loss reads the cross-attention weights, which only eager returns."""
    on_cpu = resolve_device(cfg.device).type == "cpu"
    if cfg.pointer_weight or (cfg.speed.attention == "auto" and on_cpu):
        return "eager"
    return "sdpa" if cfg.speed.attention == "auto" else cfg.speed.attention


def training_precision(precision: str, device: str | torch.device = "auto") -> str:
    """How a config `precision` trains on `device`: `fp32`, `bf16` or `fp16` (autocast over
    fp32 weights) or `bf16-base` (the frozen base stored in bf16, the adapter in fp32, no
    autocast: `lower_frozen`). `auto` is bf16 (else fp16) on CUDA, bf16 on a CPU with bf16
    instructions and fp32 on other CPUs, where bf16 is emulated and slower; fp16 is CUDA only.
    Why these defaults, measured: docs/training.md."""
    on_cuda = resolve_device(str(device)).type == "cuda"
    if precision == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not on_cuda:
        return "fp32"
    return precision


def mixed_precision(precision: str, device: str | torch.device = "auto") -> str:
    """accelerate's `mixed_precision` (its autocast) for a config `precision` on `device`:
    `no`, `bf16` or `fp16` (`bf16-base` autocasts nothing: its activations are bf16 already)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(training_precision(precision, device), "no")


def frozen_dtype(precision: str, device: str | torch.device = "auto") -> torch.dtype | None:
    """The dtype the frozen base is stored in to train with `precision` (None: as loaded)."""
    return torch.bfloat16 if training_precision(precision, device) == "bf16-base" else None


class BatchPreparer:
    """Collated batch -> the model's inputs, whatever the speed settings: on the device, float
    tensors in the frozen base's dtype when it is stored lower, and cached image features
    (`speed.cache_image_features`) finished (`finish`: the uncached stages) and put in place
    of the image tokens. Batches without cached features (val, workers) pass unchanged."""

    def __init__(self, device, dtype: torch.dtype | None, embeddings=None, image_token_id: int = -1,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.device, self.dtype, self.embeddings = device, dtype, embeddings
        self.image_token_id, self.finish = image_token_id, finish

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, self.dtype) if self.dtype is not None and v.is_floating_point()
                 else v.to(self.device) for k, v in batch.items()}
        if "image_features" not in batch:
            return batch
        if self.finish is not None:
            batch["image_features"] = self.finish(batch["image_features"])
        return with_image_embeds(batch, self.embeddings, self.image_token_id)


def batch_preparer(cfg: TrainConfig, *, adapter, train_set: FlorenceDataset, device,
                   say: Callable[[str], None]) -> BatchPreparer:
    """The `BatchPreparer` of `cfg`; with `speed.cache_image_features`, first encodes every
    training image once into `train_set` (`_image_cache` says what is cached)."""
    dtype = frozen_dtype(cfg.speed.precision, device)  # pixels in the base's dtype when it is stored lower
    if not cfg.speed.cache_image_features:
        return BatchPreparer(device, dtype)
    base = adapter.get_base_model()
    encode, finish, part = _image_cache(adapter, cfg.speed.vision_frozen_stages)
    say(f"encoding {len({ex.image for ex in train_set.examples})} training images once ({part})")
    base.eval()
    train_set.encode_images(lambda pixels: encode(pixels.to(device, dtype)), cfg.eval_batch_size)
    return BatchPreparer(device, dtype, base.get_input_embeddings(), base.config.image_token_id, finish)


def resumed_changes(cfg: TrainConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The settings (dotted name -> (recorded, new)) resuming the run in `run_dir` with `cfg`
    changes from those its `config.yaml` records. A change outside `RESUMABLE` raises
    ValueError naming them and the fix (it would break exact resume); writes nothing, so a
    sweep checks its finished points with it before any point trains."""
    saved = load_recorded(run_dir / "config.yaml", {"out": str(cfg.out)})
    saved = with_micro_batch(saved, recorded_micro_batch(saved))
    changes = changed_settings(saved, cfg)
    refused = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items()
               if k not in RESUMABLE and not (k == "data" and _data_moved(saved.data, cfg.data, run_dir))]
    if refused:
        moved = (f" A data folder that moved is taken when the one recorded is gone and the new one holds the "
                 f"summary.json the run copied ({run_dir / DATA_SUMMARY}).") if "data" in changes else ""
        raise ValueError(f"resuming {run_dir} would change {', '.join(refused)}: exact resume needs the settings its "
                         f"config.yaml records. Drop those options, or start a new run (--out) with them.{moved}")
    return changes


def amend_config(cfg: TrainConfig, run_dir: Path, step: int, *, say: Callable[[str], None]) -> set[str]:
    """Compare a resumed run's settings with those its `config.yaml` records (`resumed_changes`:
    a change outside `RESUMABLE` raises ValueError); allowed ones are recorded in
    `amendments.yaml` with the step they take effect at, and their names returned."""
    changes = resumed_changes(cfg, run_dir)
    if changes and _is_main():
        import yaml

        path = run_dir / "amendments.yaml"
        history = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
        history.append({"step": step, "changes": {k: list(v) for k, v in changes.items()}})
        atomic_write(path, yaml.safe_dump(history, sort_keys=False))
        say(f"from step {step}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
    return set(changes)


def _data_moved(recorded: Path, given: Path, run_dir: Path) -> bool:
    """Whether `given` is the run's data moved from `recorded`: that folder is gone, and `given`
    holds the `summary.json` the run copied at its start (`DATA_SUMMARY`), so the same conversion."""
    copied, summary = run_dir / DATA_SUMMARY, given / "summary.json"
    return (not recorded.exists() and copied.is_file() and summary.is_file()
            and summary.read_bytes() == copied.read_bytes())


def _is_main() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


def _check_run_dir(run_dir: Path, last_dir: Path, resume: bool) -> None:
    """Refuse a run folder that is a file or holds other files than a run's (training would
    write among them), a new run where one is, a resume where none is. A run folder is what
    `Run` finds: one that holds its config.yaml."""
    check_output_folder(run_dir, "--out", "it holds no loomlens run (no config.yaml), and training would write its "
                        "files among these: choose an empty or new folder for the run; to go on with a run, give "
                        "its folder to --resume", ours=lambda folder: Run(folder).folder == folder)
    if resume:
        if not has_checkpoint(last_dir):
            raise FileNotFoundError(f"nothing to resume: {last_dir} has no checkpoint")
    elif last_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick a new --out")


def _check_data(cfg: TrainConfig, *, resume: bool = False) -> None:
    """Before the model loads: the data folder holds a train split with a sample in it, and the
    run does not write into it (its classes.txt and summary.json would be copied onto
    themselves). A resumed run's folder that is gone is named as the run's, with how to give its
    new place. The samples themselves are checked with the dataset (`validate_split`)."""
    train = cfg.data / "train.jsonl"
    if resume and not cfg.data.exists():
        raise FileNotFoundError(f"the data folder this run was trained on, {cfg.data} (its config.yaml's data), "
                                f"is gone: if it moved, resume with its new place, `loomlens train --resume {cfg.out} "
                                "data=NEW_FOLDER`")
    if not train.is_file():
        raise FileNotFoundError(f"no training split at {train}; "
                                + (unconverted(cfg.data) or f"make one with `loomlens convert SRC {cfg.data}`"))
    with open(train, encoding="utf-8", errors="replace") as f:
        if not any(line.strip() for line in f):  # stops at the first sample
            raise ValueError(f"{train} holds no samples: convert the data again (`loomlens convert SRC {cfg.data}`), "
                             "and check that its split left images in train (--val-fraction, --test-fraction, or "
                             "the dataset's own train/ split; --resplit draws a new one)")
    check_out_not_data(cfg.out, cfg.data)


def check_out_not_data(out: Path, data: Path, what: str = "the run") -> None:
    """Raise FileExistsError when `--out` of `what` (a run, a sweep) is the data folder: its
    files would land among the data's (a run's classes.txt and summary.json copied onto the
    data's own, a sweep's runs and table). Checked before anything trains."""
    if Path(out).resolve() == Path(data).resolve():
        raise FileExistsError(f"--out {out} is the data folder; give {what} a folder of its own")


def _check_classes(cfg: TrainConfig, train_set: FlorenceDataset) -> None:
    """Refuse training samples with boxes of a class the data's `classes.txt` does not list:
    the run copies that list, and eval, predict and the line decode answers through it, so such a
    class could be learnt and never be answered."""
    listed = read_class_names(cfg.data / CLASSES_FILE)
    unlisted = sorted(frozenset().union(*(c for c in train_set.classes if c)) - set(listed)) if listed else []
    if unlisted:
        raise ValueError(f"{cfg.data / 'train.jsonl'} has boxes of {', '.join(map(repr, unlisted))}, which "
                         f"{cfg.data / CLASSES_FILE} does not list; add them to it, or convert the data again")


def _image_cache(model, frozen_stages: int):
    """`(encode, finish, what)` for cache_image_features: `encode(pixels)` is what each image
    caches, `finish(cached)` (None: nothing) turns a batch of it into image features every
    step, `what` says which part is cached. A fully frozen vision side caches its image
    features; otherwise its first `frozen_stages` DaViT stages (`speed.vision_frozen_stages`)
    are cached and the rest runs, adapters and all. Raises ValueError when neither is frozen."""
    base = model.get_base_model()
    if frozen_stages == 0 or not _moving_image_side(model):
        _check_frozen_image_side(model)
        return (lambda pixels: base.model.get_image_features(pixels).pooler_output), None, "frozen vision side"
    if frozen_stages >= stage_count(model):
        raise ValueError(f"speed.vision_frozen_stages {frozen_stages} freezes every DaViT stage, but the projector "
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
            "(speed.vision_frozen_stages=N)"
        )


def _has_samples(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


@torch.no_grad()
def _evaluate(s: Session) -> dict[str, float]:
    """Val loss (sharded over processes) on a fixed subset, and val mAP50 on the main process
    via `loomlens.evaluate.evaluate_jsonl`; leaves the RNG states and the attention
    implementation as it found them, so evaluating never changes the weights a run reaches."""
    model, accelerator, cfg = s.adapter, s.accelerator, s.cfg
    found, attention = rng_states(), model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # no attention weights needed here: the fast kernel
    model.eval()
    subset = torch.randperm(len(s.val_set), generator=torch.Generator().manual_seed(0)).tolist()
    subset = subset[: cfg.val_loss_max_samples]
    lengths = [s.val_set.lengths[i] for i in subset]
    batches = plan_batches(["val"] * len(subset), lengths, cfg.eval_batch_size, "interleaved", shuffle=False)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    for idx in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = s.prepare(s.collate([s.val_set[subset[i]] for i in idx]))
        part, count = batch_loss(model, batch, s.spec.plain)
        loss_sum, tokens = loss_sum + part, tokens + count
    result = {"val_loss": (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum")).item()}
    if accelerator.is_main_process:
        run = Run(s.run_dir)
        # A cropping run's val frames are whole; data cut into tiles holds its val tiles already,
        # and tiling its whole frames too would cost each evaluation ~20 passes a line-scan strip.
        result.update(_detection_metrics(model, s.processor, s.val_set.jsonl, cfg, run.tile if run.crop else None,
                                         max_boxes=max(MAX_BOXES, run.most_boxes or 0, s.train_set.most_boxes)))
    accelerator.wait_for_everyone()
    model.set_attn_implementation(attention)
    model.train()
    set_rng_states(found)
    return result


def _detection_metrics(model, processor, jsonl: Path, cfg: TrainConfig, tile: int | None, max_boxes: int
                       ) -> dict[str, float]:
    """mAP50 (and friends) of the `<OD>` val samples, frames longer than `tile` tiled as the run
    will predict them (`Run.tile`, for a cropping run), reading up to `max_boxes` an image (the
    most a training frame holds, or 20: a dense frame's recall is not capped); empty when
    `eval_max_images` is 0."""
    if cfg.eval_max_images == 0:
        return {}
    from loomlens.evaluate import evaluate_jsonl
    metrics = evaluate_jsonl(model, processor, jsonl, max_images=cfg.eval_max_images, batch_size=cfg.eval_batch_size,
                             tile=tile, max_boxes=max_boxes)
    keys = ("map50", "map50_95", "map75", "best_f1", "empty_on_defects")
    found = {k: float(metrics[k]) for k in keys if metrics.get(k) is not None}
    auroc = metrics["image_level"]["auroc"]  # OK/NG by the answer probability: None without good or bad frames
    return found if auroc is None else {**found, "auroc": float(auroc)}


def _write_run_files(cfg: TrainConfig, run_dir: Path, world: int, crop_window: int | None) -> None:
    """`config.yaml` (resolved), `env.json` (versions, git commit, device), `crop.json` with the
    defect crop's `crop_window` when it crops (prediction and evaluation tile at it; none
    otherwise), and from the data folder `classes.txt` and `summary.json` (as
    `data_summary.json`: prediction reads the tile size the data was cut to from it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    if not (run_dir / "env.json").exists():  # the run's first environment; a resume keeps it
        atomic_write(run_dir / "env.json", json.dumps(environment(world), indent=2) + "\n")
    if crop_window:
        atomic_write(run_dir / CROP, json.dumps({"window": crop_window}) + "\n")
    else:
        (run_dir / CROP).unlink(missing_ok=True)  # an earlier attempt's record in this folder
    for name, copy in ((CLASSES_FILE, CLASSES_FILE), ("summary.json", DATA_SUMMARY)):
        if (cfg.data / name).exists():
            atomic_copy(cfg.data / name, run_dir / copy)


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
