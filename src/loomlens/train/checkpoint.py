"""Checkpoints that resume exactly and are never half-written.

A checkpoint folder is a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) plus
`trainer_state.pt`: the loop's counters, optimizer, grad-scaler and every process's RNG states
(the learning rate is a function of the counters; see `schedule.py`). It is written to a
hidden temporary folder first and then swapped in by renames: `last/` is always either the
previous complete checkpoint or the new complete one. If a kill lands between the two renames,
`recover` puts the previous one back.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainerState:
    """Where the loop is: optimizer steps done, epoch, accumulation windows done in it, and
    the best evaluation so far (higher is better)."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    train_seconds: float = 0.0


def rng_states() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _temporary(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}"


def _swap_in(tmp: Path, path: Path) -> None:
    old = _temporary(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path) -> None:
    """Undo a swap cut short by a kill: put the previous checkpoint back if `path` is missing."""
    old = _temporary(path, "old")
    if not path.exists() and old.exists():
        os.rename(old, path)


def save_checkpoint(
    path: Path,
    model,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    rng: list[dict[str, Any]],
    scaler=None,
) -> None:
    """Write the adapter of peft `model` and the trainer state to `path`, atomically.
    `rng` holds every process's `rng_states()`, indexed by rank."""
    tmp = _temporary(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The untied lm_head copy is rebuilt from the base by `load_adapter`: keep the adapter small.
    model.save_pretrained(tmp, save_embedding_layers=False)
    torch.save(
        {
            "state": asdict(state),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        },
        tmp / STATE_FILE,
    )
    _swap_in(tmp, path)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder (`last` -> `best`) with the same atomic swap."""
    tmp = _temporary(dst, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _swap_in(tmp, dst)


def load_checkpoint(
    path: Path, model, optimizer: torch.optim.Optimizer, rank: int = 0, scaler=None
) -> TrainerState:
    """Load the adapter weights into peft `model` and the optimizer, scaler and this
    rank's RNG states from `path`; return the loop's `TrainerState`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    recover(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a loomlens checkpoint: it has no {STATE_FILE}")
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    set_rng_states(rng[rank] if rank < len(rng) else rng[0])
    return TrainerState(**saved["state"])
