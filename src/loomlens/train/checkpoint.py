"""Checkpoints that resume exactly, are never half-written, and never run code when read.

A fine-tuning checkpoint folder is a peft adapter (`adapter_config.json`,
`adapter_model.safetensors`) plus the trainer state: the loop's counters, optimizer, grad-scaler
and every process's RNG states (the learning rate is a function of the counters; see
`schedule.py`). State is stored without pickle, so a run folder from someone else cannot run
code on `--resume`: its tensors in `trainer_state.safetensors`, everything else (numbers,
lists, strings) in `trainer_state.json`, each tensor there replaced by `{"tensor": KEY}`.

A folder is written to a hidden temporary folder first and then swapped in by renames: `last/`
is always either the previous complete checkpoint or the new complete one. If a kill lands
between the two renames, `recover_folder` puts the previous one back (`data.atomic`).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loomlens.data.atomic import recover_folder, write_folder

#: The trainer state of a checkpoint: STATE_NAME.json and STATE_NAME.safetensors.
STATE_NAME = "trainer_state"
STATE_FILE = f"{STATE_NAME}.json"
#: What loomlens before the pickle-free format wrote instead (read with torch's safe loader).
LEGACY_STATE_FILE = f"{STATE_NAME}.pt"


class UnsafeCheckpointError(ValueError):
    """A state file holds something other than plain tensors and numbers (a pickle that would
    build arbitrary objects): it is refused, never executed."""


@dataclass
class TrainerState:
    """Where the loop is: optimizer steps done, epoch, accumulation windows done in it, the
    best evaluation so far (higher is better), the steps planned for the run, the seconds spent
    evaluating, the learning-rate
    factor left by rollbacks, the guard's state (`loomlens.train.guard`) and, once the guard has
    ended the run (`early_stopping`, `collapsed`), why: a resume does not train past that."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    planned_steps: int | None = None
    eval_seconds: float = 0.0
    lr_scale: float = 1.0
    guard: dict = field(default_factory=dict)
    stopped: str = ""
    planned_for: dict = field(default_factory=dict)  # the length settings `planned_steps` was planned for

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainerState:
        """The state a checkpoint recorded, less the keys older versions wrote that no longer
        mean anything (`RETIRED_STATE_KEYS`); any other unknown key is an error."""
        return cls(**{k: v for k, v in saved.items() if k not in RETIRED_STATE_KEYS})


#: Trainer-state keys older loomlens versions wrote and this one ignores, so their checkpoints
#: still resume. `evals_since_best`: the guard's history counts evaluations without progress.
RETIRED_STATE_KEYS = frozenset({"evals_since_best"})


def rng_states() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as lists, numbers and uint8
    tensors (storable by `write_state`)."""
    version, internal, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {**numpy, "state": {"key": numpy["state"]["key"].tolist(), "pos": numpy["state"]["pos"]}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (also after a `write_state`/`read_state` round trip)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    key = np.asarray(numpy["state"]["key"], dtype=np.uint32)
    np.random.set_state({**numpy, "state": {"key": key, "pos": numpy["state"]["pos"]}})
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor moved into `tensors` (under its path `key`) and replaced by a
    `{"tensor": key}` marker; dict keys become strings, tuples lists."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().clone().contiguous()  # a copy: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo `_split`: markers back to their tensors."""
    if isinstance(value, dict):
        if value.keys() == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def write_state(folder: Path, name: str, payload: dict[str, Any]) -> None:
    """Write `payload` (nested dicts/lists of tensors, numbers, strings, None) as
    `folder/name.safetensors` (the tensors) and `folder/name.json` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    plain = _split(payload, "", tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(plain))


def read_state(folder: Path, name: str) -> dict[str, Any]:
    """What `write_state(folder, name, ...)` wrote, tensors on the CPU. Reads no pickle."""
    from safetensors.torch import load_file

    return _join(json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors"))


def read_legacy_state(path: Path) -> dict[str, Any]:
    """A state file of an older loomlens (`torch.save`, a pickle), read with torch's
    `weights_only` loader, which builds only tensors, numbers, containers and the NumPy arrays
    allowed here. Raises `UnsafeCheckpointError` naming `path` for anything else."""
    reconstruct = np.ndarray(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
    allowed = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, or others for a mangled file
        raise UnsafeCheckpointError(
            f"refusing to read {path}: it is a pickle holding more than tensors and numbers ({type(err).__name__}), "
            "and loomlens never unpickles objects from a run folder (they can run code). If the run is yours, "
            "start a fresh run from its adapter; a checkpoint written by this loomlens has a "
            f"{STATE_FILE} instead."
        ) from None
    saved["rng"] = [{**states, "numpy": _numpy_state_from_tuple(states["numpy"])} for states in saved["rng"]]
    return saved


def _numpy_state_from_tuple(legacy: tuple) -> dict[str, Any]:
    """NumPy's tuple RNG state (`get_state()`) in the dict form `rng_states` stores."""
    name, key, pos, has_gauss, gauss = legacy
    return {"bit_generator": name, "state": {"key": key.tolist(), "pos": pos}, "has_gauss": has_gauss, "gauss": gauss}


def optimizer_payload(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict, storable by `write_state`."""
    saved = optimizer.state_dict()
    return {"state": saved["state"], "param_groups": saved["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load what `optimizer_payload` gave (after a round trip: parameter ids back to ints)."""
    state = {int(k): v for k, v in saved["state"].items()}
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    path: Path, *, model, optimizer: torch.optim.Optimizer, state: TrainerState, rng: list[dict[str, Any]],
    scaler=None, raw: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter of peft `model` and the trainer state to `path`, atomically.
    `rng` holds every process's `rng_states()`, indexed by rank; `raw`, when the adapter holds
    averaged weights (`average.py`), the weights training goes on from."""

    def fill(tmp: Path) -> None:
        # The untied lm_head copy is rebuilt from the base by `load_adapter`: keep the adapter small.
        model.save_pretrained(tmp, save_embedding_layers=False)
        write_state(tmp, STATE_NAME, {
            "state": asdict(state),
            "optimizer": optimizer_payload(optimizer),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "raw": raw,
        })

    write_folder(path, fill)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder (`last` -> `best`) with the same atomic swap."""
    write_folder(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def has_checkpoint(path: Path) -> bool:
    """Whether `path` holds a trainer state (this format, or an older loomlens's)."""
    return (path / STATE_FILE).exists() or (path / LEGACY_STATE_FILE).exists()


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state saved in checkpoint folder `path`: `state`, `optimizer`, `scaler`,
    `rng`. Raises FileNotFoundError when there is none, `UnsafeCheckpointError` for a pickle
    that is more than tensors and numbers."""
    if (path / STATE_FILE).exists():
        return read_state(path, STATE_NAME)
    if (path / LEGACY_STATE_FILE).exists():
        return read_legacy_state(path / LEGACY_STATE_FILE)
    raise FileNotFoundError(f"{path} is not a loomlens checkpoint: it has no {STATE_FILE}")


def load_checkpoint(
    path: Path, *, model, optimizer: torch.optim.Optimizer, rank: int = 0, scaler=None, average=None
) -> TrainerState:
    """Load the adapter weights into peft `model` and the optimizer, scaler and this
    rank's RNG states from `path`; return the loop's `TrainerState`. With a `WeightAverage`,
    the adapter becomes the average and the raw weights saved beside it the weights (a
    checkpoint without them, or from a run without averaging, starts both at the adapter)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    recover_folder(path)
    saved = read_trainer_state(path)
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    if average is not None:
        average.load_raw(saved.get("raw"))
    load_optimizer(optimizer, saved["optimizer"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]
    set_rng_states(rng[rank] if rank < len(rng) else rng[0])
    return TrainerState.from_saved(saved["state"])
