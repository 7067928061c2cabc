"""`loomlens demo`: the main job end to end on the embedded tiny model, on a CPU.

synthetic loom frames -> convert (od, flipped copies) -> evaluate the untrained model ->
LoRA fine-tune -> evaluate the best checkpoint (report with PR curves, confusion matrix) ->
`OUT/demo.md`, a before/after table with where everything is.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from loomlens.config import DemoConfig, TrainConfig, load_config, resolve_config_path


def run_demo(
    out: str | Path = "runs/demo",
    *,
    images: int | None = None,
    time_budget: float | None = None,
    device: str = "auto",
    config: str | Path = "demo",
    log: Callable[[str], None] = print,
) -> Path:
    """Run the demo into `out` (`synth/`, `data/`, `run/`, `report/`, `demo.md`) on `device`
    (`model.runtime.resolve_device`); returns the path of `demo.md`. `images` and
    `time_budget` override `configs/demo.yaml`."""
    from loomlens.data.convert import convert
    from loomlens.data.synth import synthesize
    from loomlens.evaluate import evaluate_jsonl, write_report
    from loomlens.infer.loading import load_for_inference
    from loomlens.model.runtime import resolve_device
    from loomlens.train.recipe import train

    demo = DemoConfig.model_validate(yaml.safe_load(resolve_config_path(config).read_text()) or {})
    if images is not None:
        demo.images = images
    out = Path(out)
    run_dir = out / "run"
    overrides = {"data": str(out / "data"), "out": str(run_dir), "device": device}
    if time_budget is not None:
        overrides["time_budget"] = time_budget
    cfg = load_config(TrainConfig, base=demo.train, overrides=overrides)
    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    log(f"1/5 drawing {demo.images} synthetic loom frames {demo.size[0]}x{demo.size[1]} into {out / 'synth'}")
    synthesize(out / "synth", images=demo.images, seed=demo.seed, size=demo.size)
    lap("synth")
    log("2/5 converting to Florence-2 JSONL (with flipped copies)")
    convert(out / "synth", out / "data", tasks=demo.tasks, flip=demo.flip, seed=demo.seed)
    lap("convert")

    val = out / "data" / "val.jsonl"
    # Evaluated as `loomlens predict` runs a model (merged, in the precision auto picks, the
    # trained model through the mirrors it learnt), unless the recipe itself is told fp32.
    precision = "fp32" if cfg.speed.precision == "fp32" else "auto"
    where = str(resolve_device(cfg.device))
    log("3/5 evaluating the untrained model on the val split")
    untrained = load_for_inference(model=cfg.model, device=where, precision=precision)
    before = evaluate_jsonl(untrained.model, untrained.processor, val, max_images=demo.eval_images,
                            batch_size=cfg.eval_batch_size)
    lap("evaluate_before")

    log("4/5 fine-tuning with LoRA")
    if (run_dir / "config.yaml").exists():  # the demo's own previous run: start afresh
        shutil.rmtree(run_dir)
    result = train(cfg, log=log)
    lap("train")

    log("5/5 evaluating the best checkpoint")
    checkpoint = "best" if (run_dir / "checkpoints" / "best").exists() else "last"
    trained = load_for_inference(model=cfg.model, adapter=run_dir, checkpoint=checkpoint, device=where, precision=precision)
    after = write_report(
        trained.model, trained.processor, val, out / "report", max_images=demo.eval_images,
        batch_size=cfg.eval_batch_size, views=trained.views,
        title="loomlens demo: tiny Florence-2 + LoRA on synthetic loom frames",
        extra={"checkpoint": checkpoint, "run": str(run_dir), "baseline": _headline(before),
               "precision": trained.precision},
    )
    lap("evaluate_after")

    summary = out / "demo.md"
    summary.write_text(_markdown(before, after, result.state.step, seconds, out, checkpoint))
    (out / "demo.json").write_text(
        json.dumps({"before": _headline(before), "after": _headline(after), "steps": result.state.step,
                    "seconds": seconds}, indent=2) + "\n"
    )
    return summary


def _headline(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("map50", "map50_95", "map75", "images", "predicted_boxes")}


def _markdown(before: dict, after: dict, steps: int, seconds: dict[str, float], out: Path, checkpoint: str) -> str:
    def row(name: str, m: dict) -> str:
        scores = " | ".join(f"{m[k]:.3f}" for k in ("map50", "map50_95", "map75"))
        return f"| {name} | {scores} | {m.get('predicted_boxes', '-')} |"

    return "\n".join([
        "# loomlens demo", "",
        f"Tiny Florence-2 fine-tuned with LoRA for {steps} steps on synthetic loom frames; "
        f"val split, {after.get('images', '?')} images, evaluated as `loomlens eval` does"
        + (f" (each also through {len(after['views']) - 1} mirrors, boxes fused)." if len(after.get("views", [])) > 1
           else "."), "",
        "| model | mAP50 | mAP50-95 | mAP75 | predicted boxes |", "|---|---|---|---|---|",
        row("untrained (embedded tiny)", before), row(f"+ LoRA ({checkpoint} checkpoint)", after), "",
        "Seconds: " + ", ".join(f"{k} {v:g}" for k, v in seconds.items()) + f"; total {sum(seconds.values()):g}.", "",
        f"- evaluation report: {out / 'report' / 'report.md'}",
        f"- training curves: {out / 'run' / 'curves' / 'loss.png'}, {out / 'run' / 'curves' / 'map.png'}",
        f"- TensorBoard: `tensorboard --logdir {out / 'run' / 'tb'}`",
        f"- adapter: {out / 'run' / 'checkpoints' / checkpoint}; merge it with "
        f"`loomlens merge {out / 'run'} {out / 'merged'}`", "",
    ])
