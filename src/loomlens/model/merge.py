"""Merge a LoRA/DoRA adapter into its base: a plain Florence-2 folder, no peft or loomlens.

The result loads with `Florence2ForConditionalGeneration.from_pretrained(OUT)` and
`AutoProcessor.from_pretrained(OUT)` and computes what base + adapter computes. An adapter on
`lm_head` was trained on an untied copy of the embedding (see `loomlens.model.lora`), so the
merged folder stores `lm_head` separately with `tie_word_embeddings: false`; the input
embeddings stay the base's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loomlens.data.yolo import CLASSES_FILE
from loomlens.model.loader import load_model
from loomlens.model.lora import load_adapter
from loomlens.run import Run

#: Written into every merged folder: provenance, and the mark that lets a re-merge replace it.
MARKER = "loomlens_merge.json"


def merge_adapter(path: str | Path, out: str | Path, checkpoint: str = "best", base: str | None = None) -> Path:
    """Merge the adapter of `path` (a run folder, a checkpoint in it or an adapter folder, read
    through `loomlens.run.Run`) into its base model and save the merged model, processor,
    tokenizer and the run's classes to `out` (safetensors). `base` overrides the base model
    recorded with the adapter. Returns `out`; FileExistsError when `out` holds something else,
    FileNotFoundError when `path` holds no adapter."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists and is not a merged model; choose an empty or new folder")
    run = Run(path)
    adapter_dir = run.adapter(checkpoint)
    base = base or run.recorded_base(checkpoint)
    model, processor = load_model(base)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    merged.config.tie_word_embeddings = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    classes = run.folder / CLASSES_FILE if run.folder else None
    if classes is not None and classes.exists():
        shutil.copyfile(classes, tmp / CLASSES_FILE)
    (tmp / MARKER).write_text(
        json.dumps({"base": base, "adapter": str(adapter_dir.resolve()), "checkpoint": checkpoint}, indent=2) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
