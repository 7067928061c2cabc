"""Pre-annotations out: what each labelling tool opens, and `convert` reads back the same
boxes (within a pixel) and classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.data.convert import READERS
from loomlens.data.records import Box
from loomlens.predict.labels import LabelsOut
from loomlens.predict.predictor import Prediction
from loomlens.predict.sources import Item

BOXES = {"a": [Box("drop", 10.4, 5.2, 30.9, 20.1, 0.91), Box("broken-weft", 0.0, 40.5, 120.0, 47.0, 0.42)],
         "b": []}


def _write(tmp_path: Path, fmt: str, out: Path) -> LabelsOut:
    labels = LabelsOut(out, fmt, ["drop"], "run/x")
    for stem, boxes in BOXES.items():
        (tmp_path / "frames").mkdir(exist_ok=True)
        Image.new("RGB", (120, 48)).save(tmp_path / "frames" / f"{stem}.png")
        item = Item(tmp_path / "frames" / f"{stem}.png", Image.new("RGB", (120, 48)))
        labels.add(item, Prediction("od", 120, 48, boxes), stem)
    labels.finish()
    return labels


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_pre_annotations_read_back_as_the_same_boxes_and_classes(tmp_path, fmt):
    out = tmp_path / "labels"
    _write(tmp_path, fmt, out)
    read = READERS[fmt](out, ())
    assert read.problems == []
    by_image = {Path(r.image).stem: r.boxes for r in read.records}
    assert set(by_image) == set(BOXES)
    for stem, boxes in BOXES.items():
        assert [b.label for b in by_image[stem]] == [b.label for b in boxes]
        for got, want in zip(by_image[stem], boxes):
            assert max(abs(getattr(got, k) - getattr(want, k)) for k in ("x1", "y1", "x2", "y2")) <= 1
    assert set(read.classes) >= {"drop", "broken-weft"}


def test_voc_is_labelimgs_layout_and_yolo_keeps_ids_of_an_existing_classes_txt(tmp_path):
    _write(tmp_path, "voc", tmp_path / "voc")
    xml = (tmp_path / "voc" / "annotations" / "a.xml").read_text()
    assert "<filename>a.png</filename>" in xml and "<folder>images</folder>" in xml and "<difficult>0" in xml
    assert (tmp_path / "voc" / "images" / "a.png").is_file()

    (tmp_path / "yolo" / "labels").mkdir(parents=True)
    (tmp_path / "yolo" / "labels" / "classes.txt").write_text("stain\nbroken-weft\n")
    _write(tmp_path, "yolo", tmp_path / "yolo")
    assert (tmp_path / "yolo" / "labels" / "classes.txt").read_text() == "stain\nbroken-weft\ndrop\n"
    assert [line.split()[0] for line in (tmp_path / "yolo" / "labels" / "a.txt").read_text().splitlines()] == ["2", "1"]


def test_an_annotation_a_person_corrected_is_never_overwritten(tmp_path):
    _write(tmp_path, "voc", tmp_path / "voc")
    corrected = tmp_path / "voc" / "annotations" / "a.xml"
    corrected.write_text(corrected.read_text().replace("broken-weft", "stain"))
    again = _write(tmp_path, "voc", tmp_path / "voc")
    assert "stain" in corrected.read_text() and again.kept == 2 and again.written == 0


def test_label_studio_tasks_hold_percent_boxes_with_a_score_each(tmp_path):
    _write(tmp_path, "labelstudio", tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=images/a.png",
                                                   "/data/local-files/?d=images/b.png"]
    (prediction,) = tasks[0]["predictions"]
    first = prediction["result"][0]
    assert first["type"] == "rectanglelabels" and first["score"] == 0.91 and prediction["score"] == 0.42
    assert first["value"]["rectanglelabels"] == ["drop"]
    assert first["value"]["x"] == pytest.approx(10.4 / 120 * 100) and first["value"]["height"] == pytest.approx(
        (20.1 - 5.2) / 48 * 100)
    assert tasks[1]["predictions"][0]["result"] == [] and tasks[1]["predictions"][0]["score"] == 1.0


def test_an_empty_frame_the_model_thought_defective_comes_up_early_in_label_studio(tmp_path):
    labels = LabelsOut(tmp_path / "ls", "labelstudio", ["drop"], "run/x")
    for stem, p in (("likely_missed", 0.8), ("clean", 0.05)):
        Image.new("RGB", (64, 48)).save(tmp_path / f"{stem}.png")
        item = Item(tmp_path / f"{stem}.png", Image.new("RGB", (64, 48)))
        labels.add(item, Prediction("od", 64, 48, [], answer_probability=p), stem)
    labels.finish()
    scores = [t["predictions"][0]["score"] for t in json.loads((tmp_path / "ls" / "tasks.json").read_text())]
    assert scores == [pytest.approx(0.2), pytest.approx(0.95)]  # how sure the model is that each is clean


def test_a_video_frame_is_saved_under_the_name_convert_groups_by_video(tmp_path):
    labels = LabelsOut(tmp_path / "voc", "voc", [], "tiny")
    item = Item(tmp_path / "line3.mp4", Image.new("RGB", (64, 48)), frame=25, timestamp=1.0)
    labels.add(item, Prediction("od", 64, 48, [Box("drop", 1, 1, 9, 9, 0.5)]), "line3_f000025")
    assert (tmp_path / "voc" / "images" / "line3_f000025.jpg").is_file()
    assert (tmp_path / "voc" / "annotations" / "line3_f000025.xml").is_file()


def test_predict_save_labels_voc_then_convert_gives_back_the_predicted_boxes(tmp_path):
    for i in range(2):
        Image.new("RGB", (96, 64), (i * 100, 50, 50)).save(tmp_path / f"im{i}.png")
    out, labels = tmp_path / "out", tmp_path / "labels"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "*.png"), "--out", str(out), "--model", "tiny",
                                      "--max-boxes", "2", "--save-labels", "voc", "--labels-out", str(labels)])
    assert result.exit_code == 0, result.output
    predicted = {Path(x["source"]).stem: x["boxes"] for x in map(json.loads, (out / "predictions.jsonl").open())}
    read = READERS["voc"](labels, ())
    assert read.problems == [] and {Path(r.image).stem for r in read.records} == {"im0", "im1"}
    for record in read.records:
        want = predicted[Path(record.image).stem]
        assert [b.label for b in record.boxes] == [b["label"] for b in want]
        for got, box in zip(record.boxes, want):
            assert max(abs(a - b) for a, b in zip((got.x1, got.y1, got.x2, got.y2), box["box"])) <= 1
    result = CliRunner().invoke(app, ["convert", str(labels), str(tmp_path / "data"), "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["images"] == 2
    assert CliRunner().invoke(app, ["predict", str(tmp_path / "im0.png"), "--out", str(out),
                                    "--save-labels", "pascal"]).exit_code == 1


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_a_later_run_with_another_picture_of_the_same_name_never_takes_the_earlier_ones_place(tmp_path, fmt):
    # Day 1 and day 2 both hold frame_0001 (day 2 as a .bmp); each picture keeps its own boxes.
    out = tmp_path / "to-label"
    days = {"day1": ("red", ".png", Box("drop", 1, 1, 10, 10, 0.9)),
            "day2": ("blue", ".bmp", Box("broken-weft", 50, 20, 90, 40, 0.8))}
    for day, (colour, suffix, box) in [*days.items(), ("day1", days["day1"])]:  # day 1 again: a re-run
        (tmp_path / day).mkdir(exist_ok=True)
        source = tmp_path / day / f"frame_0001{suffix}"
        Image.new("RGB", (120, 48), colour).save(source)
        labels = LabelsOut(out, fmt, ["drop", "broken-weft"], "run/x")
        labels.add(Item(source, Image.open(source).convert("RGB")), Prediction("od", 120, 48, [box]), "frame_0001")
        labels.finish()
    read = READERS[fmt](out, ())
    assert read.problems == [] and len(read.records) == 2
    for record in read.records:
        colour = Image.open(out / record.image).convert("RGB").getpixel((0, 0))
        (box,) = record.boxes
        assert box.label == ("drop" if colour == (255, 0, 0) else "broken-weft")
    assert labels.kept == 1 and labels.written == 0  # the re-run found day 1's picture under its old name


def _predict_into(out: Path, fmt: str, pictures: dict[Path, Box], classes: tuple[str, ...] = ("drop",)) -> LabelsOut:
    """One run of `pictures` (each predicted with its box) into `out`, finished."""
    labels = LabelsOut(out, fmt, list(classes), "run/x")
    for source, box in pictures.items():
        labels.add(Item(source, Image.open(source).convert("RGB")), Prediction("od", 120, 48, [box]), source.stem)
    labels.finish()
    return labels


def _picture(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 48), colour).save(path)
    return path


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_pictures_of_one_name_inside_the_labels_folder_each_get_their_own_annotation(tmp_path, fmt):
    # In place: `predict to-label/ --labels-out to-label/`, every day's a.png, and one from outside.
    out = tmp_path / "to-label"
    pictures = {_picture(out / "day1" / "a.png", "red"): Box("drop", 1, 1, 10, 10, 0.9),
                _picture(out / "day2" / "a.png", "blue"): Box("drop", 50, 20, 90, 40, 0.8),
                _picture(tmp_path / "outside" / "a.png", "lime"): Box("drop", 30, 5, 60, 15, 0.7)}
    labels = _predict_into(out, fmt, pictures)
    assert (labels.written, labels.kept) == (3, 0)
    read = READERS[fmt](out, ())
    assert read.problems == [] and len(read.records) == 3
    want = {Image.open(source).getpixel((0, 0)): box for source, box in pictures.items()}
    for record in read.records:  # each picture, known by its colour, has its own box
        (got,) = record.boxes
        box = want[Image.open(out / record.image).getpixel((0, 0))]
        assert max(abs(getattr(got, k) - getattr(box, k)) for k in ("x1", "y1", "x2", "y2")) <= 1
    again = _predict_into(out, fmt, pictures)  # a re-run keeps every annotation, overwrites none
    assert (again.written, again.kept) == (0, 3)


def test_two_pictures_of_one_name_in_one_folder_are_named_not_silently_lost(tmp_path):
    out = tmp_path / "to-label"
    pictures = {_picture(out / "a.png", "red"): Box("drop", 1, 1, 10, 10, 0.9),
                _picture(out / "a.jpg", "blue"): Box("drop", 50, 20, 90, 40, 0.8)}
    labels = LabelsOut(out, "voc", ["drop"], "run/x")
    for source, box in pictures.items():
        labels.add(Item(source, Image.open(source).convert("RGB")), Prediction("od", 120, 48, [box]), source.stem)
    (summary,) = [line for line in labels.finish() if line.startswith("beside pictures")]  # no annotations/ made
    assert "(1 new, 0 kept; 1 not annotated" in summary and summary.endswith(": a.jpg)")
    assert labels.clashed == ["a.jpg"]


def test_yolo_keeps_the_ids_of_a_classes_txt_with_a_blank_line(tmp_path):
    # A person's dataset: id 1 retired (a blank line), id 2 = stain.
    out = tmp_path / "yolo"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "classes.txt").write_text("hole\n\nstain\n")
    _picture(out / "images" / "old.png", "red")
    (out / "labels" / "old.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    new = _picture(tmp_path / "new.png", "blue")
    _predict_into(out, "yolo", {new: Box("stain", 12, 4.8, 36, 14.4, 0.9)}, classes=("hole", "stain", "drop"))
    assert (out / "labels" / "classes.txt").read_text() == "hole\n\nstain\ndrop\n"
    assert (out / "labels" / "new.txt").read_text().split()[0] == "2"
    boxes = {r.image: [b.label for b in r.boxes] for r in READERS["yolo"](out, ()).records}
    assert boxes == {"images/old.png": ["stain"], "images/new.png": ["stain"]}


def test_a_later_coco_run_adds_a_picture_whose_name_a_picture_in_another_folder_has(tmp_path):
    out = tmp_path / "coco"
    day1 = _picture(out / "day1" / "a.png", "red")
    _predict_into(out, "coco", {day1: Box("drop", 1, 1, 10, 10, 0.9)})
    labels = _predict_into(out, "coco", {_picture(out / "day2" / "a.png", "blue"): Box("drop", 50, 20, 90, 40, 0.8)})
    assert labels.kept == 0
    read = READERS["coco"](out, ())
    assert read.problems == [] and [r.image for r in read.records] == ["day1/a.png", "day2/a.png"]
    # A tool's export that names images without their folder still holds them: kept, not added twice.
    document = out / "annotations.json"
    data = json.loads(document.read_text())
    data["images"] = [{**image, "file_name": "b.png"} if image["file_name"] == "day1/a.png" else image
                      for image in data["images"]]
    document.write_text(json.dumps(data))
    b = _picture(out / "images" / "b.png", "red")
    assert _predict_into(out, "coco", {b: Box("drop", 1, 1, 10, 10, 0.9)}).kept == 1


def test_a_later_label_studio_run_adds_its_tasks_and_keeps_the_earlier_ones(tmp_path):
    out = tmp_path / "ls"
    first = _picture(tmp_path / "frames" / "p.png", "red")
    _predict_into(out, "labelstudio", {first: Box("drop", 1, 1, 10, 10, 0.9)})
    tasks = json.loads((out / "tasks.json").read_text())
    tasks[0]["predictions"][0]["result"][0]["value"]["rectanglelabels"] = ["stain"]  # edited by hand
    (out / "tasks.json").write_text(json.dumps(tasks))
    second = _picture(tmp_path / "frames" / "q.png", "blue")
    labels = LabelsOut(out, "labelstudio", ["drop"], "run/x")
    for source in (first, second):  # p again (kept as edited), q new
        labels.add(Item(source, Image.open(source).convert("RGB")),
                   Prediction("od", 120, 48, [Box("drop", 2, 2, 20, 20, 0.5)]), source.stem)
    assert "tasks.json (1 new, 1 kept)" in labels.finish()
    merged = json.loads((out / "tasks.json").read_text())
    assert merged[0] == tasks[0] and [t["data"]["image"] for t in merged] == [
        "/data/local-files/?d=images/p.png", "/data/local-files/?d=images/q.png"]
    (out / "tasks.json").write_text("{not json")
    with pytest.raises(ValueError, match="tasks.json is there but cannot be added to"):
        labels.finish()


def test_label_studio_finds_a_picture_whose_name_holds_url_characters(tmp_path):
    # '#' would end the URL, '+' read as a space, '&' start another query field.
    source = tmp_path / "roll#3 a+b&c 100%.png"
    Image.new("RGB", (120, 48)).save(source)
    labels = LabelsOut(tmp_path / "ls", "labelstudio", ["drop"], "run/x")
    labels.add(Item(source, Image.new("RGB", (120, 48))), Prediction("od", 120, 48, [BOXES["a"][0]]), source.stem)
    labels.finish()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    for task in tasks:  # as Label Studio exports it once a person accepted the prediction
        task["annotations"] = [{"result": task.pop("predictions")[0]["result"]}]
    (tmp_path / "ls" / "tasks.json").write_text(json.dumps(tasks))
    read = READERS["labelstudio"](tmp_path / "ls", ())
    assert read.problems == [] and [r.image for r in read.records] == [f"images/{source.name}"]
    assert [b.label for b in read.records[0].boxes] == ["drop"]


def test_a_later_coco_run_adds_its_pictures_and_keeps_the_entries_a_person_corrected(tmp_path):
    _write(tmp_path, "coco", tmp_path / "coco")
    document = tmp_path / "coco" / "annotations.json"
    data = json.loads(document.read_text())
    data["categories"].append({"id": 9, "name": "stain"})
    data["annotations"][0]["category_id"] = 9  # corrected in CVAT: a's drop is a stain
    document.write_text(json.dumps(data))
    Image.new("RGB", (120, 48)).save(tmp_path / "frames" / "c.png")
    labels = LabelsOut(tmp_path / "coco", "coco", ["drop"], "run/x")
    for stem in ("a", "c"):  # a again (kept as corrected), c new
        labels.add(Item(tmp_path / "frames" / f"{stem}.png", Image.new("RGB", (120, 48))),
                   Prediction("od", 120, 48, [Box("drop", 2, 2, 20, 20, 0.5)]), stem)
    assert "annotations.json (1 new, 1 kept)" in labels.finish()
    read = READERS["coco"](tmp_path / "coco", ())
    assert read.problems == []
    boxes = {Path(r.image).stem: [b.label for b in r.boxes] for r in read.records}
    assert boxes == {"a": ["stain", "broken-weft"], "b": [], "c": ["drop"]}
    document.write_text("{not json")
    with pytest.raises(ValueError, match="annotations.json is there but cannot be added to"):
        labels.finish()


def test_yolo_labels_of_a_run_stopped_midway_are_named_by_a_classes_txt(tmp_path):
    # No finish(): the run was interrupted; a label of a class the run did not know, twice.
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (120, 48)).save(tmp_path / "frames" / "a.png")
    labels = LabelsOut(tmp_path / "yolo", "yolo", ["drop"], "run/x")
    boxes = [Box("stain", 1, 1, 9, 9, 0.5), Box("stain", 20, 5, 30, 15, 0.4), Box("drop", 40, 5, 50, 15, 0.3)]
    labels.add(Item(tmp_path / "frames" / "a.png", Image.new("RGB", (120, 48))), Prediction("od", 120, 48, boxes), "a")
    assert (tmp_path / "yolo" / "labels" / "classes.txt").read_text() == "drop\nstain\n"
    read = READERS["yolo"](tmp_path / "yolo", ())
    assert read.problems == [] and [b.label for b in read.records[0].boxes] == ["stain", "stain", "drop"]


def test_a_grey_picture_gets_depth_1_as_labelimg_writes_it(tmp_path):
    labels = LabelsOut(tmp_path / "voc", "voc", [], "tiny")
    for stem, mode in (("grey", "L"), ("deep", "I;16"), ("colour", "RGB")):
        Image.new(mode, (64, 48)).save(tmp_path / f"{stem}.png")
        labels.add(Item(tmp_path / f"{stem}.png", Image.new("RGB", (64, 48))), Prediction("od", 64, 48, []), stem)
    depths = {stem: (tmp_path / "voc" / "annotations" / f"{stem}.xml").read_text().split("<depth>")[1][0]
              for stem in ("grey", "deep", "colour")}
    assert depths == {"grey": "1", "deep": "1", "colour": "3"}


def test_a_photo_label_studio_shows_turned_is_named_and_still_pre_annotated(predictor, tmp_path):
    from loomlens.predict.files import predict_files

    photo = Image.new("RGB", (120, 80))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored landscape, shown a quarter turned clockwise
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "turned.jpg", exif=exif)
    Image.new("RGB", (120, 80)).save(tmp_path / "in" / "upright.jpg")
    summary = predict_files(predictor, [tmp_path / "in"], tmp_path / "out", save_labels="labelstudio")
    (notice,) = summary["notices"]
    assert notice["source"] == str(tmp_path / "in" / "turned.jpg") and "EXIF orientation 6" in notice["error"]
    assert "save it upright" in notice["error"] and summary["items"] == 2 and summary["problems"] == []
    assert json.loads((tmp_path / "out" / "problems.json").read_text()) == [notice]
    assert len(json.loads((tmp_path / "out" / "labels-labelstudio" / "tasks.json").read_text())) == 2


@pytest.mark.parametrize(("fmt", "name"), [("labelstudio", "tasks.json"), ("coco", "annotations.json")])
def test_a_task_or_coco_file_that_cannot_be_added_to_is_refused_before_any_picture(tmp_path, fmt, name):
    (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=f"{name} is there but cannot be added to"):
        LabelsOut(tmp_path, fmt, ["drop"], "test")
