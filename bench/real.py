"""Real fabric: the default recipe on AITEX, scored on whole test frames as the line sees them.

    python -m bench.real                         # 20 min of training on 2 cores (+ ~5 min around it)
    python -m bench.real --small                 # 5 min of training
    python -m bench.real --set lr=1e-3 --tag lr1e-3     # one point of a sweep, beside the default

What a new user would do, command for command: `loomlens convert AITEX D --flip` (one fixed
split by image, seed 0: 60 % train, 20 % val, 20 % test; `--tile auto`, the default, picks the
tile edge), then `loomlens train --data D --out R --time-budget S` with no other flag, then
`loomlens predict` on the whole test and val frames (4096x256 line-scan strips, tiled as
predict tiles them: at the tile edge the data was cut to). Reported for the `best` and the
`last` adapter: test mAP50, mAP50-95, AP50 per class, image-level defect recall at <= 1 % of
defect-free frames flagged, val mAP50 and AUROC scored the same way (so a gap between best and
last shows on two held-out splits, not one), the steps made and the best step, and where the
true test boxes land (`evaluate.matching.placement`: found under their own name, under another,
near, centred, missed). Beside them, in the same run: the untrained embedded model on the same frames, and YOLO11n from scratch
(ultralytics, `bench/yolo_baseline.py`) on the same samples for the same budget, predicted
tiled and merged as predict does: what a user would pick instead, offline. That row is
optional: it runs only where ultralytics imports (then the bench takes one budget longer); its
torchvision does not import beside this project's CPU torch, so here it is skipped, and says so.

The data lives in ../shared/data/aitex and is never copied into the repository: the converted
folder and the runs go to runs/bench/real/. Cite doi:10.2478/aut-2019-0035 with any figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import yolo_baseline
from bench.common import RESULTS, ROOT, Table, common_flags, fmt, publish
from loomlens.data.tiles import AUTO_TILE_INPUT

NAME = "real"
AITEX = ROOT.parent / "shared" / "data" / "aitex"
WORK = RESULTS / "real"
SPLIT = ["--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "0"]


def loomlens(*args: str) -> None:
    """Run a loomlens command as a user would; raise with its output when it fails."""
    done = subprocess.run([sys.executable, "-m", "loomlens.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loomlens {' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def convert(src: Path, data: Path) -> None:
    """AITEX -> Florence-2 JSONL with flipped copies and the tiles `--tile auto` picks, the fixed split."""
    shutil.rmtree(data, ignore_errors=True)
    loomlens("convert", str(src), str(data), "--flip", *SPLIT)


def data_tile(data: Path) -> int | None:
    """The tile edge the converted folder `data` was cut to (None: whole frames only)."""
    return json.loads((data / "summary.json").read_text()).get("tile")


def split_frames(data: Path, split: str = "test") -> tuple[list[Path], list[list], list[str]]:
    """The whole, unflipped frames of `split`: their paths, true boxes and the classes."""
    from loomlens.data.dataset import read_jsonl
    from loomlens.data.florence_text import parse_text

    paths, truth = [], []
    for s in read_jsonl(data / f"{split}.jsonl"):
        image = Path(s["image"])
        if "tiles" in image.parts or image.name.startswith("flipped_"):
            continue
        paths.append((data / image).resolve())
        truth.append(parse_text(s["suffix"], s["width"], s["height"])[0])
    classes = [c for c in (data / "classes.txt").read_text().splitlines() if c.strip()]
    return paths, truth, classes


def predicted_boxes(frames: list[Path], out: Path, *source: str,
                    tile: int | None) -> tuple[list[list], list[float | None]]:
    """`loomlens predict` on `frames` (tiled at `tile` px; None: as predict decides by
    default): the boxes of each frame and its answer probability, in `frames` order."""
    from loomlens.data.records import Box

    shutil.rmtree(out, ignore_errors=True)
    tiling = ["--tile", "on", "--tile-size", str(tile)] if tile else []
    loomlens("predict", *map(str, frames), "--out", str(out), "--no-draw", *tiling, *source)
    by_source = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_source[str(Path(r["source"]).resolve())] = (
            [Box(b["label"], *b["box"], score=b["score"]) for b in r["boxes"]], r.get("answer_probability"))
    return [by_source[str(f)][0] for f in frames], [by_source[str(f)][1] for f in frames]


#: The held-out splits a run is scored on: split -> (whole frames, their true boxes); "test"
#: fills the tables' main columns, "val" its own.
HeldOut = dict[str, tuple[list[Path], list[list]]]


def held_out(data: Path) -> tuple[HeldOut, list[str]]:
    """The test and val frames of the converted folder `data` (`split_frames`), and the classes."""
    test, val = split_frames(data, "test"), split_frames(data, "val")
    return {"test": test[:2], "val": val[:2]}, test[2]


def held_out_scores(held: HeldOut, classes: list[str], out: Path, *source: str, tile: int | None) -> dict[str, Any]:
    """`scores` of `loomlens predict` with `source` (written to `out`, and `out`-val) on the test
    frames, with the val frames' under "val"."""
    found = {}
    for split, (frames, truth) in held.items():
        where = out if split == "test" else out.parent / f"{out.name}-{split}"
        boxes, probabilities = predicted_boxes(frames, where, *source, tile=tile)
        found[split] = scores(truth, boxes, classes, probabilities)
    return {**found.pop("test"), **found}


def scores(truth: list[list], predicted: list[list], classes: list[str],
           probabilities: list[float | None] | None = None) -> dict[str, Any]:
    """mAP50, mAP50-95, AP50 per class and the image-level OK/NG figures of one split: frames scored
    as `evaluate` scores them (the answer probability where measured), and beside that by
    their best box alone (`_box`)."""
    from loomlens.evaluate.inspection import frame_score, image_level
    from loomlens.evaluate.matching import placement
    from loomlens.evaluate.metrics import coco_metrics

    coco = coco_metrics(truth, predicted, classes)
    defective = [bool(t) for t in truth]
    ok_ng = image_level(scores=[frame_score(p, q) for p, q in zip(predicted, probabilities or [None] * len(predicted))],
                        defective=defective)
    by_box = image_level(scores=[frame_score(p) for p in predicted], defective=defective)
    return {"map50": coco["map50"], "map50_95": coco["map50_95"],
            "ap50": {c: v["ap50"] for c, v in coco["per_class"].items() if v["gt"]},
            "auroc": ok_ng["auroc"], "recall_at_1pct": ok_ng["recall_at_fpr"]["0.01"],
            "auroc_box": by_box["auroc"], "recall_at_1pct_box": by_box["recall_at_fpr"]["0.01"],
            "boxes": sum(map(len, predicted)), "placed": placement(truth, predicted)}


def placement_table(result: dict[str, Any]) -> list[Table]:
    """The true test boxes of each run's adapters by `placement` band (none for results saved
    before it was counted; `-` under `centred` for those saved before it was a band)."""
    from loomlens.evaluate.matching import PLACEMENT_BANDS

    rows = [[f"{r['name']} ({checkpoint})", *(str(r[checkpoint]["placed"].get(band, "-")) for band in PLACEMENT_BANDS)]
            for r in result["runs"] for checkpoint in ("best", "last") if "placed" in r[checkpoint]]
    if not rows:
        return []
    return [Table("Where the true test boxes land", ["run", "IoU >= 0.5, its class", "IoU >= 0.5, another class",
                                                    "IoU 0.3-0.5", "under 0.3, a box centred on it", "missed"], rows,
                  ["each true box against the predicted boxes of its frame, any label or score: the one that overlaps "
                   "it most, else one whose centre lies on it (grown by 2 px); `-`: saved before that band, counted "
                   "as missed"])]


#: The columns `score_cells` fills, and what they mean.
SCORE_COLUMNS = ["mAP50", "mAP50-95", "val mAP50", "val AUROC", "AUROC", "recall @1% FA", "AUROC (box)",
                 "recall @1% FA (box)", "boxes"]
#: How `predicted_boxes` runs `loomlens predict`: with its defaults, as a user would.
TTA_NOTE = ("loomlens rows: `loomlens predict` with its defaults, so each frame (and tile) is also looked at "
            "through the mirrors its run was trained on and the boxes fused (`--tta auto`)")
SCORE_NOTE = ("AUROC and recall at 1 % of good frames flagged: frames ranked by the model's probability that its "
              "answer is not empty (what `loomlens eval` reports; YOLO, which has none, by its best box); (box): "
              "ranked by their best box's score instead")


def score_cells(s: dict[str, Any]) -> list[str]:
    """One `scores` result as table cells, in `SCORE_COLUMNS` order. A result saved before frames
    were ranked by the answer probability ranked them by box: its figures go to the box columns;
    one saved before val frames were scored has `-` for them."""
    if "auroc_box" not in s:
        s = {**s, "auroc": None, "recall_at_1pct": None, "auroc_box": s["auroc"], "recall_at_1pct_box": s["recall_at_1pct"]}
    val = s.get("val", {})
    return [fmt(s["map50"]), fmt(s["map50_95"]), fmt(val.get("map50")), fmt(val.get("auroc")), fmt(s["auroc"]),
            fmt(s["recall_at_1pct"]), fmt(s["auroc_box"]), fmt(s["recall_at_1pct_box"]), str(s["boxes"])]


def history(run: Path) -> dict[str, Any]:
    """Steps made, the evaluations' mAP50, and the best step as the run chose `best/` (the first
    evaluation with the highest selection `score`; mAP50 for a run logged without one), with
    its val mAP50, read from the run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scored = [r for r in rows if r.get("map50")]
    evals = [(int(r["step"]), float(r["map50"])) for r in scored]
    chosen = max(scored, key=lambda r: float(r.get("score") or r["map50"]), default=None)
    return {"steps": max((int(r["step"]) for r in rows), default=0), "evals": evals,
            "best_step": int(chosen["step"]) if chosen else None,
            "best_val_map50": float(chosen["map50"]) if chosen else None}


def train_and_score(data: Path, name: str, budget: float, overrides: list[str], held: HeldOut, classes: list[str],
                    work: Path, tile: int | None) -> dict:
    """One default-recipe run (plus `overrides`) in `work`, scored with its best and last
    adapters on the `held` frames (`predicted_boxes` with `tile`)."""
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    loomlens("train", "--data", str(data), "--out", str(run), "--time-budget", str(budget), *overrides)
    row: dict[str, Any] = {"name": name, "overrides": overrides, "budget_s": budget, **history(run)}
    return {**row, **score_adapters(name, held, classes, work, tile)}


def score_adapters(name: str, held: HeldOut, classes: list[str], work: Path,
                   tile: int | None) -> dict[str, dict[str, Any]]:
    """`held_out_scores` of the best and last adapters of the run `work/runs/name`."""
    return {checkpoint: held_out_scores(held, classes, work / "predict" / f"{name}-{checkpoint}", "--adapter",
                                        str(work / "runs" / name), "--checkpoint", checkpoint, tile=tile)
            for checkpoint in ("best", "last")}


def rescore(saved: dict[str, Any], held: HeldOut, classes: list[str], work: Path, tile: int | None) -> dict:
    """A saved result with the untrained model and every run's kept adapters predicted and scored
    again on the same held-out frames: the training as it was, the prediction and scoring of this
    code (to measure a change there without training again). `rescored_from` keeps the command
    and date of the run that trained them (also through a second re-scoring)."""
    untrained = held_out_scores(held, classes, work / "predict" / "untrained", "--model", "tiny", tile=tile)
    runs = [{**r, **score_adapters(r["name"], held, classes, work, tile)} for r in saved["runs"]]
    kept = {k: v for k, v in saved.items() if k not in ("bench", "command", "machine")}
    trained_by = saved.get("rescored_from") or {"command": saved["command"], "date": saved["machine"]["date"]}
    return {**kept, "val_frames": len(held["val"][0]), "untrained": untrained, "runs": runs,
            "rescored_from": trained_by, "tta": "auto"}


def run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `bench.real` and `bench.fabric` share: the training budget, a variant run
    beside the default, and `--rescore`."""
    parser.add_argument("--budget", type=float, default=1200, help="training seconds per run")
    parser.add_argument("--small", action="store_true", help="300 s of training instead of --budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a second run with these train overrides beside the default (repeatable)")
    parser.add_argument("--tag", default="variant", help="name of the --set run")
    parser.add_argument("--rescore", action="store_true",
                        help="predict and score the adapters of the saved result (--out) again; no training")


def rescored(name: str, args: argparse.Namespace, argv, tables, work: Path, tile: bool) -> int:
    """`--rescore`: the saved result at `args.out` re-scored (`rescore`) on the test and val
    frames in `work/data`, published in its place; tiled at the data's tile edge when `tile`."""
    held, classes = held_out(work / "data")
    result = rescore(json.loads(args.out.read_text()), held, classes, work=work,
                     tile=data_tile(work / "data") if tile else None)
    return publish(name, result, args.out, argv, tables)


def rescored_note(result: dict[str, Any]) -> list[str]:
    """The note a re-scored result's table carries: whose training it scores again."""
    saved = result.get("rescored_from")
    return [f"re-scored: the adapters trained by `{saved['command']}` ({saved['date']}), predicted and scored again "
            "by this code"] if saved else []


def yolo_row(data: Path, budget: float, frames: list[Path], truth: list[list], classes: list[str],
             tile: int | None) -> dict[str, Any]:
    """YOLO11n from scratch at the same budget on the same samples, scored on the same frames
    with its best and last weights, where ultralytics imports; otherwise why it was skipped."""
    try:
        import ultralytics  # noqa: F401
    except Exception as err:  # an ImportError, or torchvision's operator error beside CPU torch
        return {"name": "yolo11n", "skipped": f"ultralytics does not import here ({type(err).__name__})"}
    # Untiled data: YOLO still trains and predicts at the embedded model's input edge.
    found = yolo_baseline.run(data, WORK / "yolo", budget, frames, classes, tile or AUTO_TILE_INPUT)
    return {"name": "yolo11n", "budget_s": budget, "best_step": None,
            **{k: found[k] for k in ("device", "batch", "steps")},
            **{c: scores(truth, found[c], classes) for c in ("best", "last")}}


def yolo_note(yolo: dict[str, Any]) -> str:
    """The main table's note on the YOLO11n row: how it ran, or why it did not."""
    if "skipped" in yolo:
        return f"yolo11n: skipped, {yolo['skipped']}"
    return (f"yolo11n: from scratch, ultralytics' defaults, the same samples, budget and tiles, on {yolo['device']}; "
            f"its steps are batches of {yolo['batch']}, its best is ultralytics' best.pt")


def val_frames(result: dict[str, Any]) -> str:
    """The tables' words on the val frames scored beside the test frames (none in older results)."""
    return f" and {result['val_frames']} whole val frames" if result.get("val_frames") else ""


def tables(result: dict[str, Any]) -> list[Table]:
    """Test-split figures per run (best and last adapter) and the per-class AP50 of the default."""
    yolo = result["yolo"]
    rows = []
    for r in [*result["runs"], *([] if "skipped" in yolo else [yolo])]:
        for checkpoint in ("best", "last"):
            s = r[checkpoint]
            rows.append([f"{r['name']} ({checkpoint})", *score_cells(s), str(r["steps"]),
                         "-" if r["best_step"] is None else str(r["best_step"])])
    rows.append(["untrained tiny", *score_cells(result["untrained"]), "0", "-"])
    notes = [f"AITEX, {result['frames']} whole test frames ({result['defective']} with defects){val_frames(result)}, "
             f"{(str(result.get('tile', 256)) + ' px tiles') if result.get('tile', 256) else 'whole frames'}; "
             f"{result['budget_s']:.0f} s of training on this machine; doi:10.2478/aut-2019-0035",
             yolo_note(yolo)]
    main = Table("Real fabric (AITEX test split)", ["run", *SCORE_COLUMNS, "steps", "best step"], rows,
                 [*notes, SCORE_NOTE, *([TTA_NOTE] if result.get("tta") else []), *rescored_note(result)])
    default = result["runs"][0]["best"]["ap50"]
    per_class = Table("AP50 per class, default recipe (best adapter)", ["class", "AP50"],
                      [[c, fmt(v)] for c, v in sorted(default.items())])
    return [main, per_class, *placement_table(result)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__.split("\n\n")[0])
    run_flags(parser)
    parser.add_argument("--data", type=Path, default=AITEX, help="a LabelImg folder of real fabric")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    if args.rescore:
        return rescored(NAME, args, argv, tables, WORK, tile=True)
    if not (args.data / "annotations").exists() and not any(args.data.glob("*.xml")):
        parser.error(f"no LabelImg folder at {args.data}: expected ../shared/data/aitex beside the checkout")
    budget = 300.0 if args.small else args.budget
    data = WORK / "data"
    convert(args.data, data)
    tile = data_tile(data)
    held, classes = held_out(data)
    frames, truth = held["test"]
    untrained = held_out_scores(held, classes, WORK / "predict" / "untrained", "--model", "tiny", tile=tile)
    runs = [train_and_score(data, "default", budget, [], held, classes, WORK, tile)]
    if args.set:
        runs.append(train_and_score(data, args.tag, budget, args.set, held, classes, WORK, tile))
    result = {"budget_s": budget, "frames": len(frames), "defective": sum(map(bool, truth)), "classes": classes,
              "val_frames": len(held["val"][0]),
              "tile": tile, "untrained": untrained, "runs": runs, "tta": "auto",
              "yolo": yolo_row(data, budget, frames, truth, classes, tile)}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    sys.exit(main())
