"""A model ready to answer: base (+ a run's adapter) loaded, the adapter merged into the
weights, the weights cast once to the precision the machine computes fastest, and on a CPU each
attention call on its fastest kernel (`infer/attention.py`) and freed memory kept for reuse
(`model.runtime.keep_freed_memory`: fewer page faults per image).

In: a base name and/or a run (`loomlens.run.Run`: run folder, checkpoint or adapter folder), a
device and a precision. Out: a `LoadedModel` (model, processor, and what the run says: classes,
trained tasks, tile size). Merging pays on a CPU, where an unmerged LoRA layer computes x A B
beside x W; bf16 weights pay where the hardware has bf16, and the model was trained under bf16
autocast, so bf16 is not a new condition for it. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Literal

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loomlens.data.tasks import TASKS
from loomlens.data.yolo import CLASSES_FILE, read_class_names
from loomlens.infer.attention import use_shape_aware_attention
from loomlens.infer.generation import MAX_BOXES
from loomlens.model import load_model
from loomlens.model.loader import EMBEDDED, adapter_base, resolve_model_path
from loomlens.model.merge import read_merge_record
from loomlens.model.runtime import cpu_has_bf16, keep_freed_memory
from loomlens.run import RULES_FILE, Run

__all__ = [
    "PRECISIONS", "LoadedModel", "Precision", "base_tasks", "load_for_inference", "ready_for_inference",
    "resolve_precision",
]

#: What an inference `precision` may be: `auto` resolves to one of the other two.
PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["fp32", "bf16"]


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> Precision:
    """The weights' precision for `precision` on `device`: `fp32` and `bf16` as given; `auto`
    is bf16 on a CUDA GPU that supports it and on a CPU with bf16 instructions, else fp32
    (elsewhere bf16 is emulated and slower). Raises ValueError for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"


def ready_for_inference(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """`model` in eval mode with any peft adapter merged into its weights (the peft wrapper
    removed), its weights cast to `precision` and, on a CPU, shape-aware attention (measured
    there only). Returns the model to use from then on."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if next(model.parameters()).device.type == "cpu":
        use_shape_aware_attention(model)
    return model.eval()


@dataclass
class LoadedModel:
    """A model ready for inference and what is known about it: `base` (name given to the
    loader), `adapter` (folder or None), `run` (the run folder or None), `classes` (from the
    run, may be empty), `trained_tasks` (tasks base or adapter was trained for), `tile_size`
    (`Run.tile`: the tile edge the run's data was cut to by `convert --tile`, else its defect
    crop's window, else None), `views` (`Run.views`: the mirrors it was trained on), `precision`
    (the weights' dtype once made ready for inference, else None), `rules` (the run's
    region rules file, else None) and `max_boxes` (the boxes an answer is read for by default:
    as many as one image of the run's data holds, `Run.most_boxes`, and at least `MAX_BOXES`)."""

    model: object
    processor: object
    base: str
    adapter: Path | None = None
    run: Path | None = None
    classes: list[str] = field(default_factory=list)
    trained_tasks: frozenset[str] = frozenset()
    tile_size: int | None = None
    precision: str | None = None
    rules: Path | None = None
    views: tuple[str, ...] = ("",)
    max_boxes: int = MAX_BOXES


def base_tasks(base: str) -> frozenset[str]:
    """Tasks the base model was trained for. Microsoft's checkpoints: every task loomlens
    offers. An embedded model (tiny, tiny-hr): those its pretraining record
    (`pretrain_config.json`) lists, none when there is no record (placeholder weights)."""
    folder = Path(resolve_model_path(base))
    if folder.resolve() not in {e.folder.resolve() for e in EMBEDDED.values()}:
        return frozenset(TASKS)
    record = folder / "pretrain_config.json"
    if not record.exists():
        return frozenset()
    return frozenset(json.loads(record.read_text()).get("task_mix", {}))


def load_for_inference(
    *, model: str | None = None, adapter: str | Path | None = None, checkpoint: str = "best", device: str = "cpu",
    precision: str | None = None,
) -> LoadedModel:
    """Load `model` (None: the adapter's base, else "tiny") and attach the adapter of
    `adapter` (a run folder, a checkpoint in it or an adapter folder; `checkpoint` best | last).

    `precision` (auto | fp32 | bf16) makes the model ready to answer as `loomlens predict`
    runs it (adapter merged, weights cast); None leaves it as loaded, the adapter attached
    unmerged. On a CPU the process keeps freed memory for reuse from here on, whatever the
    precision (`model.runtime.keep_freed_memory`). Raises ValueError for an unknown precision,
    and when `model` is given and differs from the base the adapter was trained on, since the
    adapter's shapes would not fit; FileNotFoundError when `adapter` holds no adapter.
    """
    dtype = resolve_precision(precision, device) if precision is not None else None
    if str(device).startswith("cpu"):
        keep_freed_memory()
    loaded = _load(model, Run(adapter), checkpoint, device) if adapter is not None else _load_base(model, device)
    if dtype is not None:
        loaded.model, loaded.precision = ready_for_inference(loaded.model, dtype), dtype
    return loaded


def _load_base(model: str | None, device: str) -> LoadedModel:
    """A base model (`tiny` when None), no adapter. A merged one (`loomlens merge`) keeps what
    its run said (classes, tasks, tile edge, mirrors, box budget, region rules), so it answers
    as `--adapter RUN` did; one merged before that record was kept keeps its classes."""
    name = model or "tiny"
    net, processor = load_model(name, device=device)
    folder = Path(resolve_model_path(name))
    classes = read_class_names(folder / CLASSES_FILE)  # [] without the file
    merged = read_merge_record(folder)
    run = merged.get("run")
    if run is None:
        return LoadedModel(net, processor, name, trained_tasks=base_tasks(name), classes=classes)
    rules = folder / RULES_FILE
    return LoadedModel(
        net, processor, name, classes=classes, trained_tasks=base_tasks(merged["base"]) | set(run["tasks"]),
        tile_size=run["tile"], rules=rules if rules.exists() else None, views=tuple(run["views"]),
        max_boxes=max(MAX_BOXES, run["most_boxes"] or 0),
    )


def _load(model: str | None, run: Run, checkpoint: str, device: str) -> LoadedModel:
    """Base + the run's adapter, unmerged, with what the run says about itself."""
    from loomlens.model.lora import load_adapter

    folder = run.adapter(checkpoint)
    name = adapter_base(run.base, model, folder) if run.base is not None else model or "tiny"
    net, processor = load_model(name, device=device)
    net = load_adapter(net, folder)
    return LoadedModel(
        net, processor, name, adapter=folder, run=run.folder, classes=run.classes,
        trained_tasks=base_tasks(name) | run.tasks, tile_size=run.tile, rules=run.rules,
        views=run.views, max_boxes=max(MAX_BOXES, run.most_boxes or 0),
    )
