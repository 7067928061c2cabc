"""YOLO11n from scratch (ultralytics): what a user would pick instead of loomlens, offline.

In: a folder `loomlens convert` wrote, a time budget, the whole test frames. Out: the boxes
YOLO11n finds in each frame with its best and its last weights, and the batches it trained.
`bench/real.py` scores them beside the default recipe (issue #15): the same train and val
samples, the same seconds of training on the same device (`resolve_device("auto")`, the rule
`loomlens train` follows), the same 256 px tiles and merging at prediction (`tiled_detect`,
as `loomlens predict --tile on` does), at most as many boxes per model input as `loomlens
predict` reads. Everything else is ultralytics' default, as a user would leave it.

ultralytics is imported only inside `train` and `run`: the dataset writer and the tiled
prediction need none of it (and are tested without it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from loomlens.data.dataset import read_jsonl
from loomlens.data.florence_text import parse_text
from loomlens.data.records import Box, ImageRecord
from loomlens.data.ultralytics import label_path
from loomlens.data.yolo import read_class_names, write_yolo
from loomlens.infer.tiling import tiled_detect

MODEL = "yolo11n.yaml"  # the architecture only: built from scratch, nothing downloaded
BATCH = 16  # ultralytics' default batch
CONF = 0.001  # ultralytics' own threshold for scoring mAP: the curve needs the low-scoring boxes
MAX_DET = 20  # `loomlens predict`'s --max-boxes: the most boxes one model input gives
SPLITS = ("train", "val")


def write_dataset(data: Path, out: Path) -> Path:
    """The od samples of `data`'s train.jsonl and val.jsonl -> an ultralytics dataset at `out`
    (images linked, `labels/` in normalised xywh with classes.txt's ids) and its data.yaml.

    The very samples loomlens trains and validates on (flipped copies and tiles included),
    so the two rows differ in the model and its recipe only. `out` is rewritten."""
    classes = read_class_names(data / "classes.txt")
    shutil.rmtree(out, ignore_errors=True)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for i, sample in enumerate(read_jsonl(data / f"{split}.jsonl")):
            if sample.get("task") != "od":
                continue  # other tasks' samples carry no boxes to learn from
            source = (data / sample["image"]).resolve()
            image = out / "images" / split / f"{i:05d}_{source.name}"  # the index keeps names unique
            image.symlink_to(source)
            boxes = parse_text(sample["suffix"], sample["width"], sample["height"])[0]
            record = ImageRecord(sample["image"], sample["width"], sample["height"], boxes)
            write_yolo(record, label_path(image), classes)
    described = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": classes}
    (out / "data.yaml").write_text(yaml.safe_dump(described, sort_keys=False))
    return out / "data.yaml"


def train(data_yaml: Path, out: Path, budget: float, tile: int, device: str) -> tuple[Path, Path, int]:
    """YOLO11n from scratch on `data_yaml` for `budget` seconds at `tile` px, its run in `out`
    -> (best weights, last weights, training batches made)."""
    from ultralytics import YOLO

    model = YOLO(MODEL)
    batches = [0]

    def count(trainer: Any) -> None:
        batches[0] += 1

    # Counted as a batch starts: a timed stop breaks out after its last batch, before on_train_batch_end.
    model.add_callback("on_train_batch_start", count)
    # amp=False: on a GPU the AMP check would download yolo11n.pt; plots=False: no font download.
    model.train(data=str(data_yaml), time=budget / 3600, imgsz=tile, batch=BATCH, device=device, workers=0,
                pretrained=False, project=str(out), name="train", exist_ok=True, plots=False, amp=False,
                val=True, seed=0)
    best, last = Path(model.trainer.best), Path(model.trainer.last)
    return (best if best.exists() else last), last, batches[0]


def result_boxes(result: Any, classes: Sequence[str]) -> list[Box]:
    """One ultralytics result (`.boxes.xyxy`, `.conf`, `.cls`) -> scored Boxes named by
    `classes`; a box of no area (clipped to an image edge) is dropped, as Box refuses it."""
    b = result.boxes
    found = zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist())
    return [Box(classes[int(c)], x1, y1, x2, y2, score=float(s)) for (x1, y1, x2, y2), s, c in found
            if x1 < x2 and y1 < y2]


def detector(model: Any, classes: Sequence[str], tile: int, device: str
             ) -> Callable[[list[Image.Image]], list[list[Box]]]:
    """A YOLO model (anything with ultralytics' `predict`) as the detect function
    `tiled_detect` calls: images -> boxes in each image's own pixels."""
    def detect(images: list[Image.Image]) -> list[list[Box]]:
        results = model.predict(source=images, imgsz=tile, conf=CONF, max_det=MAX_DET, device=device, verbose=False)
        return [result_boxes(r, classes) for r in results]

    return detect


def predict_frames(model: Any, frames: Sequence[Path], classes: Sequence[str], tile: int, device: str
                   ) -> list[list[Box]]:
    """Boxes per frame (in `frames` order, frame pixels): every `tile` px tile and the whole
    frame through `model`, merged by `tiled_detect`, as `loomlens predict --tile on` does."""
    detect = detector(model, classes, tile, device)
    found = []
    for path in frames:
        with Image.open(path) as im:
            found.append(tiled_detect(detect, im.convert("RGB"), tile, tile))  # YOLO sees the whole frame at imgsz=tile
    return found


def run(data: Path, work: Path, budget: float, frames: Sequence[Path], classes: Sequence[str], tile: int
        ) -> dict[str, Any]:
    """Dataset, training and prediction under `work` -> {"steps": training batches, "batch",
    "device" (cpu | cuda), "best" and "last": boxes per frame with those weights}."""
    from ultralytics import YOLO

    from loomlens.model.runtime import resolve_device

    kind = resolve_device("auto").type
    device = "0" if kind == "cuda" else "cpu"  # ultralytics' spelling of the first GPU
    best, last, steps = train(write_dataset(data, work / "dataset"), work / "runs", budget, tile, device)
    found = {name: predict_frames(YOLO(str(weights)), frames, classes, tile, device)
             for name, weights in (("best", best), ("last", last))}
    return {"steps": steps, "batch": BATCH, "device": kind, **found}
