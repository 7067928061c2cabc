"""Predict on files and write the results to a folder (`loomlens predict`):

- `predictions.jsonl`: one line per image or sampled video frame (see `prediction_record`);
- `drawn/`: each picture with its prediction drawn once, one file per picture (two inputs of
  the same name from two folders get two names, see `unique_stem`);
- `rules-applied.yaml`: the region rules applied, if any (only a box task's answers are
  filtered by them; a name of predict's own: a `regions.yaml` a person wrote in the same
  folder is never rewritten or removed, and neither is one an older loomlens predict wrote
  there: it wrote no mark, so it cannot be told from a person's or a run's own rules);
- `coco_results.json` (optional): COCO *results*, a list of `image_id`, `category_id`, `bbox`
  ([x, y, w, h] pixels) and `score`, with `coco_images.json` beside it: the images and
  categories those ids refer to (`COCO("coco_images.json").loadRes("coco_results.json")`);
- pre-annotations (optional, `save_labels`): see `loomlens.predict.labels`;
- `problems.json`: the inputs that gave no prediction (empty, truncated, corrupt, a file name
  that is not UTF-8, a region outside the picture), each with the reason; they are skipped,
  never fatal to the others. With pre-annotations for a web tool it also names the pictures,
  predicted all the same, whose EXIF orientation that tool shows turned (`LabelsOut.add`).

Every file is written whole or not at all (`loomlens.data.atomic`): `predictions.jsonl` is
written to a temporary file and renamed over the old one only when the run completes, so a
run that fails or is interrupted midway leaves an earlier good file as it was. A run that
predicted nothing (every input bad) leaves an earlier run's files alone too. What an
interrupted run had predicted is not lost: the same command again goes on from there
(`loomlens.predict.resume`). A run that completes removes what an earlier run into the same
folder left and it did not write (COCO results, applied rules, drawn pictures of other inputs),
and draws every picture again, also one read back from an interrupted run, so the folder never
mixes two runs; pre-annotations for a labelling tool, and every file predict did not write, are
left alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from loomlens.data.atomic import atomic_save_image, atomic_write, output_folder
from loomlens.data.tasks import TASKS, get_task, parse_region
from loomlens.infer.detection import batched
from loomlens.infer.tiling import TILE_MODES
from loomlens.model.loader import resolve_model_path
from loomlens.predict.draw import draw_prediction, fit_jpeg
from loomlens.predict.labels import LABEL_FORMATS, LabelsOut
from loomlens.predict.predictor import Prediction, Predictor
from loomlens.predict.regions import RegionRules, load_rules, save_rules
from loomlens.predict.resume import (
    PartialRecords,
    fingerprint,
    item_key,
    prediction_from_record,
)
from loomlens.predict.sources import Item, Problem, expand_inputs, iter_items

#: The region rules a run applied, under a name of predict's own: never the `regions.yaml` a
#: person wrote in a run folder that is also `--out`.
RULES_APPLIED = "rules-applied.yaml"
#: The first line of `RULES_APPLIED`: what marks the file predict's, to replace or remove.
RULES_HEADER = "# written by loomlens predict: the region rules its predictions.jsonl was filtered by\n"


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
    OSError: something about one image), each item is tried alone, and one it refuses alone
    (a chunk of one too) becomes a problem naming its file. Anything else (the model itself
    failing) propagates."""
    try:
        return list(zip(chunk, predictor.predict([i.image for i in chunk], **options)))
    except (ValueError, OSError) as exc:
        if len(chunk) == 1:
            item = chunk[0]
            where = str(item.source) if item.frame is None else f"{item.source} frame {item.frame}"
            problems.append(Problem(str(item.source), f"{where}: {exc}", item.frame))
            return []
    return [pair for item in chunk for pair in predict_chunk(predictor, [item], problems, **options)]


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
                     **options) -> list[tuple[Item, Prediction, dict]]:
    """`(item, prediction, record)` for the items of `chunk` that gave one, in their order: an
    item an interrupted run predicted is read back from `partial`; the others are predicted
    (`predict_chunk`) and their records appended to `partial` before anything else of theirs
    is written."""
    todo = [i for i in chunk if item_key(i.source, i.frame) not in partial.done]
    fresh = {id(i): (p, prediction_record(i, p)) for i, p in
             (predict_chunk(predictor, todo, problems, **options) if todo else [])}
    partial.add([record for _, record in fresh.values()])
    out = []
    for item in chunk:
        kept = partial.done.get(item_key(item.source, item.frame))
        if kept is not None:
            out.append((item, prediction_from_record(kept), kept))
        elif id(item) in fresh:
            out.append((item, *fresh[id(item)]))
    return out


def check_options(task: str, text: str | None, tile: str, save_labels: str | None = None,
                  regions: str | Path | None = None) -> None:
    """Refuse, before a model loads or a file is written, options no picture could be predicted
    with: an unknown `task` or `tile` mode, `text` missing for a task that needs it or given to
    one that takes none, a region that is no box, `save_labels` in an unknown format or for a
    task whose answer holds no boxes (its annotation files would be empty, and an empty one is
    taken for a picture labelled clean), or a `regions` rules file `load_rules` refuses. Raises
    ValueError saying what is valid."""
    if regions is not None:
        load_rules(regions)
    spec = get_task(task)
    if tile not in TILE_MODES:
        raise ValueError(f"--tile must be one of {', '.join(TILE_MODES)}, got {tile!r}")
    if spec.needs is None and text is not None:
        takes = ", ".join(t.name for t in TASKS.values() if t.needs)
        raise ValueError(f"task {spec.name!r} takes no --text; the tasks that take one: {takes}")
    if spec.needs is not None and not (text or "").strip():
        raise ValueError(f"task {spec.name!r} needs --text: "
                         + ("a phrase" if spec.needs == "text" else "a region, x1,y1,x2,y2 in pixels or four <loc_N>"))
    if spec.needs == "region":
        parse_region(text or "")
    if save_labels is not None and save_labels not in LABEL_FORMATS:
        raise ValueError(f"--save-labels must be one of {', '.join(LABEL_FORMATS)}, got {save_labels!r}")
    if save_labels is not None and spec.answer != "boxes":
        boxed = [t.name for t in TASKS.values() if t.answer == "boxes"]
        raise ValueError(f"--save-labels writes boxes, and task {spec.name!r} answers {spec.answer}: use it with "
                         f"{', '.join(boxed)}, or leave --save-labels out")


def own_outputs(out: str | Path, labels_out: str | Path | None = None) -> list[Path]:
    """The folders predict writes pictures into in `out` (`drawn/`, every format's default
    pre-annotations folder) and `labels_out`: what an input folder holding `out` never
    predicts on, so a second run into its own input folder reads only the inputs."""
    out = Path(out)
    labels = [out / f"labels-{fmt}" for fmt in LABEL_FORMATS] + ([Path(labels_out)] if labels_out else [])
    return [out / "drawn", *labels]


def applied_rules(predictor: Predictor, task: str) -> RegionRules | None:
    """The region rules a `task` run of `predictor` filters its answers by: the predictor's for
    a box task, None for any other (captions, text, polygons are not filtered)."""
    return predictor.rules if get_task(task).answer == "boxes" else None


def other_rules(out: Path, rules: RegionRules | None) -> Problem | None:
    """A notice when `out` holds a `regions.yaml` that is not the `rules` this run applied: an
    older predict wrote the applied rules under that name, so it may be taken for the rules in
    force. It is never removed (a person's or a run's own file looks the same); None when it
    is absent or the same rules."""
    path = out / "regions.yaml"
    if not path.is_file():
        return None
    try:
        if rules is not None and load_rules(path) == rules:
            return None
    except ValueError:  # not rules at all: all the more not the ones applied
        pass
    applied = f"those are in {RULES_APPLIED}" if rules is not None else "none were"
    return Problem(str(path), f"{path} is not the region rules this run applied ({applied}); an older loomlens "
                              "predict wrote its rules under this name: delete it if you did not write it")


def _rules_file_is_ours(path: Path) -> bool:
    """Whether `path` is absent or the rules file a predict run wrote (`RULES_HEADER` first):
    only those are written or removed, never a file a person wrote there."""
    if not path.exists():
        return True
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline() == RULES_HEADER
    except OSError:
        return False


def _remove_stale(out: Path, *, coco: bool, rules: bool, drawn: set[str]) -> None:
    """Remove what an earlier run left in `out` that this one did not write (COCO results
    without `--coco`, applied rules without rules, drawn pictures of other inputs), so that the
    folder never holds results of two runs. Only predict's own files go: pre-annotations for a
    labelling tool stay (they may have been edited since), and so does every other file."""
    stale = [] if coco else ["coco_results.json", "coco_images.json"]
    if not rules and _rules_file_is_ours(out / RULES_APPLIED):
        stale.append(RULES_APPLIED)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    if (out / "drawn").is_dir():
        for picture in (out / "drawn").glob("*.jpg"):
            if picture.name not in drawn:
                picture.unlink(missing_ok=True)


def _write_results(out: Path, records: list[dict], problems: list[Problem], predictor: Predictor, *, coco: bool,
                   labels: LabelsOut | None, drawn: set[str] | None, rules: RegionRules | None) -> list[str]:
    """Write a finished run's files into `out` (`drawn`: the names of the pictures it drew,
    None without drawing; `rules`: those applied, `applied_rules`) and remove an earlier run's
    leftovers (`_remove_stale`); returns what was written. A run that predicted nothing leaves
    an earlier run's files as they were: it writes only `problems.json`, and that only where no
    `predictions.jsonl` is there."""
    if not records:
        if (out / "predictions.jsonl").exists():
            return []
        atomic_write(out / "problems.json", json.dumps([p.as_dict() for p in problems], indent=1) + "\n")
        return ["problems.json"]
    atomic_write(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    written = ["predictions.jsonl", *(["drawn/"] if drawn is not None else [])]
    atomic_write(out / "problems.json", json.dumps([p.as_dict() for p in problems], indent=1) + "\n")
    written.append("problems.json")
    # The rules these results were filtered by, kept beside them (never over a file a person wrote).
    if rules is not None and _rules_file_is_ours(out / RULES_APPLIED):
        save_rules(rules, out / RULES_APPLIED, header=RULES_HEADER)
        written.append(RULES_APPLIED)
    if coco:
        results, document = coco_results(records, predictor.loaded.classes)
        atomic_write(out / "coco_images.json", json.dumps(document))
        atomic_write(out / "coco_results.json", json.dumps(results))
        written += ["coco_results.json", "coco_images.json"]
    if labels is not None:
        written += [f"{labels.out}/{name}" for name in labels.finish()]
    _remove_stale(out, coco=coco, rules=rules is not None, drawn=drawn or set())
    return written


def _output_folder(out: Path) -> None:
    """Make the output folder `out`; ValueError naming it and the fix where it cannot be."""
    try:
        output_folder(out)
    except OSError as err:
        raise ValueError(f"the output folder {out} (--out) cannot be made ({err.strerror or err}): give a folder "
                         "path whose parents are folders you can write to") from None


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
    `problems.json` and the summary's `problems`; pictures predicted with something to know
    (`LabelsOut.add`) in `problems.json` and its `notices`. Returns a summary: counts, problems,
    notices, the files written.
    Raises ValueError for options no picture could be predicted with (`check_options`,
    `Predictor.check_text`)."""
    check_options(task, text, tile, save_labels)
    predictor.check_text(task, text)  # a phrase too long for the model: said once, not once a picture
    out = Path(out)
    problems: list[Problem] = []
    files = expand_inputs(inputs, exclude=own_outputs(out, labels_out), on_problem=problems.append)
    _output_folder(out)
    records: list[dict] = []
    used: set[str] = set()
    pictures: set[str] = set()  # the names in drawn/ this run's pictures have
    notices: list[Problem] = []  # pictures predicted, with something to know (`LabelsOut.add`)
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
        for item, prediction, record in predict_or_reuse(predictor, chunk, problems, partial, **options):
            records.append(record)
            name = unique_stem(item, used)
            pictures.add(f"{name}.jpg")
            if draw:  # also for a record read back: a picture an earlier run drew may show other settings
                atomic_save_image(fit_jpeg(draw_prediction(item.image, prediction)), out / "drawn" / f"{name}.jpg",
                                  "JPEG")
            if labels is not None and (notice := labels.add(item, prediction, name)) is not None:
                notices.append(notice)
            if on_item:
                on_item()
        if on_item:
            for _ in problems[failed:]:
                on_item()
    applied = applied_rules(predictor, task)
    if records and (notice := other_rules(out, applied)) is not None:
        notices.append(notice)
    written = _write_results(out, records, problems + notices, predictor, coco=coco, labels=labels,
                             drawn=pictures if draw else None, rules=applied)
    if records:  # else an interrupted run's records stay, for its own command to go on from
        partial.finish()
    return {"files": len(files), "items": len(records), "boxes": sum(len(r["boxes"]) for r in records),
            "resumed": len(partial.done), "problems": [p.as_dict() for p in problems],
            "notices": [p.as_dict() for p in notices], "out": str(out), "written": written}
