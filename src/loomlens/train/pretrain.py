"""Pretrain the embedded tiny Florence-2 on generic synthetic scenes: a maintainer's tool
(`python -m loomlens.train.pretrain --help`; on a GPU, `scripts/pretrain-gpu.sh`).

One loop, top to bottom, on the parts fine-tuning uses too: its loss (`train/loss.py`: soft
location labels, decoder inputs), the losses that teach *where* (`train/spatial_loss.py`: the
pointer loss and the dense head), its schedule (`train/schedule.py`) and its pickle-free
checkpoints (`train/checkpoint.py`). What makes a tiny model *look* at the image instead of
learning the statistics of the answer text (the model card says how each was found):
- the model shape (`model/tiny.py`): a 16x16 token grid and a spatial prior that ties image
  positions to `<loc_N>` embeddings;
- Gaussian soft labels over the loc bins, wide at first and annealed, so a near miss earns
  more than a far one;
- the dense head on the vision features, which keeps them spatial while the text side learns
  to read them, and the pointer loss, which makes the decoder find the object;
- a curriculum from one object per scene to several;
- fresh scenes every step (no memorising), drawn from `seed + step`, which also makes resume
  exact with no data state to save; `fabric_share` of them are fabric scenes
  (`data/fabric_scenes.py`), the rest generic ones (`data/shapes.py`).
A run may start from a trained model (`init`), even one of another input size
(`model/warm_start.py`): that is how `tiny-hr` (384 px) starts from the shipped tiny.
Every `eval_every` steps it runs the "is it looking?" check: teacher-forced loc loss with the
right images against shuffled ones, and free-running `<OD>` mAP50 on held-out scenes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loomlens.config import DEVICE_HELP, PretrainConfig
from loomlens.data.atomic import recover_folder, write_folder
from loomlens.data.fabric_scenes import FABRIC_CLASSES, make_fabric_scene
from loomlens.data.florence_text import boxes_to_text
from loomlens.data.shapes import SHAPE_CLASSES, Scene, make_scene
from loomlens.model.runtime import resolve_device
from loomlens.model.tiny import TinyShape, build_tiny
from loomlens.model.tokenizer import loc_token_ids
from loomlens.model.warm_start import warm_start
from loomlens.train.checkpoint import (
    UnsafeCheckpointError,
    load_optimizer,
    optimizer_payload,
    read_state,
    write_state,
)
from loomlens.train.loss import decoder_inputs, loc_nll, token_cross_entropy, with_image_embeds
from loomlens.train.schedule import lr_factor, position, warmup_steps
from loomlens.train.spatial_loss import DenseHead, dense_loss, dense_targets, pointer_loss, pointer_mask


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
    """Turns scenes into model inputs with the native processor: labels `<s> answer </s>`
    (padding -100) and the decoder inputs fine-tuning builds from them (`loss.decoder_inputs`)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def __call__(self, scenes: list[Scene], prompts: list[str], answers: list[str], *, raw_pixels: bool = False) -> dict:
        """The batch of `scenes` with these prompts and answers; `raw_pixels` leaves the pixels
        uint8 (B, 3, H, W), not resized, rescaled or normalised (see `make_batch`)."""
        raw = {"do_resize": False, "do_rescale": False, "do_normalize": False} if raw_pixels else {}
        inputs = self.processor(text=prompts, images=[s.image for s in scenes], return_tensors="pt", padding=True, **raw)
        labels = self.tokenizer(answers, return_tensors="pt", padding=True, add_special_tokens=True).input_ids
        labels[labels == self.tokenizer.pad_token_id] = -100
        # BART's decoder_start_token_id is its eos token
        decoder_input_ids = decoder_inputs(labels, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        return {**inputs, "labels": labels, "decoder_input_ids": decoder_input_ids}


def seq_loss(logits: torch.Tensor, labels: torch.Tensor, loc_start: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(token-mean loss, loc NLL)`: fine-tuning's cross-entropy with soft loc labels of width
    `sigma` (`loss.token_cross_entropy`), and the plain NLL of the exact loc bins, the number
    the "is it looking?" check compares."""
    total, count = token_cross_entropy(logits, labels, loc_start, sigma)
    return total / count.clamp(min=1), loc_nll(logits, labels, loc_start)


def forward(model, batch: dict, *, attentions: bool = False):
    """One forward pass: logits, the vision map (B, C, H, W) for the dense head, and (when
    `attentions`) the last decoder layer's cross-attention (needs eager attention)."""
    image = model.model.get_image_features(batch["pixel_values"])
    embedded = with_image_embeds({"input_ids": batch["input_ids"], "image_features": image.pooler_output},
                                 model.get_input_embeddings(), model.config.image_token_id)
    out = model(
        inputs_embeds=embedded["inputs_embeds"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        use_cache=False,
        output_attentions=attentions,
    )
    if attentions:
        return out.logits, image.last_hidden_state, out.cross_attentions[-1]
    return out.logits, image.last_hidden_state


def scene_classes(cfg: PretrainConfig) -> tuple[str, ...]:
    """The classes a run's scenes hold: the shapes, and the fabric defects when the run draws
    fabric scenes (the dense head has a channel for each)."""
    return SHAPE_CLASSES + FABRIC_CLASSES if cfg.fabric_share > 0 else SHAPE_CLASSES


def draw_scenes(key: list[int], count: int, *, size: int, max_objects: int,
                fabric_share: float) -> tuple[list[Scene], np.random.Generator]:
    """`count` scenes of `size` px drawn from the seed `key`: each a fabric scene with
    probability `fabric_share`, else a generic one. The choice comes from its own stream
    (`key` + [1]), so with no fabric the scenes are exactly those of a run before fabric
    existed. Returns the scenes and the generator, to draw the tasks from next."""
    rng = np.random.default_rng(key)
    fabric = np.random.default_rng([*key, 1]).random(count) < fabric_share
    scenes = [(make_fabric_scene if f else make_scene)(rng, size, max_objects=max_objects) for f in fabric]
    return scenes, rng


def make_batch(cfg: PretrainConfig, step: int, *, shape: TinyShape, batcher: Batcher, loc_start: int) -> dict:
    """Everything step `step` needs, as CPU tensors: model inputs and labels of fresh scenes
    drawn from `seed + step` (tasks from the mix), the dense head's targets and the pointer mask."""
    max_objects = 1 if step < cfg.one_object_steps else cfg.max_objects
    scenes, rng = draw_scenes([cfg.seed, step], cfg.batch_size, size=shape.image_size, max_objects=max_objects,
                              fabric_share=cfg.fabric_share)
    names = list(cfg.task_mix)
    probs = np.array([cfg.task_mix[n] for n in names], dtype=np.float64)
    tasks = rng.choice(names, size=len(scenes), p=probs / probs.sum())
    pairs = [scene_sample(s, t, rng) for s, t in zip(scenes, tasks)]
    # Scenes are drawn at the model's input size, so the processor would only rescale and
    # normalise: ship the uint8 pixels (a quarter of the bytes) and normalise on the device.
    # Leaving that work undone saves the scene workers 3-4 ms a scene at 384 px (measured on
    # 2 CPU cores: 66-94 ms -> 20-22 ms of processor time for 16 scenes).
    batch = batcher(scenes, [p for p, _ in pairs], [a for _, a in pairs], raw_pixels=True)
    heat, reg, mask = dense_targets(scenes, shape.grid, shape.image_size, scene_classes(cfg))
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
            yield make_batch(self.cfg, step, shape=self.shape, batcher=self.batcher, loc_start=self.loc_start)


@torch.no_grad()
def looking_check(model, processor, cfg: PretrainConfig, *, size: int, loc_start: int,
                  fabric_share: float | None = None) -> dict:
    """Is it looking? Loc NLL with right vs shuffled images, and free-running <OD> mAP50
    (boxes scored from the generation's log-probabilities, as `loomlens eval` does), on
    `cfg.eval_images` held-out scenes (seed + 999 999), fabric ones at `fabric_share`
    (default: the run's)."""
    from loomlens.evaluate.metrics import coco_metrics
    from loomlens.infer import detect

    model.eval()
    batcher = Batcher(processor)
    share = cfg.fabric_share if fabric_share is None else fabric_share
    scenes, rng = draw_scenes([cfg.seed + 999_999, 0], cfg.eval_images, size=size, max_objects=cfg.max_objects,
                              fabric_share=share)
    classes = scene_classes(cfg)
    pairs = [scene_sample(s, "od", rng) for s in scenes]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batcher(scenes, [p for p, _ in pairs], [a for _, a in pairs]).items()}
    right = loc_nll(forward(model, batch)[0], batch["labels"], loc_start)
    shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
    wrong = loc_nll(forward(model, shuffled)[0], batch["labels"], loc_start)
    images, truth = [s.image for s in scenes], [s.boxes for s in scenes]
    free, constrained = (
        detect(model, processor, images, max_boxes=cfg.max_objects + 2, batch_size=16,
               classes=classes, constrained=grammar)
        for grammar in (False, True)
    )
    model.train()
    return {
        "loc_nll": float(right),
        "loc_nll_shuffled": float(wrong),
        "map50": coco_metrics(truth, free, list(classes))["map50"],
        "map50_constrained": coco_metrics(truth, constrained, list(classes))["map50"],
        "distinct_first_boxes": len({(round(p[0].x1), round(p[0].y1)) for p in free if p}),
    }


def progress(cfg: PretrainConfig, step: int, elapsed: float) -> float:
    """How far through the run it is, 0..1: fine-tuning's schedule position (`step`, or
    further when a `time_budget` runs out first) over `cfg.steps`."""
    return min(1.0, position(step, elapsed, cfg.steps, cfg.time_budget) / cfg.steps)


@dataclass
class Pretraining:
    """What the loop works with, from `setup`: the model and its dense head, their optimizer,
    the `<loc_0>` id, where the state is kept, and where the run stands."""

    cfg: PretrainConfig
    model: torch.nn.Module
    processor: object
    shape: TinyShape
    head: DenseHead
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loc_start: int
    device: torch.device
    state_path: Path
    step: int = 0
    started: float = 0.0  # time.time() minus the seconds of the runs this one resumes

    def elapsed(self) -> float:
        return time.time() - self.started

    def save(self) -> None:
        """Write the resumable state atomically and without pickle (`checkpoint.write_state`)."""
        payload = {"model": self.model.state_dict(), "head": self.head.state_dict(),
                   "optimizer": optimizer_payload(self.optimizer), "step": self.step, "elapsed": self.elapsed()}
        write_folder(self.state_path, lambda tmp: write_state(tmp, "state", payload))


def setup(cfg: PretrainConfig, log=print) -> Pretraining:
    """Build (or resume from `cfg.out/state/`) the tiny model, its dense head and optimizer;
    a new run starts from `cfg.init`'s weights when given (`model/warm_start.py`). Writes the
    resolved config to `cfg.out/pretrain_config.json`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, shape = build_tiny(TinyShape(**cfg.shape), seed=cfg.seed)
    (out / "pretrain_config.json").write_text(config_record(cfg, shape))
    if cfg.init and not (out / "state").exists():
        left = warm_start(model, processor, cfg.init)
        log(f"warm start from {cfg.init} at {shape.image_size} px; left at init: {left or 'nothing'}")
    model.set_attn_implementation("eager")  # the pointer loss reads cross-attention weights
    loc_ids = loc_token_ids(processor.tokenizer)
    assert loc_ids == list(range(loc_ids[0], loc_ids[0] + 1000)), "loc tokens must be contiguous"
    head = DenseHead(shape.vision_dims[-1], len(scene_classes(cfg)))
    model.to(device)
    head.to(device)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Pretraining(cfg, model, processor, shape, head, optimizer, params, loc_ids[0], device, out / "state")
    recover_folder(run.state_path)
    if (out / "state.pt").exists() and not run.state_path.exists():
        raise UnsafeCheckpointError(f"{out / 'state.pt'} was written by an older loomlens as a pickle, which is "
                                    "never read (it can run code): delete it to start afresh, or use a new --work")
    elapsed = 0.0
    if run.state_path.exists():
        state = read_state(run.state_path, "state")
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        load_optimizer(optimizer, state["optimizer"])
        run.step, elapsed = state["step"], state["elapsed"]
        log(f"resumed at step {run.step}")
    run.started = time.time() - elapsed
    return run


def train_step(run: Pretraining, batch: dict) -> dict:
    """One optimizer step on `batch` (CPU tensors from `make_batch`), lr and soft-label width
    where the schedule is; returns the step's log record. Raises FloatingPointError on a
    NaN/inf loss (the last saved state stays)."""
    cfg = run.cfg
    where = position(run.step, run.elapsed(), cfg.steps, cfg.time_budget)
    lr = cfg.lr * lr_factor(where, warmup_steps(cfg.warmup, cfg.steps), cfg.steps, "cosine")
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sigma = cfg.loc_sigma * (cfg.loc_sigma_end / cfg.loc_sigma) ** progress(cfg, run.step, run.elapsed())
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    batch["pixel_values"] = normalize_pixels(batch["pixel_values"], run.processor.image_processor)
    logits, features, cross = forward(run.model, batch, attentions=True)
    loss, loc = seq_loss(logits, batch["labels"], run.loc_start, sigma)
    aux = dense_loss(run.head(features), batch["heat"], batch["reg"], batch["mask"], len(scene_classes(cfg)))
    point = pointer_loss(cross, batch["pointer"])
    total = loss + cfg.dense_weight * aux + cfg.pointer_weight * point
    if not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()} at step {run.step}; last good state is in {run.state_path}")
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    run.step += 1
    return {"step": run.step, "loss": loss.item(), "loc_nll": loc.item(), "dense": aux.item(),
            "pointer": point.item(), "lr": lr, "elapsed": run.elapsed()}


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    """Run (or resume) pretraining into `cfg.out`.

    Returns the last "is it looking?" figures with `step`, the trained `model`, `processor`,
    `shape`, and `done` (False when stopped early by `stop_at` or Ctrl-C: run it again to resume).
    """
    from tqdm import tqdm

    run = setup(cfg, log)
    torch.manual_seed(cfg.seed + run.step)
    batches = torch.utils.data.DataLoader(
        StepBatches(cfg, run.shape, run.processor, run.loc_start, run.step, cfg.steps),
        batch_size=None, num_workers=cfg.workers, pin_memory=run.device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
    )
    last: dict = {}
    run.model.train()
    bar = tqdm(total=cfg.steps, initial=run.step, desc="pretrain", dynamic_ncols=True)
    try:
        for batch in batches:
            if progress(cfg, run.step, run.elapsed()) >= 1.0:
                break
            record = train_step(run, batch)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", loc=f"{record['loc_nll']:.2f}",
                            point=f"{record['pointer']:.2f}", lr=f"{record['lr']:.1e}")
            finishing = progress(cfg, run.step, run.elapsed()) >= 1.0
            if run.step % cfg.eval_every == 0 or finishing:
                last = looking_check(run.model, run.processor, cfg, size=run.shape.image_size, loc_start=run.loc_start)
                record.update(last)
                log(f"step {run.step}: {json.dumps(last)}")
            with (Path(cfg.out) / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            stopping = cfg.stop_at is not None and run.step >= cfg.stop_at
            if run.step % cfg.save_every == 0 or finishing or stopping:
                run.save()
            if stopping:
                log(f"stopped at step {run.step} (stop_at); run the same command to resume")
            if finishing or stopping:
                break
    except KeyboardInterrupt:
        run.save()
        log(f"interrupted at step {run.step}; state saved, run the same command to resume")
    bar.close()
    done = progress(cfg, run.step, run.elapsed()) >= 1.0
    if done and not last:  # resumed a finished run: measure it again for the export
        last = looking_check(run.model, run.processor, cfg, size=run.shape.image_size, loc_start=run.loc_start)
    run.model.set_attn_implementation("sdpa")
    run.model.eval()
    return {"step": run.step, "done": done, "model": run.model, "processor": run.processor, "shape": run.shape,
            **last}


def config_record(cfg: PretrainConfig, shape: TinyShape) -> str:
    """`pretrain_config.json`: `cfg` as JSON with the model shape it resolved to."""
    return json.dumps({**cfg.model_dump(), "shape": asdict(shape)}, indent=2)


def export_tiny(model, processor, folder: str | Path, *, cfg: PretrainConfig, shape: TinyShape,
                figures: dict) -> Path:
    """Save the pretrained tiny model where `load_model` finds a Florence-2 folder.

    Weights are stored in fp16 (half the size in git; `load_model` upcasts to fp32) beside the
    processor files, `pretrain_config.json` and `pretrain_figures.json`, swapped in whole
    (`data.atomic.write_folder`), so a crash never leaves a half-written asset. A hand-written
    model card (`README.md`) already in `folder` is kept."""
    folder = Path(folder)

    def fill(tmp: Path) -> None:
        half = type(model)(model.config)
        half.load_state_dict(model.state_dict())
        half.to(torch.float16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "pretrain_config.json").write_text(config_record(cfg, shape))
        (tmp / "pretrain_figures.json").write_text(json.dumps(figures, indent=2))
        if (folder / "README.md").exists():
            shutil.copy2(folder / "README.md", tmp / "README.md")

    write_folder(folder, fill)
    return folder


def finish_pretraining(result: dict, cfg: PretrainConfig, folder: str | Path) -> dict:
    """Measure the finished model against a random-init one of the same shape, then export.

    Returns the figures written beside the weights (`pretrain_figures.json`): the "is it
    looking?" check of the pretrained model and of the random-init baseline on the run's mix
    of scenes; a run with fabric scenes adds the pretrained model on generic scenes alone
    (`pretrained_generic`, comparable with a generic-only model's `pretrained`) and on fabric
    scenes alone (`pretrained_fabric`).
    """
    model, processor, shape = result["model"], result["processor"], result["shape"]
    loc_start = loc_token_ids(processor.tokenizer)[0]
    baseline, _, _ = build_tiny(shape, seed=cfg.seed)
    check = {"size": shape.image_size, "loc_start": loc_start}
    figures = {
        "steps": result["step"],
        "pretrained": looking_check(model, processor, cfg, **check),
        "random_init": looking_check(baseline.eval(), processor, cfg, **check),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if cfg.fabric_share > 0:
        figures["pretrained_generic"] = looking_check(model, processor, cfg, fabric_share=0.0, **check)
        figures["pretrained_fabric"] = looking_check(model, processor, cfg, fabric_share=1.0, **check)
    export_tiny(model, processor, folder, cfg=cfg, shape=shape, figures=figures)
    return figures


def command_line() -> argparse.ArgumentParser:
    """The maintainer command's options: where to write, and the `PretrainConfig` knobs a run
    is steered by (the rest keep their defaults)."""
    parser = argparse.ArgumentParser(description="Pretrain the embedded tiny Florence-2 on synthetic scenes.")
    parser.add_argument("--out", default="runs/pretrain/tiny-florence2",
                        help="where the model is written (the shipped one: src/loomlens/assets/tiny-florence2)")
    parser.add_argument("--work", default="runs/pretrain", help="resumable state, log and config of the run")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    for name in ("steps", "batch_size", "lr", "seed", "time_budget", "stop_at", "eval_every", "eval_images",
                 "workers", "threads", "fabric_share", "init", "one_object_steps"):
        field = PretrainConfig.model_fields[name]
        parser.add_argument(f"--{name.replace('_', '-')}", default=None, help=field.description)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input edge in px (the model shape's image_size; default 256, tiny-hr: 384)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m loomlens.train.pretrain`: pretrain (resuming from `--work`), then measure and
    export the model to `--out`. The shipped asset is updated only when `--out` names it."""
    args = command_line().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("out", "work", "image_size")}
    shape = {} if args.image_size is None else {"shape": {"image_size": args.image_size}}
    cfg = PretrainConfig.model_validate({**given, **shape, "out": args.work})
    result = pretrain(cfg)
    if not result["done"]:
        print(f"stopped at step {result['step']}; run the same command to resume")
        return
    figures = finish_pretraining(result, cfg, args.out)
    print(f"tiny model written to {args.out}: {figures}")


if __name__ == "__main__":
    main()
