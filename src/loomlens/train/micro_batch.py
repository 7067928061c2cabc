"""Micro-batches: a planned batch in as many forward + backward passes as memory needs.

`speed.micro_batch` changes only how many samples one pass takes: the batch plan, the step count
and the learning-rate schedule stay those of `batch_size` (the loss is divided by the whole
step's token count, so the gradient is the same up to rounding). `auto` probes on CUDA with the
most demanding samples (`model.memory.find_micro_batch`); a CPU takes whole batches. A pass that
still runs out of memory later (fragmentation, another process on the card) halves the size for
the rest of the run (`cut_pieces`, `model.memory.smaller_micro_batch`; the loop's `forward_backward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from loomlens.config import TrainConfig, load_recorded
from loomlens.data.dataset import FlorenceDataset
from loomlens.model.memory import find_micro_batch
from loomlens.train.checkpoint import rng_states, set_rng_states
from loomlens.train.loss import batch_loss

if TYPE_CHECKING:
    from loomlens.train.recipe import Session


def split_batch(idx: list[int], size: int) -> list[list[int]]:
    """`idx` cut, in order, into pieces of `size` samples (the last one may be shorter).

    Args:
        idx: a planned batch's sample indices.
        size: samples per piece (the micro-batch).

    Returns:
        The pieces; together they hold `idx` exactly once.
    """
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def cut_pieces(micro: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, torch.Tensor]]:
    """Collated micro-batches cut, in order, into pieces of at most `size` samples.

    Args:
        micro: collated batches (`data.dataset.Collator`): every value has the sample on its first axis.
        size: samples per piece.

    Returns:
        The same samples in the same order. A batch no larger than `size` comes back as it is;
        a larger one's pieces keep its padding, which carries no loss and no attention.
    """
    return [batch if len(batch["labels"]) <= size else {k: v[i : i + size] for k, v in batch.items()}
            for batch in micro for i in range(0, len(batch["labels"]), size)]


def settle_micro_batch(s: Session, *, resume: bool) -> TrainConfig:
    """Resolve `speed.micro_batch` to a number of samples, and say which and why.

    Args:
        s: the session being set up: model prepared, data loaded, no step made yet.
        resume: whether the run resumes. `auto` then takes the size its `config.yaml` records
            (`recorded_micro_batch`) and nothing is probed, so the resumed steps are split as
            the first ones were.

    Returns:
        `s.cfg` with `speed.micro_batch` a divisor of `batch_size` (what `config.yaml` records).
        `auto` on a new run is the whole batch on a CPU, and on CUDA the largest size whose
        forward and backward fit (`probe_micro_batch`). Batch plan, steps and schedule are
        those of `batch_size` whatever the size: only the passes per batch change.
    """
    cfg = s.cfg
    batch, asked, device = cfg.batch_size, cfg.speed.micro_batch, s.accelerator.device
    recorded = None
    if resume:
        recorded = recorded_micro_batch(load_recorded(cfg.out / "config.yaml", {"out": str(cfg.out)}))
    if asked != "auto":  # on resume, another size than the recorded one is an amendment (`amend_config`)
        size, why = asked, "recorded by the run" if asked == recorded else "speed.micro_batch"
    elif recorded is not None:
        size, why = recorded, "recorded by the run"
    else:
        size = probe_micro_batch(s)
        why = (f"auto: {batch} samples did not fit on {device}" if size < batch else
               f"auto: {batch} samples fit on {device}" if device.type == "cuda" else f"auto: no probe on {device}")
    passes = "whole batches" if size == batch else \
        f"each batch of {batch} in {batch // size} passes, gradients accumulated"
    s.say(f"micro-batch {size} ({why}): {passes}; "
          f"{batch * cfg.grad_accum * s.accelerator.num_processes} samples an optimizer step")
    return with_micro_batch(cfg, size)


def probe_micro_batch(s: Session) -> int:
    """The largest micro-batch that trains on every process's device.

    Args:
        s: the session being set up (no step made yet).

    Returns:
        A divisor of `batch_size` (`model.memory.find_micro_batch`: on CUDA tried from the whole
        batch down on the most demanding samples, halving on out-of-memory; on a CPU the whole
        batch, untried), the smallest over all processes. The model is in training mode for the
        probe (dropout and gradient checkpointing as in the loop); the RNG states, the gradients
        and the mode are put back.
    """
    from accelerate.utils import gather_object

    found, training = rng_states(), s.model.training
    s.model.train()
    try:
        size = find_micro_batch(probe_step(s), s.cfg.batch_size, s.accelerator.device).size
    finally:
        s.model.train(training)
        set_rng_states(found)
    return min(gather_object([size]))


def probe_step(s: Session) -> Callable[[int], None]:
    """What `find_micro_batch` tries.

    Args:
        s: the session being set up.

    Returns:
        `step(size)`: one forward + backward of the `size` training samples that pad to the
        largest batch (`longest_samples`), the gradients cleared after. Nothing is synchronised
        between processes (each may try other sizes).
    """
    order = longest_samples(s.train_set, s.cfg.batch_size)

    def step(size: int) -> None:
        try:
            with s.accelerator.no_sync(s.model):
                batch = s.prepare(s.collate([s.train_set[i] for i in order[:size]]))
                loss, _ = batch_loss(s.model, batch, s.spec)
                s.accelerator.backward(loss)
        finally:
            s.optimizer.zero_grad(set_to_none=True)

    return step


def longest_samples(train_set: FlorenceDataset, count: int) -> list[int]:
    """The samples a worst-case batch of `count` is made of.

    Args:
        train_set: the training samples.
        count: samples wanted (all of them when the set is smaller).

    Returns:
        Sample indices, most demanding first: with room for two, the longest prompt and the
        longest answer (a batch is padded to both), then by prompt + answer tokens, longest
        first. Any first two or more of them make a batch padded as wide as any batch can be.
    """
    examples, lengths = train_set.examples, train_set.lengths
    by_length = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    extremes: list[int] = []
    if count > 1:
        extremes = [max(by_length, key=lambda i: len(examples[i].input_ids)),
                    max(by_length, key=lambda i: len(examples[i].labels))]
    return list(dict.fromkeys(extremes + by_length))[:count]


def recorded_micro_batch(saved: TrainConfig) -> int:
    """The micro-batch a run trained with.

    Args:
        saved: the run's recorded config (its `config.yaml`).

    Returns:
        Its `speed.micro_batch`, or `batch_size` when that holds `auto` (a run recorded before
        the setting existed: it trained whole batches).
    """
    size = saved.speed.micro_batch
    return size if isinstance(size, int) else saved.batch_size


def with_micro_batch(cfg: TrainConfig, size: int) -> TrainConfig:
    """`cfg` with another micro-batch.

    Args:
        cfg: a training config (left as it is).
        size: the micro-batch, in samples.

    Returns:
        A copy of `cfg` whose `speed.micro_batch` is `size`.
    """
    return cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"micro_batch": size})})
