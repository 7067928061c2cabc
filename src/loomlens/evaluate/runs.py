"""Open a model for inference: a base model, optionally with the LoRA adapter of a training run.

A run folder (see docs/architecture.md) holds `config.yaml` (its `model` is the base it was
trained on, its `tasks` what it was trained for), `classes.txt`, `data_summary.json` (the
training data's `summary.json`, with the tile size it was cut to) and `checkpoints/best|last/`
(each a peft adapter folder). `adapter` may name the run folder, a checkpoint inside it, or
any adapter folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loomlens.evaluate.report import read_class_names
from loomlens.model import load_model
from loomlens.model.inference import ready_for_inference, resolve_precision
from loomlens.model.loader import TINY_DIR, resolve_model_path

#: Every task name loomlens exposes (the Prediction contract).
ALL_TASKS = (
    "od", "caption", "detailed_caption", "more_detailed_caption", "dense_region_caption",
    "phrase_grounding", "referring_expression_segmentation", "region_to_segmentation",
    "region_to_category", "ocr", "ocr_with_region",
)
#: The training data's summary.json, as a run keeps it.
DATA_SUMMARY = "data_summary.json"


@dataclass
class LoadedModel:
    """A model ready for inference and what is known about it: `base` (name given to the
    loader), `adapter` (folder or None), `run` (the run folder or None), `classes` (from the
    run, may be empty), `trained_tasks` (tasks base or adapter was trained for) and
    `tile_size` (the tile edge the run's data was cut to by `convert --tile`, else None) and
    `precision` (the weights' dtype once made ready for inference, else None)."""

    model: object
    processor: object
    base: str
    adapter: Path | None = None
    run: Path | None = None
    classes: list[str] = field(default_factory=list)
    trained_tasks: frozenset[str] = frozenset()
    tile_size: int | None = None
    precision: str | None = None


def find_adapter(path: str | Path, checkpoint: str = "best") -> Path:
    """The adapter folder meant by `path`: itself if it holds `adapter_config.json`, else
    `path/checkpoints/<checkpoint>` (a run folder). Raises FileNotFoundError with the fix."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / checkpoint):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"no adapter at {path}: expected adapter_config.json there or in checkpoints/{checkpoint}/ "
        "(train one with `loomlens train`)"
    )


def run_folder(adapter: Path) -> Path | None:
    """The run folder an adapter belongs to (the nearest parent with config.yaml), if any."""
    for parent in (adapter, *adapter.parents[:3]):
        if (parent / "config.yaml").exists():
            return parent
    return None


def base_tasks(base: str) -> frozenset[str]:
    """Tasks the base model was trained for. Microsoft's checkpoints: all of them. The
    embedded tiny model: those its pretraining record (`pretrain_config.json`) lists, none
    when there is no record (placeholder weights)."""
    folder = Path(resolve_model_path(base))
    if folder.resolve() != TINY_DIR.resolve():
        return frozenset(ALL_TASKS)
    record = folder / "pretrain_config.json"
    if not record.exists():
        return frozenset()
    return frozenset(json.loads(record.read_text()).get("task_mix", {}))


def _run_tasks(config: dict, run: Path) -> frozenset[str]:
    """Tasks a run trained: its config's `tasks`, or (empty = all in the data) the tasks
    found in its training JSONL."""
    if config.get("tasks"):
        return frozenset(config["tasks"])
    data = Path(config.get("data") or "")
    train = data if data.is_absolute() else Path.cwd() / data
    if (train / "train.jsonl").exists():
        with open(train / "train.jsonl", encoding="utf-8") as f:
            return frozenset(json.loads(line).get("task", "od") for line in f if line.strip())
    return frozenset({"od"})


def load_for_inference(
    model: str | None = None, adapter: str | Path | None = None, checkpoint: str = "best", device: str = "cpu",
    precision: str | None = None,
) -> LoadedModel:
    """Load `model` (None: the adapter's base, else "tiny") and attach `adapter` if given.

    `precision` (auto | fp32 | bf16) makes the model ready to answer as `loomlens predict`
    runs it (`loomlens.model.inference`: adapter merged, weights cast); None leaves it as
    loaded, the adapter attached unmerged. Raises ValueError for an unknown precision, and
    when `model` is given and differs from the base the adapter was trained on, since the
    adapter's shapes would not fit.
    """
    dtype = resolve_precision(precision, device) if precision is not None else None
    loaded = _load(model, adapter, checkpoint, device)
    if dtype is not None:
        loaded.model, loaded.precision = ready_for_inference(loaded.model, dtype), dtype
    return loaded


def _load(model: str | None, adapter: str | Path | None, checkpoint: str, device: str) -> LoadedModel:
    if adapter is None:
        name = model or "tiny"
        net, processor = load_model(name, device=device)
        return LoadedModel(net, processor, name, trained_tasks=base_tasks(name))

    from loomlens.model.lora import load_adapter

    folder = find_adapter(adapter, checkpoint)
    run = run_folder(folder)
    config = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if run else {}
    trained_on = config.get("model")
    if model is not None and trained_on is not None and model != trained_on:
        raise ValueError(f"adapter {folder} was trained on base {trained_on!r}, not {model!r}; drop --model")
    name = model or trained_on or "tiny"
    net, processor = load_model(name, device=device)
    net = load_adapter(net, folder)
    classes = read_class_names(run / "classes.txt") if run else []
    tasks = base_tasks(name) | (_run_tasks(config, run) if run else frozenset({"od"}))
    return LoadedModel(net, processor, name, folder, run, classes, tasks, _run_tile(run) if run else None)


def _run_tile(run: Path) -> int | None:
    """The tile size the run's training data was cut to (`convert --tile`), if any."""
    summary = run / DATA_SUMMARY
    return json.loads(summary.read_text()).get("tile") if summary.exists() else None
