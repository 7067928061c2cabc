"""The YOLO11n row of bench/real.py: our plumbing around ultralytics, not ultralytics itself
(it does not import beside this project's CPU torch). A plain class answering `predict` as
ultralytics' results do stands in for the model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml
from PIL import Image

from bench import real, yolo_baseline
from loomlens.data.florence_text import boxes_to_text
from loomlens.data.records import Box

CLASSES = ["hole", "stain"]


def _sample(image: str, width: int, height: int, boxes: list[Box], task: str = "od") -> dict:
    prefix = {"od": "<OD>", "caption": "<CAPTION>"}[task]
    suffix = boxes_to_text(boxes, width, height) if task == "od" else "a plain weave"
    return {"prefix": prefix, "suffix": suffix, "image": image, "width": width, "height": height, "task": task}


def _converted(root: Path) -> Path:
    """A tiny folder as `loomlens convert --tile` writes it: a tile with boxes, a defect-free
    whole frame, a caption sample (not od) and one val tile."""
    data = root / "data"
    (data / "images" / "tiles").mkdir(parents=True)
    for name, size in [("tiles/f_x0_y0.png", (256, 256)), ("f.png", (1024, 256)), ("tiles/g_x0_y0.png", (256, 256))]:
        Image.new("RGB", size).save(data / "images" / name)
    (data / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    train = [_sample("images/tiles/f_x0_y0.png", 256, 256, [Box("stain", 64, 32, 128, 96), Box("hole", 0, 0, 16, 16)]),
             _sample("images/f.png", 1024, 256, []),
             _sample("images/f.png", 1024, 256, [], task="caption")]
    val = [_sample("images/tiles/g_x0_y0.png", 256, 256, [Box("hole", 128, 128, 256, 256)])]
    for split, samples in (("train", train), ("val", val)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return data


def _rows(txt: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in txt.read_text().splitlines()]


def test_dataset_holds_the_od_samples_with_normalised_labels_and_a_data_yaml(tmp_path):
    data = _converted(tmp_path)
    described = yolo_baseline.write_dataset(data, tmp_path / "yolo")
    spec = yaml.safe_load(described.read_text())
    assert spec == {"path": str((tmp_path / "yolo").resolve()), "train": "images/train", "val": "images/val",
                    "names": CLASSES}
    train = sorted((tmp_path / "yolo" / "images" / "train").iterdir())
    assert [p.name for p in train] == ["00000_f_x0_y0.png", "00001_f.png"]  # the caption sample is left out
    assert train[0].resolve() == (data / "images" / "tiles" / "f_x0_y0.png").resolve()
    labels = tmp_path / "yolo" / "labels" / "train"
    hole, stain = sorted(_rows(labels / "00000_f_x0_y0.txt"))  # ids from classes.txt; cx cy w h over the size
    # <loc_N> bins are 1/1000 of the image: the boxes come back within a bin of where they were.
    assert stain == pytest.approx([1, 96 / 256, 64 / 256, 64 / 256, 64 / 256], abs=2e-3)
    assert hole == pytest.approx([0, 8 / 256, 8 / 256, 16 / 256, 16 / 256], abs=2e-3)
    assert (labels / "00001_f.txt").read_text() == ""  # a defect-free frame: background
    (val,) = _rows(tmp_path / "yolo" / "labels" / "val" / "00000_g_x0_y0.txt")
    assert val == pytest.approx([0, 0.75, 0.75, 0.5, 0.5], abs=2e-3)


class _Boxes:
    def __init__(self, rows: list[tuple[float, float, float, float, float, int]]):
        array = np.array(rows, dtype=float).reshape(-1, 6)
        self.xyxy, self.conf, self.cls = array[:, :4], array[:, 4], array[:, 5]


class BrightSpotModel:
    """Stands in for a YOLO model: in each image, one box of class 1 around the bright pixels
    (scored by how many there are), and a zero-width box at the left edge that must be dropped."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def predict(self, source: list[Image.Image], **options) -> list[types.SimpleNamespace]:
        self.calls.append({"sizes": [im.size for im in source], **options})
        results = []
        for im in source:
            ys, xs = np.nonzero(np.asarray(im.convert("L")) > 128)
            rows = [(0, 0, 0, 5, 0.5, 0)]
            if xs.size:
                rows.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, xs.size / 1000, 1))
            results.append(types.SimpleNamespace(boxes=_Boxes(rows)))
        return results


def _frame(path: Path, spot: tuple[int, int, int, int] | None) -> Path:
    """A dark 1024x256 frame, white inside `spot` (x1, y1, x2, y2) when there is one."""
    image = Image.new("RGB", (1024, 256))
    if spot is not None:
        image.paste((255, 255, 255), spot)
    image.save(path)
    return path


def test_frames_are_predicted_tile_by_tile_and_merged_in_frame_pixels(tmp_path):
    frames = [_frame(tmp_path / "a.png", (500, 100, 520, 120)), _frame(tmp_path / "b.png", (0, 0, 1, 1))]
    model = BrightSpotModel()
    found = yolo_baseline.predict_frames(model, frames, CLASSES, 256, "cpu")
    # The spot lies whole in one tile and in the whole frame: two finds merged into one box.
    assert found[0] == [Box("stain", 500, 100, 520, 120, score=0.4)]
    assert found[1] == [Box("stain", 0, 0, 1, 1, score=0.001)]
    first = model.calls[0]
    assert first["sizes"] == [(256, 256)] * 5 + [(1024, 256)]  # 256 px tiles, a quarter shared, + the frame
    assert {k: first[k] for k in ("imgsz", "conf", "max_det", "device", "verbose")} == {
        "imgsz": 256, "conf": yolo_baseline.CONF, "max_det": yolo_baseline.MAX_DET, "device": "cpu", "verbose": False}


def test_the_row_is_skipped_and_says_why_when_ultralytics_does_not_import(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` now raises
    monkeypatch.setattr(yolo_baseline, "run", lambda *a, **k: pytest.fail("no run without ultralytics"))
    row = real.yolo_row(tmp_path, 60.0, [], [], CLASSES, 256)
    assert row == {"name": "yolo11n", "skipped": "ultralytics does not import here (ModuleNotFoundError)"}
    assert real.yolo_note(row) == "yolo11n: skipped, ultralytics does not import here (ModuleNotFoundError)"


def test_an_import_that_fails_otherwise_is_skipped_too(monkeypatch, tmp_path):
    """torchvision beside CPU torch fails with a RuntimeError while ultralytics imports."""
    (tmp_path / "ultralytics").mkdir()
    (tmp_path / "ultralytics" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ultralytics", raising=False)
    row = real.yolo_row(tmp_path, 60.0, [], [], CLASSES, None)
    assert row["skipped"] == "ultralytics does not import here (RuntimeError)"


class FakeYOLO(BrightSpotModel):
    """ultralytics' `YOLO` as `train` and `run` use it: built from a name, callbacks, a train
    that makes three batches and writes the two weights, and `predict`."""

    trained: ClassVar[dict] = {}  # the last train call's arguments

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model, self.callbacks = model, []

    def add_callback(self, event: str, callback) -> None:
        assert event == "on_train_batch_start"
        self.callbacks.append(callback)

    def train(self, **args) -> None:
        FakeYOLO.trained = {"model": self.model, **args}
        weights = Path(args["project"]) / args["name"] / "weights"
        weights.mkdir(parents=True)
        self.trainer = types.SimpleNamespace(best=weights / "best.pt", last=weights / "last.pt")
        for path in (self.trainer.best, self.trainer.last):
            path.write_bytes(b"")
        for _ in range(3):
            for callback in self.callbacks:
                callback(self.trainer)


def test_where_ultralytics_imports_the_row_trains_predicts_and_is_scored(monkeypatch, tmp_path):
    fake = types.ModuleType("ultralytics")
    fake.YOLO = FakeYOLO
    monkeypatch.setitem(sys.modules, "ultralytics", fake)
    monkeypatch.setattr(real, "WORK", tmp_path / "work")
    data = _converted(tmp_path)
    frames = [_frame(tmp_path / "a.png", (500, 100, 520, 120)), _frame(tmp_path / "b.png", None)]
    truth = [[Box("stain", 500, 100, 520, 120)], []]
    row = real.yolo_row(data, 720.0, frames, truth, CLASSES, None)  # untiled: the input's edge
    args = FakeYOLO.trained
    assert args["model"] == "yolo11n.yaml" and args["time"] == 0.2 and args["imgsz"] == 256
    assert args["data"] == str(tmp_path / "work" / "yolo" / "dataset" / "data.yaml") and args["pretrained"] is False
    assert row["steps"] == 3 and row["batch"] == yolo_baseline.BATCH and row["device"] in ("cpu", "cuda")
    assert row["best"]["map50"] == pytest.approx(1.0) and row["best"]["boxes"] == 1 and row["last"]["auroc"] == 1.0
    main = real.tables({"frames": 2, "defective": 1, "budget_s": 720.0, "classes": CLASSES, "yolo": row,
                        "untrained": row["best"], "runs": [{"name": "default", "steps": 5, "best_step": 4,
                                                            "best": row["best"], "last": row["last"]}]})[0]
    assert [r[0] for r in main.rows] == ["default (best)", "default (last)", "yolo11n (best)", "yolo11n (last)",
                                         "untrained tiny"]
    # YOLO has no answer probability: its frames rank by their best box both ways; it is scored
    # on the test frames only.
    assert main.rows[2][1:] == ["1.000", "1.000", "-", "-", "1.000", "1.000", "1.000", "1.000", "1", "3", "-"]
    assert main.notes[1].startswith("yolo11n: from scratch")
