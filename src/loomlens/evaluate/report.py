"""Evaluate a model on a converted split: `evaluate_jsonl` (metrics only, for training's
validation) and `write_report` (metrics.json, the plots and report.md that links them).

In: a model ready to answer and a split's JSONL. Out: metrics (and files). The boxes come from
`loomlens.infer.detection`, tiled on frames larger than its tiles (`loomlens.infer.tiling`) for a run that
predicts them tiled (`Run.tile`); this module only matches them against the truth and
reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loomlens.config import INFER_BATCH_SIZE
from loomlens.data.atomic import keep_unseen, recover_folder, unseen, write_folder
from loomlens.data.florence_text import parse_text
from loomlens.data.jsonl import validate_split
from loomlens.data.records import Box
from loomlens.data.sanitize import open_image, read_rgb
from loomlens.data.tiles import TILES_DIR
from loomlens.data.yolo import CLASSES_FILE, read_class_names
from loomlens.evaluate.matching import above, best_threshold, confusion_matrix, match_image, placement
from loomlens.evaluate.inspection import frame_score, image_level, image_level_by_class, summary_line
from loomlens.evaluate.metrics import CocoEvaluation, evaluate_coco, located_metrics
from loomlens.evaluate.plots import plot_confusion, plot_gallery, plot_pr_curves, plot_reliability
from loomlens.evaluate.thresholds import threshold_text
from loomlens.infer.detection import Detection, answer_probability, batched, detect_with_details
from loomlens.infer.tiling import should_tile, tiled_detect
from loomlens.run import check_output_folder

#: The file by which a folder is an earlier eval's report (`is_report_folder`).
METRICS = "metrics.json"


@dataclass
class EvalImage:
    """One `<OD>` sample of a split: its image file and true boxes in pixels."""

    path: Path
    truth: list[Box]


@dataclass
class EvalRun:
    """What running a model over a split gives: per-image true and predicted boxes, the
    model's probability that each image holds a defect (`infer.detection.answer_probability`;
    None where not measured), the parser's dropped parts and the wall time per image."""

    images: list[EvalImage]
    predicted: list[list[Box]]
    dropped: int
    seconds_per_image: float
    probabilities: list[float | None] = field(default_factory=list)


def od_images(jsonl: Path, max_images: int | None = None, *, frames_only: bool = False) -> list[EvalImage]:
    """The `<OD>` samples of a converted split, true boxes parsed from their suffix;
    `frames_only` leaves out the tiles `convert --tile` cut (`tiles.TILES_DIR`). The split is
    checked first (`validate_split`: a missing image, one resized since conversion, or true
    boxes that do not parse raise `SplitError` naming the file and line)."""
    jsonl = Path(jsonl)
    out = []
    for s in validate_split(jsonl):
        if s.get("prefix") != "<OD>" or (frames_only and s["image"].startswith(f"{TILES_DIR}/")):
            continue
        path = jsonl.parent / s["image"]
        if "width" in s and "height" in s:
            size = s["width"], s["height"]
        else:  # the seed's samples give none: the locations are shares of the picture as it is
            with open_image(path) as im:
                size = im.size
        out.append(EvalImage(path, parse_text(s["suffix"], *size)[0]))
        if max_images is not None and len(out) >= max_images:
            break
    return out


def eval_images(jsonl: Path, max_images: int | None = None, *, frames_only: bool = False) -> list[EvalImage]:
    """`od_images`, refusing a split with none: ValueError naming the file and the fix, which
    differs for a split `convert` drew no image into (`--val-fraction 0` writes an empty
    val.jsonl) and one without `<OD>` samples. `eval` checks with it before the model loads."""
    jsonl = Path(jsonl)
    images = od_images(jsonl, max_images, frames_only=frames_only)
    if images:
        return images
    if not jsonl.read_text(encoding="utf-8", errors="replace").strip():
        fraction = f" with --{jsonl.stem}-fraction 0.2" if jsonl.stem in ("val", "test") else ""
        raise ValueError(f"{jsonl} holds no samples (convert drew no image into this split): convert the source into "
                         f"a new folder{fraction} and train on that; a split drawn after training would hold images "
                         "the run trained on")
    raise ValueError(f"{jsonl} has no <OD> sample to evaluate; convert the data with the od task")


def run_split(
    model, processor, images: Sequence[EvalImage], classes: Sequence[str] = (), batch_size: int = INFER_BATCH_SIZE,
    max_boxes: int = 20, constrained: bool = False, tile: int | None = None, views: Sequence[str] = ("",),
) -> EvalRun:
    """`<OD>` on every image, loading `batch_size` images at a time (a split of 2560x1440
    frames does not fit in memory at once). With `tile`, a frame longer than it is detected as
    `loomlens predict`'s auto mode does: in overlapping tiles of `tile` px and whole, merged.
    `views`: the mirrors each picture is also looked at through (`infer/tta.py`). Each box is
    also counted under the other classes the model nearly wrote for it (`detect_with_details`'s
    `other_labels`), as a detector's evaluation scores every class of a box (ultralytics' val
    does the same; its predict, like `loomlens predict`, gives one)."""
    predicted: list[list[Box]] = []
    probabilities: list[float | None] = []
    made: list[Detection] = []  # the detections of the frame (or chunk of whole frames) at hand

    def detect(pictures: list[Image.Image], reread_upto: int | None = None) -> list[list[Box]]:
        found = detect_with_details(model, processor, pictures, max_boxes=max_boxes, batch_size=batch_size,
                                    constrained=constrained, classes=classes, views=views, other_labels=True,
                                    reread_upto=reread_upto)
        made.extend(found)
        return [f.boxes for f in found]

    start, dropped = time.perf_counter(), 0
    for chunk in batched(images, batch_size):
        pictures = [read_rgb(e.path) for e in chunk]
        tiled = [tile is not None and should_tile(p.width, p.height, "auto", tile) for p in pictures]
        made.clear()
        detect([p for p, t in zip(pictures, tiled) if not t])
        whole = iter(list(made))
        for picture, is_tiled in zip(pictures, tiled):
            if is_tiled:
                made.clear()
                boxes = tiled_detect(lambda crops: detect(crops, reread_upto=tile), picture, tile,
                                     int(processor.image_processor.size["height"]))
                pieces = list(made)
            else:
                pieces = [next(whole)]
                boxes = pieces[0].boxes
            predicted.append(boxes)
            probabilities.append(answer_probability(pieces))
            dropped += sum(p.dropped for p in pieces)
    elapsed = time.perf_counter() - start
    return EvalRun(list(images), predicted, dropped, elapsed / max(1, len(images)), probabilities)


def split_metrics(run: EvalRun, classes: Sequence[str]):
    """What one pass over a split tells: the COCO evaluation (metrics and PR curves) and, in its
    metrics, `best_threshold`/`best_f1` (the F1-best cut), `empty_on_defects` (share of frames
    holding a defect that got no box at all: the sign of a collapse to "no defect"), `located`
    (the mAPs with the boxes' names set aside, `located_metrics`), `placement` (where the true
    boxes land, `matching.placement`, with every box given and at the best threshold) and
    `image_level` (OK/NG AUROC and recall at false-alarm rates, overall and `per_class`)."""
    truth = [e.truth for e in run.images]
    coco = evaluate_coco(truth, run.predicted, classes)
    threshold, f1 = best_threshold(truth, run.predicted)
    defective = [i for i, t in enumerate(truth) if t]
    empty = sum(not run.predicted[i] for i in defective) / len(defective) if defective else None
    probabilities = run.probabilities or [None] * len(run.predicted)
    ok_ng = image_level(scores=[frame_score(p, q) for p, q in zip(run.predicted, probabilities)],
                        defective=[bool(t) for t in truth])
    ok_ng["per_class"] = image_level_by_class(truth=truth, predicted=run.predicted)
    coco.metrics.update(best_threshold=threshold, best_f1=f1, empty_on_defects=empty,
                        located=located_metrics(truth, run.predicted), image_level=ok_ng,
                        placement={"any_score": placement(truth, run.predicted),
                                   "at_threshold": placement(truth, run.predicted, threshold=threshold)},
                        dropped_parts=run.dropped, seconds_per_image=run.seconds_per_image)
    return coco


def evaluate_jsonl(
    model, processor, jsonl: Path, *, max_images: int | None = None, batch_size: int = INFER_BATCH_SIZE,
    tile: int | None = None, max_boxes: int = 20,
) -> dict:
    """The metrics of `split_metrics` for `model` on the `<OD>` samples of a converted split,
    frames longer than `tile` tiled at it when given (`run_split`; the split's own tiles are then left
    out, so that each defect counts once, in its frame), at most `max_boxes` read an image.
    Classes come from the split's `classes.txt` when present. Cheap enough for training's
    validation with `max_images`."""
    classes = read_class_names(Path(jsonl).parent / CLASSES_FILE)
    images = od_images(jsonl, max_images, frames_only=tile is not None)
    run = run_split(model, processor, images, classes, batch_size, max_boxes, tile=tile)
    return split_metrics(run, classes).metrics


def placement_text(counts: dict[str, int]) -> str:
    """`matching.placement`'s counts in words, for the report and the console."""
    return (f"{counts['named']} found and named, {counts['renamed']} found under another name, {counts['near']} "
            f"with their edges off (IoU 0.3-0.5), {counts['centred']} with a box centred on them but overlapping less, "
            f"{counts['missed']} missed")


def _worst(run: EvalRun, threshold: float, count: int) -> list[int]:
    """Indices of the `count` images with the most missed + false boxes (errors only)."""
    errors = []
    for i, (e, pred) in enumerate(zip(run.images, run.predicted)):
        m = match_image(e.truth, above(pred, threshold))
        errors.append((len(m.missed) + len(m.false), i))
    return [i for n, i in sorted(errors, key=lambda t: (-t[0], t[1])) if n > 0][:count]


def _markdown(metrics: dict, plots: dict[str, str], title: str) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"# {title}", "",
        "| mAP50-95 | mAP50 | mAP75 | images | negatives | true boxes | predicted | on negatives |",
        "|---|---|---|---|---|---|---|---|",
        f"| {fmt(metrics['map50_95'])} | {fmt(metrics['map50'])} | {fmt(metrics['map75'])} | {metrics['images']} "
        f"| {metrics['negative_images']} | {metrics['gt_boxes']} | {metrics['predicted_boxes']} "
        f"| {metrics['predicted_on_negatives']} |", "",
        f"Defects found and placed, their names set aside: mAP50 {fmt(metrics['located']['map50'])}, mAP50-95 "
        f"{fmt(metrics['located']['map50_95'])} (a box under the wrong class counts here, a box in the wrong place "
        "does not).", "",
        *([f"Where the {metrics['gt_boxes']} true boxes land, each against the predicted boxes of its frame: "
           f"with every box the model gave, {placement_text(metrics['placement']['any_score'])}; at score >= "
           f"{threshold_text(metrics['best_threshold'])}, {placement_text(metrics['placement']['at_threshold'])}. "
           "On defects a few pixels wide a box on the spot can miss IoU 0.5 by a pixel of size: those are counted "
           "as centred, apart from the misses.", ""] if metrics["gt_boxes"] else []),
        "Scores: each box's label probability times the geometric mean of its four coordinates' "
        "probabilities, from the generation itself (not 1 for all)."
        + (f" Each frame (each tile) was also looked at through {len(metrics['views']) - 1} mirror(s) "
           f"({', '.join(v for v in metrics['views'] if v)}) and the boxes fused (`--tta`): scores are the fused ones "
           "(take thresholds from a report made with the same `--tta`), malformed parts are counted over all views."
           if len(metrics.get("views", [])) > 1 else ""), "",
        "| class | AP50 | AP75 | AP50-95 | true | predicted |", "|---|---|---|---|---|---|",
    ]
    for name, c in metrics["per_class"].items():
        lines.append(f"| {name} | {fmt(c['ap50'])} | {fmt(c['ap75'])} | {fmt(c['ap'])} | {c['gt']} | {c['predicted']} |")
    if metrics["unseen_classes"]:
        lines += ["", f"Classes in this split never seen in training: {', '.join(metrics['unseen_classes'])}."]
    lines += [
        "", f"Best F1 {metrics['best_f1']:.3f} at score >= {threshold_text(metrics['best_threshold'])}; "
        f"{metrics['dropped_parts']} malformed answer parts dropped; "
        f"{metrics['seconds_per_image']:.3f} s per image"
        + (f"; frames longer than {metrics['tile']} px detected in {metrics['tile']} px tiles, as "
           "`loomlens predict` does for this run." if metrics.get("tile") else "."), "",
        "## Inspection (OK/NG per frame)", "",
        "A frame is flagged when the model's probability that it holds a defect (1 - P(empty answer), "
        "the mean over its views, the highest over its tiles) is at least the threshold; recall is the share of "
        "frames holding a defect that are flagged when at most the given share of defect-free frames is.", "",
        f"All classes: {summary_line(metrics['image_level'])}.", "",
        "Per class, a frame is flagged by its best box of that class:", "",
    ]
    for name, m in metrics["image_level"]["per_class"].items():
        lines.append(f"- {name}: {summary_line(m)}")
    lines.append("")
    lines += [f"## {name}\n\n![{name}]({file})\n" for name, file in plots.items()]
    lines.append("[metrics.json](metrics.json)")
    return "\n".join(lines) + "\n"


def is_report_folder(folder: Path) -> bool:
    """Whether `folder` is an earlier evaluation's report: it holds a `metrics.json` as
    `write_report` writes it (its `map50` and `images`; another tool's file of that name does
    not count) and no folder but `unseen` ones, since eval writes none: a run trained into it
    since would go with the report it replaces."""
    folder = Path(folder)
    try:
        metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(metrics, dict) and {"map50", "images"} <= metrics.keys()
            and not any(entry.is_dir() and not unseen(entry) for entry in folder.iterdir()))


def check_report_folder(out: Path) -> None:
    """Raise FileExistsError naming `out` and the fix where a report cannot be written there
    (`run.check_output_folder`): a file, a folder below one, or a folder holding files that is
    no earlier report (`is_report_folder`), which the report would replace whole; nor may it
    be the working folder or hold it (replaced, it would leave the shell in a deleted folder).
    An earlier report a kill set aside while it was being replaced is first put back. Eval
    checks it before the model loads."""
    recover_folder(Path(out))
    if Path.cwd().is_relative_to(Path(out).resolve()):
        raise FileExistsError(f"the report folder {out} is the working folder or holds it, and eval replaces its "
                              f"report folder whole: give --out a folder of its own, e.g. {Path(out) / 'eval'}")
    check_output_folder(out, "the report folder", f"it is no earlier eval report (one holds the {METRICS} eval wrote, "
                        "and no folder), and eval replaces its report folder whole: give --out a new or empty folder, "
                        "or an earlier report's folder", ours=is_report_folder)


def write_report(
    model, processor, jsonl: Path, out: Path, *, classes: Sequence[str] = (), batch_size: int = INFER_BATCH_SIZE,
    max_boxes: int = 20, constrained: bool = False, max_images: int | None = None,
    gallery_size: int = 8, title: str = "loomlens evaluation", extra: dict | None = None, tile: int | None = None,
    views: Sequence[str] = ("",),
) -> dict:
    """Evaluate on a converted split and write the report folder `out` (`_write_files`):
    `metrics.json`, the plots and `report.md` linking them. `classes` default to the split's
    `classes.txt`; frames longer than `tile` are tiled at it when given (`run_split`), and the
    split's own tiles then left out (each defect counts once, in its frame, as the line sees
    it); `views`: the mirrors each picture is also looked at through (`infer/tta.py`); `extra`
    (model, checkpoint, ...) is stored in metrics.json as is. The report is written into a new
    folder that then replaces `out` whole (`data.atomic.write_folder`): an earlier report's
    files never outlive it, and one stopped or failed part-way leaves the earlier report as it
    was. Returns the metrics dict. Raises FileExistsError for an `out` that cannot take the
    report (`check_report_folder`) and ValueError (`SplitError` among them) for a split with a
    bad sample or none to evaluate, before anything is written, or for a folder it cannot write."""
    out = Path(out)
    check_report_folder(out)
    classes = list(classes) or read_class_names(Path(jsonl).parent / CLASSES_FILE)
    images = eval_images(jsonl, max_images, frames_only=tile is not None)
    run = run_split(model, processor, images, classes, batch_size, max_boxes, constrained, tile, views)
    coco = split_metrics(run, classes)
    metrics = {**coco.metrics, "constrained": constrained, "max_boxes": max_boxes, "tile": tile, "views": list(views),
               "data": str(jsonl),
               **(extra or {})}

    def fill(folder: Path) -> None:
        _write_files(folder, run, coco, metrics, title, gallery_size)
        if out.is_dir():
            keep_unseen(out, folder)  # what a file manager hides there (.git, .DS_Store) stays

    try:
        write_folder(out, fill)
    except OSError as err:  # no permission, a full disk
        raise ValueError(f"the report folder {out} cannot be written ({err.strerror or err}): give --out a folder "
                         "you can write to (an earlier report there is left as it was)") from None
    return metrics


def _write_files(folder: Path, run: EvalRun, coco: CocoEvaluation, metrics: dict, title: str,
                 gallery_size: int) -> None:
    """Write the report of `run` (its `split_metrics` `coco`, the `metrics` to keep) into the
    new `folder`: `metrics.json`, `pr_curves.png`, `confusion_matrix.png`, `reliability.png`,
    `worst_images.png` (the `gallery_size` frames with the most errors, when a frame has any)
    and `report.md` under `title`, linking the pictures written."""
    truth = [e.truth for e in run.images]
    threshold = metrics["best_threshold"]
    (folder / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    names = list(coco.metrics["per_class"])  # classes, then unseen/unknown labels
    plots = {
        "Precision-recall": plot_pr_curves(
            coco.pr_curves, {n: c["ap50"] for n, c in coco.metrics["per_class"].items()}, folder / "pr_curves.png"
        ),
        "Confusion matrix": plot_confusion(
            confusion_matrix(truth, run.predicted, names, threshold=threshold), names,
            folder / "confusion_matrix.png", threshold,
        ),
        "Score reliability": plot_reliability(truth, run.predicted, folder / "reliability.png"),
    }
    worst = _worst(run, threshold, gallery_size)
    if worst:
        items = [
            (run.images[i].path.name, read_rgb(run.images[i].path), run.images[i].truth, run.predicted[i])
            for i in worst
        ]
        plots["Worst images"] = plot_gallery(items, folder / "worst_images.png", threshold)
    (folder / "report.md").write_text(_markdown(metrics, {k: Path(v).name for k, v in plots.items()}, title),
                                      encoding="utf-8")
