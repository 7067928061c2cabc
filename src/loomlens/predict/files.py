"""Predict on files and write the results to a folder (`loomlens predict`):

- `predictions.jsonl`: one line per image or sampled video frame (see `prediction_record`);
- `drawn/`: each picture with its prediction drawn once, one file per picture (two inputs of
  the same name from two folders get two names, see `unique_stem`);
- `regions.yaml`: the region rules applied, if any;
- `coco_results.json` (optional): COCO *results*, a list of `image_id`, `category_id`, `bbox`
  ([x, y, w, h] pixels) and `score`, with `coco_images.json` beside it: the images and
  categories those ids refer to (`COCO("coco_images.json").loadRes("coco_results.json")`);
- pre-annotations (optional, `save_labels`): see `loomlens.predict.labels`;
- `problems.json`: the inputs that gave no prediction (empty, truncated, corrupt), each with
  the reason; they are skipped, never fatal to the others.

Every file is written whole or not at all (`loomlens.data.atomic`): `predictions.jsonl` is
written to a temporary file and renamed over the old one only when the run completes, so a
run that fails or is interrupted midway leaves an earlier good file as it was. A run that
predicted nothing (every input bad) leaves an existing `predictions.jsonl` alone too. What an
interrupted run had predicted is not lost: the same command again goes on from there
(`loomlens.predict.resume`). A run that completes removes what an earlier run into the same
folder left and it did not write (COCO results, rules, drawn pictures of other inputs), so the
folder never mixes two runs; pre-annotations for a labelling tool are left alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from loomlens.data.atomic import atomic_save_image, atomic_write, output_folder
from loomlens.infer.detection import batched
from loomlens.model.loader import resolve_model_path
from loomlens.predict.draw import draw_prediction
from loomlens.predict.labels import LabelsOut
from loomlens.predict.predictor import Prediction, Predictor
from loomlens.predict.regions import save_rules
from loomlens.predict.resume import (
    PartialRecords,
    fingerprint,
    item_key,
    prediction_from_record,
)
from loomlens.predict.sources import Item, Problem, expand_inputs, iter_items
from loomlens.run import RULES_FILE


def prediction_record(item: Item, prediction: Prediction) -> dict:
    """One JSONL line: source file, frame and timestamp (video), task, size, boxes in pixels
    with label and score, polygons, text, whether the model was trained for the task, and its
    `answer_probability` (for od: that the frame holds a defect)."""
    return {
        "source": str(item.source),
        "frame": item.frame,
        "timestamp": item.timestamp,
        "task": prediction.task,
        "width": prediction.width,
        "height": prediction.height,
        "boxes": [
            {"label": b.label, "score": None if b.score is None else round(b.score, 5),
             "box": [round(v, 2) for v in (b.x1, b.y1, b.x2, b.y2)]}
            for b in prediction.boxes
        ],
        "polygons": [{"label": label, "points": [[round(x, 2), round(y, 2)] for x, y in pts]}
                     for label, pts in prediction.polygons],
        "text": prediction.text,
        "trained": prediction.trained,
        "tiled": prediction.tiled,
        "dropped": prediction.dropped,
        # Unrounded: on a model sure of its answer it sits within 1e-6 of 1, and ties would blur the ranking.
        "answer_probability": prediction.answer_probability,
    }


def unique_stem(item: Item, used: set[str]) -> str:
    """A file stem for `item` no other item of the run has (added to `used`): the source's
    stem (plus `_f<frame>` for a video frame); then with its folder's name before it when two
    inputs share a name; then with a counter."""
    stem = item.source.stem if item.frame is None else f"{item.source.stem}_f{item.frame:06d}"
    candidates = [stem, f"{item.source.parent.name}_{stem}", *(f"{stem}_{i}" for i in range(2, len(used) + 3))]
    chosen = next(c for c in candidates if c not in used)
    used.add(chosen)
    return chosen


def coco_results(records: Sequence[dict], classes: Sequence[str]) -> tuple[list[dict], dict]:
    """Prediction records -> (COCO detection results: `image_id`, `category_id`, `bbox` [x, y,
    w, h] and `score` per box; the images and categories document those ids refer to)."""
    names = list(dict.fromkeys([*classes, *(b["label"] for r in records for b in r["boxes"])]))
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, results = [], []
    for image_id, r in enumerate(records, start=1):
        name = r["source"] if r["frame"] is None else f"{r['source']}#{r['frame']}"
        images.append({"id": image_id, "file_name": name, "width": r["width"], "height": r["height"]})
        for b in r["boxes"]:
            x1, y1, x2, y2 = b["box"]
            results.append({"image_id": image_id, "category_id": cat[b["label"]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": 1.0 if b["score"] is None else b["score"]})
    document = {"images": images, "categories": [{"id": i, "name": n} for n, i in cat.items()], "annotations": []}
    return results, document


def predict_chunk(predictor: Predictor, chunk: list[Item], problems: list[Problem], **options
                   ) -> list[tuple[Item, Prediction]]:
    """Predictions for a chunk of items; when the predictor refuses the chunk (ValueError or
    OSError: something about one image), each item is retried alone and the ones it still
    refuses become problems. Anything else (the model itself failing) propagates."""
    try:
        return list(zip(chunk, predictor.predict([i.image for i in chunk], **options)))
    except (ValueError, OSError):
        if len(chunk) == 1:
            raise
    done = []
    for item in chunk:
        try:
            done += predict_chunk(predictor, [item], problems, **options)
        except (ValueError, OSError) as exc:
            problems.append(Problem(str(item.source), f"{item.source}: {exc}", item.frame))
    return done


def run_fingerprint(predictor: Predictor, files: Sequence[Path], options: dict) -> str:
    """`fingerprint` of a predict run: its `files` and `options`, and what decides the answers
    on the predictor's side (model, adapter and their weights, precision, box budget, tiles,
    grammar, the mirrors od looks through, region rules)."""
    loaded = predictor.loaded
    model = {"base": loaded.base, "adapter": loaded.adapter, "backend": predictor.backend,
             "precision": predictor.precision, "max_boxes": predictor.max_boxes, "constrained": predictor.constrained,
             "tile_size": predictor.tile_size, "views": list(predictor.views), "rules": repr(predictor.rules)}
    weights = [Path(resolve_model_path(str(loaded.base)))] + ([Path(loaded.adapter)] if loaded.adapter else [])
    return fingerprint(files, {**options, **model}, weights)


def predict_or_reuse(predictor: Predictor, chunk: list[Item], problems: list[Problem], partial: PartialRecords,
                     **options) -> list[tuple[Item, Prediction, dict, bool]]:
    """`(item, prediction, record, fresh)` for the items of `chunk` that gave one, in their
    order: an item an interrupted run predicted is read back from `partial` (fresh False); the
    others are predicted (`predict_chunk`) and their records appended to `partial` before
    anything else of theirs is written."""
    todo = [i for i in chunk if item_key(i.source, i.frame) not in partial.done]
    fresh = {id(i): (p, prediction_record(i, p)) for i, p in
             (predict_chunk(predictor, todo, problems, **options) if todo else [])}
    partial.add([record for _, record in fresh.values()])
    out = []
    for item in chunk:
        kept = partial.done.get(item_key(item.source, item.frame))
        if kept is not None:
            out.append((item, prediction_from_record(kept), kept, False))
        elif id(item) in fresh:
            out.append((item, *fresh[id(item)], True))
    return out


def _remove_stale(out: Path, *, coco: bool, rules: bool, drawn: set[str]) -> None:
    """Remove what an earlier run left in `out` that this one did not write (COCO results
    without `--coco`, rules without rules, drawn pictures of other inputs), so that the folder
    never holds results of two runs. Pre-annotations for a labelling tool stay: they may have
    been edited since."""
    stale = [*(["coco_results.json", "coco_images.json"] if not coco else []), *([RULES_FILE] if not rules else [])]
    for name in stale:
        (out / name).unlink(missing_ok=True)
    if (out / "drawn").is_dir():
        for picture in (out / "drawn").glob("*.jpg"):
            if picture.name not in drawn:
                picture.unlink(missing_ok=True)


def _write_results(out: Path, records: list[dict], problems: list[Problem], predictor: Predictor, *, coco: bool,
                   labels: LabelsOut | None, drawn: set[str] | None) -> list[str]:
    """Write a finished run's files into `out` (`drawn`: the names of the pictures it drew,
    None without drawing) and remove an earlier run's leftovers (`_remove_stale`); returns
    what was written. A run that predicted nothing writes no `predictions.jsonl`, and leaves an
    earlier one as it was."""
    written = []
    if records:
        atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        written.append("predictions.jsonl")
    if drawn is not None and records:
        written.append("drawn/")
    atomic_write(out / "problems.json", json.dumps([p.as_dict() for p in problems], indent=1) + "\n")
    written.append("problems.json")
    if predictor.rules is not None:  # the rules these results were filtered by, kept beside them
        save_rules(predictor.rules, out / RULES_FILE)
        written.append(RULES_FILE)
    if coco and records:
        results, document = coco_results(records, predictor.loaded.classes)
        atomic_write(out / "coco_images.json", json.dumps(document))
        atomic_write(out / "coco_results.json", json.dumps(results))
        written += ["coco_results.json", "coco_images.json"]
    if labels is not None and records:
        written += [f"{labels.out}/{name}" for name in labels.finish()]
    if records:
        _remove_stale(out, coco=coco, rules=predictor.rules is not None, drawn=drawn or set())
    return written


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    task: str = "od",
    text: str | None = None,
    tile: str = "auto",
    every: int = 1,
    score_threshold: float = 0.0,
    coco: bool = False,
    draw: bool = True,
    on_item: Callable[[], None] | None = None,
    save_labels: str | None = None,
    labels_out: str | Path | None = None,
) -> dict:
    """Predict on every image and sampled video frame of `inputs` (files, folders, globs,
    videos) and write the results into `out` (see the module docstring). `save_labels` (voc |
    yolo | labelstudio | coco) also writes pre-annotations for that labelling tool into
    `labels_out` (default `out/labels-<format>`; see `loomlens.predict.labels`). Frames go through
    the predictor `predictor.batch_size` at a time; `on_item()` is called after each item
    (progress, also for a skipped item). Unreadable inputs are skipped and listed in
    `problems.json` and the summary. Returns a summary: counts, problems, the files written."""
    out = Path(out)
    files = expand_inputs(inputs, exclude=[out, *([labels_out] if labels_out else [])])
    output_folder(out)
    records: list[dict] = []
    problems: list[Problem] = []
    used: set[str] = set()
    pictures: set[str] = set()  # the names in drawn/ this run's pictures have
    labels = None if save_labels is None else LabelsOut(
        labels_out or out / f"labels-{save_labels}", save_labels, list(predictor.loaded.classes),
        str(predictor.loaded.adapter or predictor.loaded.base))

    def skipped(problem: Problem) -> None:
        problems.append(problem)
        if on_item:
            on_item()

    options = {"task": task, "text": text, "tile": tile, "score_threshold": score_threshold}
    partial = PartialRecords(out, run_fingerprint(predictor, files, {
        **options, "every": every, "draw": draw, "save_labels": save_labels, "labels_out": labels_out}))
    # Items stream in: a video is never held whole in memory.
    for chunk in batched(iter_items(files, every, skipped), predictor.batch_size):
        failed = len(problems)
        for item, prediction, record, fresh in predict_or_reuse(predictor, chunk, problems, partial, **options):
            records.append(record)
            name = unique_stem(item, used)
            drawn = out / "drawn" / f"{name}.jpg"
            pictures.add(drawn.name)
            if draw and (fresh or not drawn.exists()):
                atomic_save_image(draw_prediction(item.image, prediction), drawn, "JPEG")
            if labels is not None:
                labels.add(item, prediction, name)
            if on_item:
                on_item()
        if on_item:
            for _ in problems[failed:]:
                on_item()
    written = _write_results(out, records, problems, predictor, coco=coco, labels=labels,
                             drawn=pictures if draw else None)
    partial.finish()
    return {"files": len(files), "items": len(records), "boxes": sum(len(r["boxes"]) for r in records),
            "resumed": len(partial.done), "problems": [p.as_dict() for p in problems], "out": str(out),
            "written": written}

