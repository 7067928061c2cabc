"""Pretrain the embedded tiny Florence-2 on generic synthetic scenes (`loomlens pretrain`).

One loop, top to bottom. What makes a tiny model *look* at the image instead of learning the
statistics of the answer text (measured; see the model card):
- the model shape (`model/tiny.py`): a 16x16 token grid and a spatial prior that ties image
  positions to `<loc_N>` embeddings;
- a Gaussian soft-label loss over the loc bins, so a near miss earns more than a far one;
- a dense CenterNet-style auxiliary head on the vision features (dropped after pretraining),
  which keeps the features spatial while the text side learns to read them;
- a pointer loss: at each loc token, the last decoder layer's cross-attention (mean over
  heads) is pushed onto the grid cells along that coordinate's edge of the box (x1: the
  box's left column, y1: its top row, ...). Without it the decoder never found the object:
  loc NLL was the same with the right and with shuffled images after 200 steps, soft labels
  and spatial prior notwithstanding;
- a curriculum from one object per scene to several;
- fresh scenes every step (no memorising), drawn from `seed + step`, which also makes resume
  exact with no data state to save.
Every `eval_every` steps it runs the "is it looking?" check: teacher-forced loc loss with the
right images against shuffled ones, and free-running `<OD>` mAP50 on held-out scenes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loomlens.data.florence_text import boxes_to_text
from loomlens.data.shapes import SHAPE_CLASSES, Scene, make_scene
from loomlens.model.tiny import TinyShape, build_tiny
from loomlens.model.tokenizer import loc_token_ids
from loomlens.train.checkpoint import (
    UnsafeCheckpointError,
    load_optimizer,
    optimizer_payload,
    read_state,
    recover,
    write_folder,
    write_state,
)


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run; saved as `pretrain_config.json` beside the weights."""

    out: str = "runs/pretrain"
    seed: int = 0
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    # Gaussian soft-label width in bins: about one grid cell (62 bins at 16x16) at the start,
    # so that the right cell already earns credit, annealed geometrically to near-exact bins.
    # A 3-bin start gave no gap between right and shuffled images after 300 steps.
    loc_sigma: float = 60.0
    loc_sigma_end: float = 2.0
    dense_weight: float = 1.0
    pointer_weight: float = 1.0
    one_object_steps: int = 600  # curriculum: one object per scene first
    max_objects: int = 4
    task_mix: dict[str, float] = field(
        default_factory=lambda: {"od": 0.7, "dense_region_caption": 0.1, "phrase_grounding": 0.1, "caption": 0.1}
    )
    eval_every: int = 200
    eval_images: int = 64
    save_every: int = 100
    # Seconds of training (summed over resumes) the schedule is paced over: lr and soft-label
    # width follow max(step / steps, elapsed / time_budget), so a run on any machine anneals
    # fully by the deadline; `steps` is then a cap.
    time_budget: float | None = None
    stop_at: int | None = None  # stop (resumably) after this step, to split a run
    threads: int | None = None
    device: str = "auto"  # "auto": CUDA when there is one, else the CPU
    workers: int = 0  # processes drawing scenes ahead of the loop (0: in the loop)
    shape: dict = field(default_factory=lambda: asdict(TinyShape()))


class DenseHead(nn.Module):
    """CenterNet-style head on the vision map: class heatmaps, centre offsets, log sizes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(channels, num_classes + 4, 1)
        nn.init.constant_(self.out.bias[:num_classes], -2.2)  # prior p=0.1, as CenterNet
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))


def dense_targets(scenes: list[Scene], grid: int, size: int, num_classes: int):
    """Heatmap, offset/size targets and their mask on a `grid` x `grid` map."""
    b = len(scenes)
    heat = np.zeros((b, num_classes, grid, grid), np.float32)
    reg = np.zeros((b, 4, grid, grid), np.float32)
    mask = np.zeros((b, grid, grid), np.float32)
    stride = size / grid
    yy, xx = np.mgrid[0:grid, 0:grid]
    for i, scene in enumerate(scenes):
        for box in scene.boxes:
            c = SHAPE_CLASSES.index(box.label)
            cx, cy = (box.x1 + box.x2) / 2 / stride, (box.y1 + box.y2) / 2 / stride
            gx, gy = min(int(cx), grid - 1), min(int(cy), grid - 1)
            sigma = max(0.5, min(box.width, box.height) / stride / 4)
            g = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
            heat[i, c] = np.maximum(heat[i, c], g)
            reg[i, :, gy, gx] = (cx - gx, cy - gy, math.log(box.width / stride), math.log(box.height / stride))
            mask[i, gy, gx] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def dense_loss(pred: torch.Tensor, heat, reg, mask, num_classes: int) -> torch.Tensor:
    """Focal loss on heatmaps (CenterNet) plus L1 on offsets and log sizes at centres."""
    logits = pred[:, :num_classes]
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    n = pos.sum().clamp(min=1)
    l1 = (F.l1_loss(pred[:, num_classes:], reg, reduction="none").sum(1) * mask).sum() / mask.sum().clamp(min=1)
    return (pos_loss + neg_loss) / n + 0.5 * l1


def pointer_targets(labels: torch.Tensor, loc_start: int, grid: int) -> list[tuple[int, int, list[int]]]:
    """For each loc token in `labels`: (sample, position, encoder positions it should attend).

    Loc tokens come in groups of four (x1, y1, x2, y2 in bins). Coordinate x1 points at the
    cells of the box's left column, y1 its top row, x2 its right column, y2 its bottom row.
    Encoder position 0 is the pooled image token; cell (row, col) is `1 + row * grid + col`.
    """
    cell = lambda q: min(grid - 1, int(q) * grid // 1000)  # noqa: E731 - bin -> grid index
    targets = []
    for b, row in enumerate(labels.tolist()):
        locs = [(t, v - loc_start) for t, v in enumerate(row) if loc_start <= v < loc_start + 1000]
        for g in range(0, len(locs) - 3, 4):
            (t1, x1), (t2, y1), (t3, x2), (t4, y2) = locs[g : g + 4]
            if t4 - t1 != 3:
                continue  # not one box (e.g. a polygon or a broken sequence)
            cols = range(cell(x1), cell(x2) + 1)
            rows = range(cell(y1), cell(y2) + 1)
            targets.append((b, t1, [1 + r * grid + cell(x1) for r in rows]))
            targets.append((b, t2, [1 + cell(y1) * grid + c for c in cols]))
            targets.append((b, t3, [1 + r * grid + cell(x2) for r in rows]))
            targets.append((b, t4, [1 + cell(y2) * grid + c for c in cols]))
    return targets


def pointer_mask(labels: torch.Tensor, loc_start: int, grid: int, encoder_length: int) -> torch.Tensor:
    """`pointer_targets` as a CPU tensor (batch, label positions, encoder positions) of 0/1,
    built in one numpy pass so the loss needs no per-box indexing on the device."""
    mask = np.zeros((*labels.shape, encoder_length), np.float32)
    for b, t, cells in pointer_targets(labels.cpu(), loc_start, grid):
        mask[b, t, cells] = 1.0
    return torch.from_numpy(mask)


def pointer_loss(cross_attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of -log(attention mass on the target cells), heads averaged; 0 with no targets.

    `cross_attention` is (batch, heads, decoder positions, encoder positions); `mask` comes
    from `pointer_mask`.
    """
    mask = mask.to(cross_attention.device, cross_attention.dtype)
    picked = mask.sum(-1) > 0
    if not picked.any():
        return cross_attention.sum() * 0.0
    mass = (cross_attention.mean(dim=1) * mask).sum(-1)[picked]
    return -torch.log(mass.clamp(min=1e-6)).mean()


def scene_sample(scene: Scene, task: str, rng: np.random.Generator) -> tuple[str, str]:
    """The (prompt, answer) text of one pretraining task on a scene."""
    w, h = scene.image.size
    if task == "od" or not scene.boxes:
        return "<OD>", boxes_to_text(scene.boxes, w, h)
    if task == "dense_region_caption":
        named = [type(b)(f"{c} {b.label}", b.x1, b.y1, b.x2, b.y2) for b, c in zip(scene.boxes, scene.colours)]
        return "<DENSE_REGION_CAPTION>", boxes_to_text(named, w, h)
    if task == "phrase_grounding":
        label = scene.boxes[rng.integers(len(scene.boxes))].label
        return f"<CAPTION_TO_PHRASE_GROUNDING>{label}", boxes_to_text([b for b in scene.boxes if b.label == label], w, h)
    words = [f"a {c} {b.label}" for b, c in zip(scene.boxes, scene.colours)]
    return "<CAPTION>", ("an image with " + " and ".join(words) + ".")


class Batcher:
    """Turns scenes into model inputs with the native processor (labels: `<s> answer </s>`)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def __call__(self, scenes: list[Scene], prompts: list[str], answers: list[str]) -> dict:
        inputs = self.processor(text=prompts, images=[s.image for s in scenes], return_tensors="pt", padding=True)
        labels = self.tokenizer(answers, return_tensors="pt", padding=True, add_special_tokens=True).input_ids
        labels[labels == self.tokenizer.pad_token_id] = -100
        decoder_input_ids = labels.new_full(labels.shape, self.tokenizer.pad_token_id)
        decoder_input_ids[:, 1:] = labels[:, :-1].clamp(min=0).masked_fill(labels[:, :-1] < 0, self.tokenizer.pad_token_id)
        decoder_input_ids[:, 0] = self.tokenizer.eos_token_id  # BART's decoder_start_token_id
        return {**inputs, "labels": labels, "decoder_input_ids": decoder_input_ids}


def seq_loss(logits: torch.Tensor, labels: torch.Tensor, loc_start: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss: plain CE on text tokens, Gaussian soft-label CE on loc tokens.

    Returns `(loss, loc_nll)` where `loc_nll` is the plain NLL of the exact loc bins, the
    number the "is it looking?" check compares.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = labels.ne(-100)
    is_loc = valid & (labels >= loc_start) & (labels < loc_start + 1000)
    safe = labels.clamp(min=0)
    nll = -logp.gather(-1, safe[..., None])[..., 0]
    text_loss = (nll * (valid & ~is_loc)).sum()
    loc_logp = logp[..., loc_start : loc_start + 1000][is_loc]
    target_bins = (labels[is_loc] - loc_start).float()
    bins = torch.arange(1000, dtype=torch.float32, device=logits.device)
    q = torch.softmax(-((bins[None, :] - target_bins[:, None]) ** 2) / (2 * sigma**2), dim=-1)
    loc_loss = -(q * loc_logp).sum()
    loss = (text_loss + loc_loss) / valid.sum().clamp(min=1)
    loc_nll = nll[is_loc].mean() if is_loc.any() else loss.new_zeros(())
    return loss, loc_nll


def forward(model, batch: dict, attentions: bool = False):
    """One forward pass: logits, the vision map (B, C, H, W) for the dense head, and (when
    `attentions`) the last decoder layer's cross-attention (needs eager attention)."""
    inner = model.model
    image = inner.get_image_features(batch["pixel_values"])
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask = batch["input_ids"].eq(model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, image.pooler_output.to(embeds.dtype))
    out = model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        use_cache=False,
        output_attentions=attentions,
    )
    if attentions:
        return out.logits, image.last_hidden_state, out.cross_attentions[-1]
    return out.logits, image.last_hidden_state


def make_batch(cfg: PretrainConfig, step: int, shape: TinyShape, batcher: Batcher, loc_start: int) -> dict:
    """Everything step `step` needs, as CPU tensors: model inputs and labels of fresh scenes
    drawn from `seed + step` (tasks from the mix), the dense head's targets and the pointer mask."""
    rng = np.random.default_rng([cfg.seed, step])
    max_objects = 1 if step < cfg.one_object_steps else cfg.max_objects
    scenes = [make_scene(rng, shape.image_size, max_objects=max_objects) for _ in range(cfg.batch_size)]
    names = list(cfg.task_mix)
    probs = np.array([cfg.task_mix[n] for n in names], dtype=np.float64)
    tasks = rng.choice(names, size=len(scenes), p=probs / probs.sum())
    pairs = [scene_sample(s, t, rng) for s, t in zip(scenes, tasks)]
    batch = batcher(scenes, [p for p, _ in pairs], [a for _, a in pairs])
    # Scenes are drawn at the model's input size, so the processor only rescales and
    # normalises: ship the uint8 pixels (a quarter of the bytes) and normalise on the device.
    batch["pixel_values"] = torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes])).permute(0, 3, 1, 2)
    heat, reg, mask = dense_targets(scenes, shape.grid, shape.image_size, len(SHAPE_CLASSES))
    pointer = pointer_mask(batch["labels"], loc_start, shape.grid, batch["input_ids"].shape[1])
    return {**batch, "heat": heat, "reg": reg, "mask": mask, "pointer": pointer}


def normalize_pixels(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the processor's float input: rescale to 0..1, then mean/std."""
    mean = torch.tensor(image_processor.image_mean, device=pixels.device)[:, None, None]
    std = torch.tensor(image_processor.image_std, device=pixels.device)[:, None, None]
    return (pixels.float() * image_processor.rescale_factor - mean) / std


class StepBatches(torch.utils.data.IterableDataset):
    """The batches of steps `start`..`stop`-1 in order. With DataLoader workers, worker w makes
    steps start+w, start+w+W, ... and the loader's round robin hands them back in step order."""

    def __init__(self, cfg: PretrainConfig, shape: TinyShape, processor, loc_start: int, start: int, stop: int):
        self.cfg, self.shape, self.batcher, self.loc_start = cfg, shape, Batcher(processor), loc_start
        self.start, self.stop = start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, every = (self.start, 1) if info is None else (self.start + info.id, info.num_workers)
        for step in range(first, self.stop, every):
            yield make_batch(self.cfg, step, self.shape, self.batcher, self.loc_start)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def looking_check(model, processor, cfg: PretrainConfig, size: int, loc_start: int) -> dict:
    """Is it looking? Loc NLL with right vs shuffled images, and free-running <OD> mAP50
    (boxes scored from the generation's log-probabilities, as `loomlens eval` does)."""
    from loomlens.evaluate import detect
    from loomlens.evaluate.metrics import coco_metrics

    model.eval()
    batcher = Batcher(processor)
    rng = np.random.default_rng([cfg.seed + 999_999, 0])
    scenes = [make_scene(rng, size, max_objects=cfg.max_objects) for _ in range(cfg.eval_images)]
    pairs = [scene_sample(s, "od", rng) for s in scenes]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batcher(scenes, [p for p, _ in pairs], [a for _, a in pairs]).items()}
    logits, _ = forward(model, batch)
    _, right = seq_loss(logits, batch["labels"], loc_start, 1.0)
    shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
    logits, _ = forward(model, shuffled)
    _, wrong = seq_loss(logits, batch["labels"], loc_start, 1.0)
    images, truth = [s.image for s in scenes], [s.boxes for s in scenes]
    free, constrained = (
        detect(model, processor, images, max_boxes=cfg.max_objects + 2, batch_size=16,
               classes=SHAPE_CLASSES, constrained=grammar)
        for grammar in (False, True)
    )
    model.train()
    return {
        "loc_nll": float(right),
        "loc_nll_shuffled": float(wrong),
        "map50": coco_metrics(truth, free, list(SHAPE_CLASSES))["map50"],
        "map50_constrained": coco_metrics(truth, constrained, list(SHAPE_CLASSES))["map50"],
        "distinct_first_boxes": len({(round(p[0].x1), round(p[0].y1)) for p in free if p}),
    }


def _save_state(path: Path, model, head, optimizer, step: int, elapsed: float) -> None:
    """Write the resumable state atomically and without pickle (`checkpoint.write_state`)."""
    payload = {"model": model.state_dict(), "head": head.state_dict(), "optimizer": optimizer_payload(optimizer),
               "step": step, "elapsed": elapsed}
    write_folder(path, lambda tmp: write_state(tmp, "state", payload))


def schedule_position(cfg: PretrainConfig, step: int, elapsed: float) -> float:
    """How far through the run we are, 0..1: by steps, or by time when that is further."""
    frac = step / cfg.steps
    if cfg.time_budget:
        frac = max(frac, elapsed / cfg.time_budget)
    return min(1.0, frac)


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    """Run (or resume) pretraining into `cfg.out`.

    Returns the last "is it looking?" figures with `step`, the trained `model`, `processor`,
    `shape`, and `done` (False when stopped early by `stop_at` or Ctrl-C: run it again to resume).
    """
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    shape = TinyShape(**cfg.shape)
    model, processor, shape = build_tiny(shape, seed=cfg.seed)
    model.set_attn_implementation("eager")  # the pointer loss reads cross-attention weights
    loc_ids = loc_token_ids(processor.tokenizer)
    loc_start = loc_ids[0]
    assert loc_ids == list(range(loc_start, loc_start + 1000)), "loc tokens must be contiguous"
    head = DenseHead(shape.vision_dims[-1], len(SHAPE_CLASSES))
    model.to(device)
    head.to(device)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_path = out / "state"
    step, elapsed = 0, 0.0
    recover(state_path)
    if (out / "state.pt").exists() and not state_path.exists():
        raise UnsafeCheckpointError(f"{out / 'state.pt'} was written by an older loomlens as a pickle, which is "
                                    "never read (it can run code): delete it to start afresh, or use a new --work")
    if state_path.exists():
        state = read_state(state_path, "state")
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        load_optimizer(optimizer, state["optimizer"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        log(f"resumed at step {step}")
    torch.manual_seed(cfg.seed + step)
    batches = torch.utils.data.DataLoader(
        StepBatches(cfg, shape, processor, loc_start, step, cfg.steps),
        batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
    )
    log_path = out / "log.jsonl"
    started = time.time() - elapsed
    last: dict = {}
    done = False
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    try:
        for batch in batches:
            frac = schedule_position(cfg, step, time.time() - started)
            if frac >= 1.0:
                break
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in optimizer.param_groups:
                group["lr"] = lr
            sigma = cfg.loc_sigma * (cfg.loc_sigma_end / cfg.loc_sigma) ** frac
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["pixel_values"] = normalize_pixels(batch["pixel_values"], processor.image_processor)
            logits, features, cross = forward(model, batch, attentions=True)
            loss, loc_nll = seq_loss(logits, batch["labels"], loc_start, sigma)
            aux = dense_loss(head(features), batch["heat"], batch["reg"], batch["mask"], len(SHAPE_CLASSES))
            point = pointer_loss(cross, batch["pointer"])
            total = loss + cfg.dense_weight * aux + cfg.pointer_weight * point
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss is {total.item()} at step {step}; last good state is in {state_path}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            record = {"step": step, "loss": loss.item(), "loc_nll": loc_nll.item(), "dense": aux.item(),
                      "pointer": point.item(), "lr": lr, "elapsed": time.time() - started}
            bar.set_postfix(loss=f"{record['loss']:.3f}", loc=f"{record['loc_nll']:.2f}",
                            point=f"{record['pointer']:.2f}", lr=f"{lr:.1e}")
            finishing = schedule_position(cfg, step, time.time() - started) >= 1.0
            if step % cfg.eval_every == 0 or finishing:
                last = looking_check(model, processor, cfg, shape.image_size, loc_start)
                record.update(last)
                log(f"step {step}: {json.dumps(last)}")
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % cfg.save_every == 0 or finishing:
                _save_state(state_path, model, head, optimizer, step, time.time() - started)
            if finishing:
                break
            if cfg.stop_at is not None and step >= cfg.stop_at:
                _save_state(state_path, model, head, optimizer, step, time.time() - started)
                log(f"stopped at step {step} (stop_at); run the same command to resume")
                break
        done = schedule_position(cfg, step, time.time() - started) >= 1.0
    except KeyboardInterrupt:
        _save_state(state_path, model, head, optimizer, step, time.time() - started)
        log(f"interrupted at step {step}; state saved, run the same command to resume")
    bar.close()
    if done and not last:  # resumed a finished run: measure it again for the export
        last = looking_check(model, processor, cfg, shape.image_size, loc_start)
    model.set_attn_implementation("sdpa")
    model.eval()
    return {"step": step, "done": done, "model": model, "processor": processor, "shape": shape, **last}


def export_tiny(model, processor, folder: str | Path, cfg: PretrainConfig, figures: dict) -> Path:
    """Save the pretrained tiny model where `load_model("tiny")` finds it.

    Weights are stored in fp16 (half the size in git; `load_model` upcasts to fp32) beside the
    processor files and `pretrain_config.json`, written to a temp folder and swapped in whole,
    so a crash never leaves a half-written asset.
    """
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half.to(torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (tmp / "pretrain_figures.json").write_text(json.dumps(figures, indent=2))
    card = folder / "README.md"
    if card.exists():  # the model card is written by hand from the measurements; keep it
        shutil.copy2(card, tmp / "README.md")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def finish_pretraining(result: dict, cfg: PretrainConfig, folder: str | Path) -> dict:
    """Measure the finished model against a random-init one of the same shape, then export.

    Returns the figures written beside the weights (`pretrain_figures.json`): the "is it
    looking?" check of the pretrained model and of the random-init baseline.
    """
    model, processor, shape = result["model"], result["processor"], result["shape"]
    loc_start = loc_token_ids(processor.tokenizer)[0]
    baseline, _, _ = build_tiny(shape, seed=cfg.seed)
    figures = {
        "steps": result["step"],
        "pretrained": looking_check(model, processor, cfg, shape.image_size, loc_start),
        "random_init": looking_check(baseline.eval(), processor, cfg, shape.image_size, loc_start),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    export_tiny(model, processor, folder, cfg, figures)
    return figures
