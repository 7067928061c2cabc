"""What the benchmarks share: the machine record, threads, loom data, the demo recipe, a
token-mean validation loss, tables (console and markdown) and the JSON result.

Every benchmark is `python -m bench.NAME [flags]`; it prints its tables and writes
`runs/bench/NAME.json` with `machine` (cores, RAM, torch threads, date, git commit) and the
exact `command`. `bench/all.py` runs them all and renders the same tables into
docs/benchmarks.md through each benchmark's `tables(result)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# transformers' deprecation chatter from inside peft, once per model wrapped: not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("runs/bench")


# --- the machine --------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads (None: torch's default); returns the number in force."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def device() -> str:
    """`cuda` when a GPU is there, else `cpu`: where the benchmarks run."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Cores, RAM, torch threads, CPU/GPU, versions, UTC date and git commit (+ dirty flag)."""
    import psutil
    import transformers

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a table caption: date, cores, RAM, threads, CPU/GPU, load, commit."""
    where = m["gpu"] or m["cpu"]
    dirty = "+dirty" if m.get("git_dirty") else ""
    return (f"{m['date']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['torch_threads']} torch threads, "
            f"{where}, load {m['load_average'][0]}, commit {m['git_commit']}{dirty}")


def peak_memory_mb() -> float:
    """Peak memory so far: CUDA max allocated on a GPU, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (`q` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def parse_size(text: str) -> tuple[int, int]:
    """`512x288` -> (512, 288); anything else (a side missing, under 32 px, not a number) is
    refused with the fix, as argparse shows a `type` error."""
    import argparse

    sides = text.lower().split("x")
    if len(sides) != 2 or not all(side.isdigit() and int(side) >= 32 for side in sides):
        raise argparse.ArgumentTypeError(f"{text} is not a frame size: give width x height in pixels, "
                                         "32 or more each, e.g. 1920x1080")
    return int(sides[0]), int(sides[1])


# --- data and recipe ----------------------------------------------------------------------

def demo_settings():
    """The shipped demo config (`configs/demo.yaml`): data sizes and the training recipe."""
    import yaml

    from loomlens.config import DemoConfig, resolve_config_path

    return DemoConfig.model_validate(yaml.safe_load(resolve_config_path("demo").read_text()) or {})


def loom_data(folder: Path, images: int, size: tuple[int, int] | None = None, seed: int = 0,
              flip: bool | None = None) -> Path:
    """Synthetic loom frames converted as the demo does it (od, flipped copies) into
    `folder/synth` and `folder/data`; returns the converted folder."""
    from loomlens.data.convert import convert
    from loomlens.data.synth import synthesize

    demo = demo_settings()
    folder = Path(folder)
    synthesize(folder / "synth", images=images, seed=seed, size=tuple(size or demo.size))
    convert(folder / "synth", folder / "data", tasks=demo.tasks, flip=demo.flip if flip is None else flip, seed=seed)
    return folder / "data"


def recipe_config(data: Path, out: Path, **overrides: Any):
    """The demo's training recipe (`TrainConfig`) on `data` into `out`, quiet (no progress
    bar, no TensorBoard), with `overrides` (field names, dotted or bare LoRA keys)."""
    from loomlens.config import TrainConfig, load_config

    quiet = {"progress": False, "tensorboard": False}
    return load_config(TrainConfig, base=demo_settings().train,
                       overrides={"data": str(data), "out": str(out), **quiet, **overrides})


def lora_model(cfg):
    """The seed's model: `cfg`'s base as transformers loads it with a fresh peft LoRA adapter
    per `cfg.lora`, on the device."""
    from loomlens.model import load_model
    from loomlens.model.lora import apply_lora

    torch.manual_seed(cfg.seed)
    model, processor = load_model(cfg.model)
    return apply_lora(model, cfg.lora, vision_frozen_stages=cfg.speed.vision_frozen_stages).to(device()), processor


def recipe_model(cfg, **changes: Any):
    """The model as loomlens's recipe trains it (`training_model`: its attention kernels, LoRA
    layers in their cheapest exact form, freed memory kept on a CPU), with `changes` to the
    config (`lora=` a LoraSettings; speed settings by their bare names), on the device."""
    from loomlens.train.recipe import training_model

    speed = {k: changes.pop(k) for k in list(changes) if k in type(cfg.speed).model_fields}
    torch.manual_seed(cfg.seed)
    model, processor = training_model(cfg.model_copy(update={**changes, "speed": cfg.speed.model_copy(update=speed)}))
    return model.to(device()), processor


def model_batch(batch: dict, model) -> dict:
    """`batch` on the device, its float tensors (pixels) in the dtype `model`'s frozen base is
    stored in: bf16 under the recipe's `bf16-base`, else fp32, as the recipe feeds it."""
    dtype = model.get_input_embeddings().weight.dtype
    return {k: v.to(device(), dtype) if v.is_floating_point() else v.to(device()) for k, v in batch.items()}


def fp32_twin(model, cfg):
    """A fresh fp32 copy of `cfg`'s base carrying `model`'s trained adapter weights: every loop
    is scored on the same fp32 base, whatever precision it trained in."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    twin, _ = lora_model(cfg)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model, save_embedding_layers=False))
    return twin


def autocast(cfg, precision: str | None = None):
    """The autocast the recipe runs `cfg` under on this device (`mixed_precision` of its
    `precision`: none under bf16-base), or the one `precision` (auto | fp32 | bf16 | fp16) names."""
    from loomlens.train.recipe import mixed_precision

    autocast_name = mixed_precision(precision or cfg.speed.precision, cfg.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast_name)
    return torch.autocast(device(), dtype=dtype or torch.float32, enabled=dtype is not None)


def training_step(model, params, optimizer, batch: dict, cfg, clock: "Stopwatch | None" = None) -> float:
    """One optimizer step of loomlens's recipe on one micro-batch (loomlens's token-sum loss
    over the label tokens, clipping, AdamW), phases timed on `clock` if given; returns the loss."""
    from loomlens.train.loss import LossSpec, batch_loss

    clock = clock or Stopwatch()
    text = model.config.text_config
    with clock("forward"), autocast(cfg):
        part, tokens = batch_loss(model, batch, LossSpec(text.decoder_start_token_id, text.pad_token_id))
    with clock("backward"):
        (part / tokens).backward()
    with clock("optimizer"):
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(part.detach()) / max(float(tokens), 1.0)


def answer_tokens(processor, boxes: int, model) -> int:
    """Tokens of an `<OD>` answer of `boxes` loom boxes (`box_token_budget`), capped by the decoder."""
    from loomlens.data.synth import CLASSES
    from loomlens.infer.generation import box_token_budget, decoder_limit, label_token_count

    return min(box_token_budget(boxes, label_token_count(processor.tokenizer, CLASSES)), decoder_limit(model))


@torch.no_grad()
def forced_answer_seconds(model, processor, paths: Sequence[Path], boxes: int, batch_size: int,
                          num_beams: int = 1, fast_pixels: bool = True) -> float:
    """Seconds per image of `<OD>` whose answers are forced to the length of `boxes` boxes
    (`min_new_tokens = max_new_tokens`), `batch_size` images a call, image decoding and the
    processor included (`fast_pixels`: as `loomlens.infer.pixels` runs it; False: the
    processor's own image path): generation cost without depending on what the weights write."""
    from PIL import Image

    from loomlens.infer.pixels import model_inputs

    tokens = answer_tokens(processor, boxes, model)
    dtype = model.get_input_embeddings().weight.dtype  # pixels in the base's dtype, as `generate` passes them
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
        inputs = model_inputs(processor, images, ["<OD>"] * len(images), fast_pixels)
        model.generate(**{k: v.to(device(), dtype if v.is_floating_point() else None) for k, v in inputs.items()},
                       max_new_tokens=tokens, min_new_tokens=tokens, num_beams=num_beams, do_sample=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    model.train(was_training)
    return (time.perf_counter() - start) / len(paths)


#: The seed's inference (Florence-2's sample code): `<OD>` one image at a time, 3 beams,
#: `max_new_tokens=1024` (capped at the decoder's position table, as any caller must).
SEED_BEAMS = 3
SEED_MAX_NEW_TOKENS = 1024


@torch.no_grad()
def seed_detect(model, processor, image, num_beams: int = SEED_BEAMS) -> tuple[list, int, int]:
    """`<OD>` on one PIL image the seed's way: the processor's inputs, `model.generate` as
    Florence-2's sample code calls it (`num_beams`, `do_sample=False`, `early_stopping=False`),
    `processor.batch_decode` and `processor.post_process_generation`, every score 1.

    Returns the boxes (`Box`, pixels, score 1), the boxes the processor returned that no
    `Box` can hold (reversed or zero-sized: they match no true box in any COCO evaluation), and
    the generated token count."""
    from loomlens.infer.generation import decoder_limit

    inputs = processor(text="<OD>", images=image, return_tensors="pt")
    dtype = model.get_input_embeddings().weight.dtype
    out = model.generate(input_ids=inputs["input_ids"].to(device()),
                         pixel_values=inputs["pixel_values"].to(device(), dtype),
                         max_new_tokens=min(SEED_MAX_NEW_TOKENS, decoder_limit(model)),
                         num_beams=num_beams, do_sample=False, early_stopping=False)
    boxes, unheld = processor_boxes(processor, out[0].tolist(), image.size)
    return boxes, unheld, out.shape[1] - 1  # minus the decoder-start token


def processor_boxes(processor, token_ids: Sequence[int], size: tuple[int, int]) -> tuple[list, int]:
    """The `<OD>` boxes Florence-2's processor reads from generated `token_ids` for an image of
    `size` (width, height): `batch_decode`, then `post_process_generation`, every score 1.

    Returns the boxes and the count of boxes the processor returned that no `Box` can hold
    (reversed or zero-sized: they match no true box in any COCO evaluation)."""
    from loomlens.data.records import Box

    text = processor.batch_decode([list(token_ids)], skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task="<OD>", image_size=tuple(size))["<OD>"]
    boxes = [Box(label, *bbox, score=1.0) for bbox, label in zip(parsed["bboxes"], parsed["labels"])
             if bbox[2] > bbox[0] and bbox[3] > bbox[1]]
    return boxes, len(parsed["bboxes"]) - len(boxes)


def paired_resamples(truth: Sequence[list], a: Sequence[list], b: Sequence[list], classes: Sequence[str], *,
                     size: int | None = None, draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """How sure a difference of mAP between two ways `a` and `b` (boxes per frame, the same
    frames as `truth`) is: `draws` resamples of the frames, each scored both ways.

    Args:
        truth, a, b: true boxes and each way's predicted boxes, one list per frame.
        classes: the class names `coco_metrics` averages over.
        size: None draws as many frames as there are, with replacement (a bootstrap: the
            spread of the difference on this split); a number draws that many distinct frames
            (how a sample of that size can turn out).
        draws: resamples; seed: their random seed.

    Returns:
        `{"frames", "draws", "map50": {...}, "map50_95": {...}}`, each metric with `low` and
        `high` (5th and 95th percentile of a - b) and `below` (the share of draws where a
        scores under b).
    """
    import random

    from loomlens.evaluate.metrics import coco_metrics

    rng = random.Random(seed)
    frames = len(truth)
    diffs: dict[str, list[float]] = {"map50": [], "map50_95": []}
    for _ in range(draws):
        pick = (rng.choices(range(frames), k=frames) if size is None
                else rng.sample(range(frames), min(size, frames)))
        t = [truth[i] for i in pick]
        ma, mb = coco_metrics(t, [a[i] for i in pick], classes), coco_metrics(t, [b[i] for i in pick], classes)
        for key, values in diffs.items():
            values.append(ma[key] - mb[key])
    return {"frames": frames if size is None else min(size, frames), "draws": draws,
            **{key: {"low": percentile(v, 0.05), "high": percentile(v, 0.95),
                     "below": sum(d < 0 for d in v) / len(v)} for key, v in diffs.items()}}


@torch.no_grad()
def val_loss(model, processor, jsonl: Path, max_samples: int | None = None, batch_size: int = 8) -> float:
    """Cross-entropy per label token (padding excluded) over the first `max_samples` samples
    of a split: the one yardstick every loop in the benchmarks is judged by."""
    from loomlens.data.dataset import Collator, FlorenceDataset
    from loomlens.train.loss import LossSpec, batch_loss

    text = model.config.text_config
    data = FlorenceDataset(jsonl, processor, (), text.max_position_embeddings)
    collate = Collator(processor.tokenizer.pad_token_id)
    indices = list(range(len(data)))[:max_samples]
    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(indices), batch_size):
        batch = collate([data[i] for i in indices[start : start + batch_size]])
        spec = LossSpec(text.decoder_start_token_id, text.pad_token_id)
        part, tokens = batch_loss(model, model_batch(batch, model), spec)
        total, count = total + float(part), count + float(tokens)
    model.train(was_training)
    return total / max(count, 1.0)


class Stopwatch:
    """Accumulates `time.perf_counter` seconds per phase name: `with clock("forward"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name: str | None = None

    def __call__(self, name: str) -> "Stopwatch":
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start


# --- output -------------------------------------------------------------------------------

@dataclass
class Table:
    """A result table: what both the console and docs/benchmarks.md show."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def show(tables: Sequence[Table]) -> None:
    """Print `tables` with rich, notes under each."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    for t in tables:
        rich = RichTable(title=t.title)
        for i, column in enumerate(t.columns):
            rich.add_column(column, justify="left" if i == 0 else "right")
        for row in t.rows:
            rich.add_row(*row)
        console.print(rich)
        for note in t.notes:
            console.print(f"  {note}", highlight=False)


def markdown(tables: Sequence[Table]) -> str:
    """`tables` as GitHub markdown: a bold title, the table, its notes."""
    parts = []
    for t in tables:
        lines = [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(t.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in t.rows]
        lines += [""] + [f"- {note}" for note in t.notes]
        parts.append("\n".join(lines).rstrip())
    return "\n\n".join(parts) + "\n"


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *map(shlex.quote, args)])


def write_result(name: str, result: dict[str, Any], out: Path | None, command: str) -> Path:
    """Write `result` with `machine` and `command` to `out` (default runs/bench/NAME.json)."""
    out = Path(out or RESULTS / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": name, "command": command, "machine": machine(), **result}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table; `-` for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    """`a / b` as `2.31x`; `-` when either is missing or b is 0."""
    return "-" if not a or not b else f"{a / b:.2f}x"


def common_flags(parser, name: str) -> None:
    """Flags every benchmark takes: --threads, --out."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json", help="JSON result")


def parse_gpu_flags(parser, name: str, argv, *, rehearsal: str) -> tuple[argparse.Namespace, bool]:
    """Parse a GPU benchmark's flags: its own, `--small` (a CPU rehearsal, described by
    `rehearsal`) and `common_flags`; set the threads. Returns `(args, cuda)`; exits with the
    reason when the full run finds no CUDA GPU."""
    parser.add_argument("--small", action="store_true", help=f"CPU rehearsal: {rehearsal}")
    common_flags(parser, name)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        parser.error("the full run needs a CUDA GPU; rehearse it on a CPU with --small")
    return args, cuda


def publish(name: str, result: dict, out, argv, tables, *, markdown_beside: bool = False) -> int:
    """Write `result` as bench `name`'s JSON, then print the machine and `tables(result)` as
    read back from that file (so what is shown is what was saved); returns exit code 0.
    `markdown_beside` also writes the tables as markdown next to the JSON (`NAME.md`: what a
    run on another machine brings back for the docs)."""
    path = write_result(name, result, out, command_line(f"bench.{name}", argv))
    result = json.loads(path.read_text())
    print(describe(result["machine"]))
    show(tables(result))
    if markdown_beside:
        path.with_suffix(".md").write_text(markdown(tables(result)))
    print(f"wrote {path}" + (f" and {path.with_suffix('.md')}" if markdown_beside else ""))
    return 0
