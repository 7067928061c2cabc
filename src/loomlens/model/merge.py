"""Merge a LoRA/DoRA adapter into its base: a plain Florence-2 folder, no peft or loomlens.

The result loads with `Florence2ForConditionalGeneration.from_pretrained(OUT)` and
`AutoProcessor.from_pretrained(OUT)` (with its PIL image processor where torchvision is
installed: `model.loader.load_processor`, and the folder's README says how without loomlens)
and computes what base + adapter computes. An adapter on
`lm_head` was trained on an untied copy of the embedding (see `loomlens.model.lora`), so the
merged folder stores `lm_head` separately with `tie_word_embeddings: false`; the input
embeddings stay the base's.

The merged weights are stored in half precision by default (`fp16`; `bf16` or `fp32` on
request): a deployed detector needs no fp32 master copy, and half the bytes load twice as
fast. The folder holds what a real checkpoint folder holds (config, generation_config,
model.safetensors, processor and tokenizer files) plus a short README naming the oldest
transformers release with the native Florence-2 classes. For loomlens itself it also keeps
what the run says about how to read the model (`run_record`: its classes, tasks, tile edge,
mirrors, box budget and region rules), so `--model MERGED` predicts as `--adapter RUN` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from loomlens.data.atomic import keep_unseen, recover_folder, swap_in_folder
from loomlens.data.yolo import CLASSES_FILE
from loomlens.model.loader import adapter_base, load_model
from loomlens.model.lora import load_adapter
from loomlens.run import Run, check_output_folder

#: Written into every merged folder: provenance, and the mark that lets a re-merge replace it.
MARKER = "loomlens_merge.json"
#: Storage precisions `merge_adapter` offers, by name.
MERGE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: The first transformers release with the native `Florence2ForConditionalGeneration`.
MIN_TRANSFORMERS = "4.56.0"
#: Files every merged folder must hold for plain `from_pretrained` (checked before it is published).
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "processor_config.json")


def merged_readme(base: str, dtype: str) -> str:
    """The README written into a merged folder: what it is, how to load it, which transformers."""
    import transformers

    version = transformers.__version__
    return "\n".join([
        "# Florence-2 with a loomlens adapter merged in",
        "",
        f"Base: `{base}`; weights stored in {dtype}. Plain transformers loads it (no loomlens, no peft, no remote code):",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoProcessor, Florence2ForConditionalGeneration",
        "model = Florence2ForConditionalGeneration.from_pretrained(FOLDER)",
        "processor = AutoProcessor.from_pretrained(FOLDER)",
        "# loomlens resizes with PIL; where torchvision is installed, transformers would pick its",
        "# torchvision image processor, which resizes differently. Keep PIL's:",
        "processor.image_processor = AutoImageProcessor.from_pretrained(FOLDER, backend=\"pil\")",
        "```",
        "",
        f"The native Florence-2 classes first shipped in transformers {MIN_TRANSFORMERS}. This folder was written by "
        f"transformers {version}, whose processor files older releases may not read: load it with {version} or newer "
        f"(the model weights alone load from {MIN_TRANSFORMERS}). Decode with `num_beams=1, no_repeat_ngram_size=0` "
        "as loomlens does: generation_config.json keeps the base checkpoint's own settings.",
        "",
    ])


#: The keys of `run_record`.
RUN_KEYS = frozenset({"tasks", "tile", "views", "most_boxes"})


def run_record(run: Run) -> dict:
    """What inference reads from `run` (`infer.loading`), as a merged folder keeps it (`RUN_KEYS`):
    the tasks it trained, its tile edge, the mirrors it learnt, its densest frame's box count."""
    return {"tasks": sorted(run.tasks), "tile": run.tile, "views": list(run.views), "most_boxes": run.most_boxes}


def read_merge_record(folder: str | Path) -> dict:
    """The record `merge_adapter` wrote into `folder` (base, adapter, dtype and `run`, the
    `run_record`, whole), {} for a folder that is no merge (a base checkpoint, a hub id).
    Raises ValueError naming the file when it cannot be read."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return {}
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        run = record.get("run")
        if run is not None and not RUN_KEYS <= set(run):
            raise ValueError(f"its run record lacks {sorted(RUN_KEYS - set(run))}")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{marker} cannot be read ({err}): merge the run again (`loomlens merge RUN {folder}`)") from None
    return record


def merge_adapter(
    path: str | Path, out: str | Path, checkpoint: str = "best", base: str | None = None, dtype: str = "fp16"
) -> Path:
    """Merge the adapter of `path` (a run folder, a checkpoint in it or an adapter folder, read
    through `loomlens.run.Run`) into its base model and save the merged model, processor,
    tokenizer, generation config, a README, the run's classes and region rules and its
    `run_record` to `out` (safetensors).

    Args:
        path: the run, checkpoint or adapter folder.
        out: the folder to write (replaced only if it is an earlier merge, and then whole: a
            kill leaves the earlier merge or the new one).
        checkpoint: `best` or `last`.
        base: the base model, where the one the run records is a folder not on this machine.
        dtype: storage precision, `fp16` (default), `bf16` or `fp32`; the merge itself runs in fp32.

    Returns:
        `out`. FileExistsError when `out` holds something else, FileNotFoundError when `path`
        holds no adapter, ValueError for an unknown dtype or a `base` other than the run's own.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(MERGE_DTYPES)}")
    out = Path(out)
    recover_folder(out)  # an earlier merge a kill left set aside
    check_output_folder(out, "the merged model's folder", f"it is not a merged model (no {MARKER}); choose an "
                        "empty or new folder", ours=lambda folder: (folder / MARKER).exists())
    run = Run(path)
    adapter_dir = run.adapter(checkpoint)
    base = adapter_base(run.recorded_base(checkpoint), base, adapter_dir)
    model, processor = load_model(base)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    merged.config.tie_word_embeddings = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    merged = merged.to(MERGE_DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    for kept in (run.folder / CLASSES_FILE if run.folder else None, run.rules):
        if kept is not None and kept.exists():
            shutil.copyfile(kept, tmp / kept.name)
    (tmp / "README.md").write_text(merged_readme(base, dtype))
    (tmp / MARKER).write_text(json.dumps(
        {"base": base, "adapter": str(adapter_dir.resolve()), "checkpoint": checkpoint, "dtype": dtype,
         "run": run_record(run)}, indent=2
    ) + "\n")
    missing = [name for name in REQUIRED_FILES if not (tmp / name).exists()]
    if missing:
        raise RuntimeError(f"the merged folder lacks {', '.join(missing)}; the base model folder may be incomplete")
    if out.is_dir():
        keep_unseen(out, tmp)  # what a file manager hides there (.git, .DS_Store) stays
    swap_in_folder(tmp, out)
    return out
