"""Every kind of bad input gives a Problem naming the file (and line where known), the rest of
the dataset still converts, and --strict turns any problem into a failure that writes nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from loomlens.data.convert import ConvertError, convert
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc
from loomlens.data.yolo import write_classes

from .conftest import all_samples, write_image

GOOD = "good.jpg"


def _good_voc(root: Path) -> None:
    write_image(root / GOOD)
    write_voc(ImageRecord(GOOD, 64, 48, [Box("drop", 5, 5, 20, 20)]), root / "good.xml", root)


GOOD_BOX = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"


def _voc_xml(root: Path, name: str, filename: str, box: str = GOOD_BOX, label: str = "drop") -> None:
    (root / name).write_text(
        f"<annotation>\n<filename>{filename}</filename>\n<size><width>64</width><height>48</height></size>\n"
        f"<object>\n<name>{label}</name>\n<bndbox>{box}</bndbox>\n</object>\n</annotation>\n", encoding="utf-8")


def voc_box_outside(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg", "<xmin>-10</xmin><ymin>5</ymin><xmax>90</xmax><ymax>20</ymax>")
    return "bad.xml", 4, "clipped"


def voc_box_without_area(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg", "<xmin>70</xmin><ymin>5</ymin><xmax>90</xmax><ymax>20</ymax>")
    return "bad.xml", 4, "no area"


def voc_reversed_box(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg", "<xmin>30</xmin><ymin>5</ymin><xmax>30</xmax><ymax>20</ymax>")
    return "bad.xml", 4, "no area"


def voc_missing_image(root: Path) -> tuple[str, int | None, str]:
    _voc_xml(root, "bad.xml", "gone.jpg")
    return "bad.xml", 1, "not found"


def voc_truncated_xml(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg")
    text = (root / "bad.xml").read_text()
    (root / "bad.xml").write_text(text[: text.index("<bndbox>") + 12])
    return "bad.xml", 6, "malformed XML"  # the line the file breaks off in


def voc_escaping_path(root: Path) -> tuple[str, int | None, str]:
    _voc_xml(root, "bad.xml", "../../etc/passwd")
    return "bad.xml", 1, "outside the dataset root"


def voc_absolute_path_outside(root: Path) -> tuple[str, int | None, str]:
    outside = write_image(root.parent / "elsewhere.jpg")
    _voc_xml(root, "bad.xml", str(outside.resolve()))
    return "bad.xml", 1, "outside the dataset root"


def voc_invisible_character_in_label(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg", label="drop\u200b")  # a zero-width space pasted in
    return "bad.xml", 4, "invisible characters"


def voc_label_with_angle_bracket(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _voc_xml(root, "bad.xml", "bad.jpg", label="drop&lt;2&gt;")
    return "bad.xml", 4, "'<' or '>'"


def voc_size_mismatch(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg", (32, 32))
    _voc_xml(root, "bad.xml", "bad.jpg")
    return "bad.xml", 1, "annotation says the image is 64x48"


def voc_not_an_image(root: Path) -> tuple[str, int | None, str]:
    (root / "bad.jpg").write_bytes(b"this is not a jpeg")
    _voc_xml(root, "bad.xml", "bad.jpg")
    return "bad.xml", 1, "cannot read image"


def _yolo(root: Path, lines: str, image: bool = True, classes: bool = True) -> None:
    write_image(root / "good.jpg")
    (root / "good.txt").write_text("0 0.2 0.2 0.1 0.1\n")
    if image:
        write_image(root / "bad.jpg")
    (root / "bad.txt").write_text(lines)
    if classes:
        write_classes(root / "classes.txt", ["drop", "wrinkle"])


def yolo_unknown_class(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    return "bad.txt", 2, "class id 7"


def yolo_malformed_line(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 0.5 0.2 0.2\n\n1 0.5 0.5 0.2\n")
    return "bad.txt", 3, "malformed YOLO line"


def yolo_not_a_number(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 half 0.2 0.2\n")
    return "bad.txt", 1, "malformed YOLO line"


def yolo_missing_image(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 0.5 0.2 0.2\n", image=False)
    return "bad.txt", None, "no image named bad"


def yolo_box_outside(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.95 0.5 0.2 0.2\n")
    return "bad.txt", 1, "clipped"


def yolo_box_wholly_outside(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 1.3 0.5 0.2 0.2\n")  # 1.2..1.4 of the width: past the image's right edge
    return "bad.txt", 1, "no area inside the 64x48 image (it lies wholly outside); dropped"


def yolo_infinite_coordinate(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 0.5 0.2 0.2\n1 inf 0.5 0.2 0.2\n")
    return "bad.txt", 2, "not a finite number"


def yolo_file_name_not_utf8(root: Path) -> tuple[str, int | None, str]:
    _yolo(root, "1 0.5 0.5 0.2 0.2\n")
    latin1 = os.fsdecode(b"\xd6lfleck_1")  # a name from an old Windows share
    try:
        write_image(root / f"{latin1}.jpg")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (root / f"{latin1}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return "\\xd6lfleck_1.jpg", None, "not valid UTF-8"


def _coco(root: Path, data: dict | str) -> None:
    write_image(root / "good.jpg")
    good = {"images": [{"id": 1, "file_name": "good.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}],
            "categories": [{"id": 1, "name": "drop"}]}
    (root / "good.json").write_text(json.dumps(good))
    (root / "bad.json").write_text(data if isinstance(data, str) else json.dumps(data))


def coco_malformed_json(root: Path) -> tuple[str, int | None, str]:
    _coco(root, '{\n  "images": [\n    {"id": 1,\n')
    return "bad.json", 4, "malformed JSON"


def coco_unknown_category(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _coco(root, {"images": [{"id": 1, "file_name": "bad.jpg"}], "categories": [{"id": 1, "name": "drop"}],
                 "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]}]})
    return "bad.json", None, "unknown or unusable category_id 5"


def coco_escaping_path(root: Path) -> tuple[str, int | None, str]:
    _coco(root, {"images": [{"id": 1, "file_name": "../../../etc/passwd"}], "annotations": [], "categories": []})
    return "bad.json", None, "outside the dataset root"


def coco_annotation_for_no_image(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _coco(root, {"images": [{"id": 1, "file_name": "bad.jpg"}], "categories": [{"id": 1, "name": "drop"}],
                 "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}]})
    return "bad.json", None, "not in 'images'"


def coco_broken_entries(root: Path) -> tuple[str, int | None, str]:
    write_image(root / "bad.jpg")
    _coco(root, {"images": [{"id": [1], "file_name": "bad.jpg"}, {"file_name": "x"}], "categories": [],
                 "annotations": [{"image_id": 1}]})
    return "bad.json", None, "lacks one of"


CASES: list[Callable[[Path], tuple[str, int | None, str]]] = [
    voc_box_outside, voc_box_without_area, voc_reversed_box, voc_missing_image, voc_truncated_xml,
    voc_escaping_path, voc_absolute_path_outside, voc_invisible_character_in_label, voc_label_with_angle_bracket,
    voc_size_mismatch, voc_not_an_image,
    yolo_unknown_class, yolo_malformed_line, yolo_not_a_number, yolo_missing_image, yolo_box_outside,
    yolo_box_wholly_outside, yolo_infinite_coordinate, yolo_file_name_not_utf8,
    coco_malformed_json, coco_unknown_category, coco_escaping_path, coco_annotation_for_no_image,
    coco_broken_entries,
]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_reported_and_the_rest_converts(tmp_path, make):
    src = tmp_path / "data"
    src.mkdir()
    if make.__name__.startswith("voc"):
        _good_voc(src)
    file, line, message = make(src)
    report = convert(src, tmp_path / "out", val_fraction=0)
    matching = [p for p in report.problems if p.file == file and message in p.message]
    assert matching, report.problems
    assert matching[0].line == line
    assert matching[0].fix  # every problem says what to do
    assert any(s["image"].endswith(GOOD) for s in all_samples(tmp_path / "out"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"file": file, "line": line} in [{"file": p["file"], "line": p["line"]} for p in summary["problems"]]

    with pytest.raises(ConvertError) as failed:
        convert(src, tmp_path / "strict", val_fraction=0, strict=True)
    assert any(p.file == file for p in failed.value.problems)
    assert not (tmp_path / "strict").exists()


def test_strict_failure_keeps_the_previous_good_output(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    _good_voc(src)
    out = tmp_path / "out"
    convert(src, out, val_fraction=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    voc_missing_image(src)
    with pytest.raises(ConvertError):
        convert(src, out, val_fraction=0, strict=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_absolute_path_inside_the_root_is_fine(tmp_path):
    image = write_image(tmp_path / "a.jpg")
    _voc_xml(tmp_path, "a.xml", str(image.resolve()))
    report = convert(tmp_path, tmp_path / "out", val_fraction=0)
    assert report.problems == [] and report.images == 1


def test_nothing_usable_is_an_error_listing_the_problems(tmp_path):
    _voc_xml(tmp_path, "a.xml", "gone.jpg")
    with pytest.raises(ConvertError, match="no usable") as failed:
        convert(tmp_path, tmp_path / "out")
    assert [p.file for p in failed.value.problems] == ["a.xml"]


@pytest.mark.parametrize("make", [voc_box_without_area, yolo_box_wholly_outside, yolo_infinite_coordinate])
def test_a_refused_box_is_one_problem_that_says_why(tmp_path, make):
    """A box wholly outside its image is not 'clipped' and then 'dropped'; an `inf` is no
    pixel coordinate: one problem each, saying what is wrong with the box."""
    src = tmp_path / "data"
    src.mkdir()
    if make is voc_box_without_area:
        _good_voc(src)
    file, line, message = make(src)
    report = convert(src, tmp_path / "out", val_fraction=0)
    (problem,) = [p for p in report.problems if (p.file, p.line) == (file, line)]
    assert message in problem.message and "clipped" not in problem.message and "pixels" not in problem.message


def test_a_file_name_that_is_not_utf8_is_named_and_skipped_not_a_crash(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    yolo_file_name_not_utf8(src)
    report = convert(src, tmp_path / "out", val_fraction=0, unlabelled_clean=True)
    named = [p for p in report.problems if "not valid UTF-8" in p.message]
    assert [p.file for p in named] == ["\\xd6lfleck_1.jpg", "\\xd6lfleck_1.txt"]
    assert all("convmv -f latin1 -t utf8" in p.fix for p in named)
    assert sorted(s["image"].split("/")[-1] for s in all_samples(tmp_path / "out")) == ["bad.jpg", "good.jpg"]
