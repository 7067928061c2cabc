"""What labelling tools really write, beyond their formats' letter: image names without their
extension or in another case, text files with byte-order marks or in UTF-16, class ids as
floats, pixel coordinates in YOLO files, COCO polygons without a bbox, COCO images sharing an
id, two annotations of one image, and class names that differ only in case. Each is either
read as the tool meant it or reported with the file and the fix, never silently trained on
wrongly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loomlens.data.coco import read_coco_file, write_coco
from loomlens.data.labelstudio import read_labelstudio
from loomlens.data.sanitize import find_image
from loomlens.data.convert import ConvertError, convert
from loomlens.data.records import ImageRecord
from loomlens.data.voc import read_voc_file, write_voc
from loomlens.data.yolo import parse_label_text

from .conftest import all_samples, write_image

BOX = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"


def _voc(root: Path, xml: str, filename: str, label: str = "hole") -> None:
    (root / xml).write_text(
        f"<annotation>\n<filename>{filename}</filename>\n<size><width>64</width><height>48</height></size>\n"
        f"<object>\n<name>{label}</name>\n<bndbox>{BOX}</bndbox>\n</object>\n</annotation>\n", encoding="utf-8")


def _converted(src: Path, tmp_path: Path, **options):
    report = convert(src, tmp_path / "out", val_fraction=0.0, **options)
    return report, sorted(s["image"].split("/")[-1] for s in all_samples(tmp_path / "out"))


@pytest.mark.parametrize("filename", ["a", "A.JPG", "a.jpeg", "renamed-since.jpg"])
def test_voc_finds_its_image_as_labelimg_does(tmp_path, filename):
    """No extension (older LabelImg), another case (Windows), another extension, or an image
    renamed since: the one image with the XML's name is the one it annotates."""
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    _voc(src, "a.xml", filename)
    report, images = _converted(src, tmp_path)
    assert images == ["a.jpg"] and not report.problems


def test_an_image_name_that_fits_two_files_is_reported_not_guessed(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    write_image(src / "a.png")
    _voc(src, "b.xml", "a")
    record, problems = read_voc_file(src / "b.xml", src)
    assert record is None and "a.jpg, a.png all could be it" in problems[0].message
    assert problems[0].file == "b.xml" and problems[0].line == 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_yolo_text_with_a_byte_order_mark_or_in_utf16_reads_as_utf8(tmp_path, encoding):
    """Notepad saves UTF-8 with a byte-order mark; Windows PowerShell's `>` writes UTF-16."""
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    (src / "classes.txt").write_text("hole\nstain\n", encoding=encoding)
    (src / "a.txt").write_text("1 0.5 0.5 0.25 0.25\n", encoding=encoding)
    report, images = _converted(src, tmp_path)
    assert images == ["a.jpg"] and not report.problems
    assert all_samples(tmp_path / "out")[0]["suffix"].startswith("stain<loc_")


def test_yolo_class_ids_written_as_floats_are_read(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    (src / "classes.txt").write_text("hole\nstain\n")
    (src / "a.txt").write_text("1.0 0.5 0.5 0.25 0.25\n")
    report, _ = _converted(src, tmp_path)
    assert not report.problems and all_samples(tmp_path / "out")[0]["suffix"].startswith("stain<loc_")
    rows, problem = parse_label_text("0 0.5 0.5 0.1 0.1\n1.5 0.5 0.5 0.25 0.25\n", "a.txt")
    assert rows == [] and problem.line == 2 and "not a whole number" in problem.message


def test_yolo_pixel_coordinates_are_named_as_such(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    write_image(src / "b.jpg")
    (src / "classes.txt").write_text("hole\n")
    (src / "a.txt").write_text("0 30 30 20 20\n")  # pixels of a 64x48 image
    (src / "b.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    report, images = _converted(src, tmp_path)
    (pixels, emptied) = report.problems
    assert (pixels.file, pixels.line) == ("a.txt", 1) and "look like pixels" in pixels.message
    assert "divide" in pixels.fix and "a.jpg" in emptied.message and images == ["b.jpg"]


def test_two_images_that_share_a_yolo_label_file_are_reported_not_guessed(tmp_path):
    """a.jpg and a.png beside a.txt: which one the boxes were drawn on cannot be told."""
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    write_image(src / "a.png")
    write_image(src / "b.jpg")
    (src / "classes.txt").write_text("hole\n")
    (src / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (src / "b.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    report, images = _converted(src, tmp_path)
    (shared,) = report.problems
    assert shared.file == "a.txt" and "a.jpg" in shared.message and "a.png" in shared.message
    assert "rename" in shared.fix and images == ["b.jpg"]


def _coco(src: Path, annotations: list[dict], images: int = 2) -> Path:
    for i in range(images):
        write_image(src / f"im{i}.jpg")
    path = src / "ann.json"
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48} for i in range(images)],
        "categories": [{"id": 1, "name": "hole"}],
        "annotations": annotations,
    }))
    return path


def test_coco_polygons_without_a_bbox_give_their_bounds(tmp_path):
    path = _coco(tmp_path, [{"id": 7, "image_id": 0, "category_id": 1, "segmentation": [[5, 6, 15, 6, 15, 16, 5, 16]]}])
    result = read_coco_file(path, tmp_path)
    (box,) = result.records[0].boxes
    assert (box.x1, box.y1, box.x2, box.y2) == (5, 6, 15, 16) and not result.problems


def test_coco_an_unusable_annotation_never_makes_its_image_defect_free(tmp_path):
    src = tmp_path / "src"
    _coco(src, [{"id": 7, "image_id": 0, "category_id": 1},  # no bbox, no polygon
                {"id": 8, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]}])
    report, images = _converted(src, tmp_path)
    assert images == ["im1.jpg"]
    assert any("annotations[0] lacks" in p.message for p in report.problems)
    assert any("every box of im0.jpg (1) was dropped" in p.message for p in report.problems)



def test_coco_ids_written_as_text_in_one_list_and_numbers_in_the_other_still_pair(tmp_path):
    """A script that read the image list from a CSV writes its ids as text ("0"), the
    annotations' as numbers (or the other way round, category ids too): each box is its
    image's and its class's, never an image of boxes taken for clean."""
    path = _coco(tmp_path, [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]},
                            {"id": 8, "image_id": "1", "category_id": "1", "bbox": [6, 6, 10, 10]}])
    data = json.loads(path.read_text())
    data["images"][0]["id"] = "0"
    data["images"][1]["id"] = 1
    path.write_text(json.dumps(data))
    result = read_coco_file(path, tmp_path)
    assert result.problems == []
    assert {r.image: [(b.x1, b.y1) for b in r.boxes] for r in result.records} == {"im0.jpg": [(5, 5)],
                                                                                  "im1.jpg": [(6, 6)]}

def test_coco_box_problems_name_the_annotation_and_its_image(tmp_path):
    path = _coco(tmp_path, [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [30, 20, 60, 45]}])
    (problem,) = read_coco_file(path, tmp_path).problems
    assert problem.message.startswith("annotation 7 (image im1.jpg): ") and "clipped" in problem.message


def test_coco_images_that_share_an_id_are_reported_and_neither_trains_as_defect_free(tmp_path):
    """Two COCO files merged naively both number their images from 0: whose box is whose is
    unknown, so neither image is read (nor taken as defect-free), and the id is named."""
    src = tmp_path / "src"
    path = _coco(src, [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]}], images=3)
    data = json.loads(path.read_text())
    data["images"][1]["id"] = 0
    path.write_text(json.dumps(data))
    result = read_coco_file(path, src)
    assert [r.image for r in result.records] == ["im2.jpg"] and len(result.problems) == 2
    assert all("images 'im0.jpg' and 'im1.jpg' share image id 0" in p.message for p in result.problems)
    assert {Path(p.image).name for p in result.problems} == {"im0.jpg", "im1.jpg"}
    assert "its own id" in result.problems[0].fix
    report, images = _converted(src, tmp_path, unlabelled_clean=True)
    assert images == ["im2.jpg"] and len(report.problems) == 2


def test_two_annotations_of_one_image_are_reported_and_one_kept(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg")
    _voc(src, "a.xml", "a.jpg")
    _voc(src, "a (1).xml", "a.jpg", label="stain")
    report, images = _converted(src, tmp_path)
    (twin,) = report.problems
    assert twin.file == "a.xml" and "annotates a.jpg too, as a (1).xml does" in twin.message
    assert "merge" in twin.fix and images == ["a.jpg"]


def test_an_xml_copied_as_a_template_annotates_the_image_it_is_named_after(tmp_path):
    """LabelImg pairs `copied.xml` with `copied.jpg` whatever its stale `<filename>` says."""
    src = tmp_path / "src"
    write_image(src / "outside.jpg")
    write_image(src / "copied.jpg")
    _voc(src, "outside.xml", "outside.jpg")
    _voc(src, "copied.xml", "outside.jpg", label="stain")
    report, images = _converted(src, tmp_path)
    assert images == ["copied.jpg", "outside.jpg"]
    (stale,) = report.problems
    assert stale.file == "copied.xml" and "paired with copied.jpg" in stale.message and "copied.jpg" in stale.fix
    labels = {s["image"].split("/")[-1]: s["suffix"].split("<")[0] for s in all_samples(tmp_path / "out")}
    assert labels == {"copied.jpg": "stain", "outside.jpg": "hole"}


def test_class_names_that_differ_only_in_case_are_reported(tmp_path):
    src = tmp_path / "src"
    for name, label in (("a", "hole"), ("b", "Hole"), ("c", "Hole")):
        write_image(src / f"{name}.jpg")
        _voc(src, f"{name}.xml", f"{name}.jpg", label=label)
    report, images = _converted(src, tmp_path)
    (problem,) = report.problems  # once, not for every box
    assert problem.file == "b.xml" and "'Hole' differs from 'hole' only in case" in problem.message
    assert len(images) == 3
    with pytest.raises(ConvertError, match="1 problem"):
        convert(src, tmp_path / "strict", val_fraction=0.0, strict=True)


def test_a_folder_whose_files_fail_detection_says_how_to_see_why(tmp_path):
    """A truncated COCO export is no COCO to the sniff: the error says what the folder holds
    and that --format names each file's problem, which it then does."""
    src = tmp_path / "src"
    path = _coco(src, [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]}])
    path.write_text(path.read_text()[:40])
    with pytest.raises(ConvertError, match=r"it holds 1 \*\.json: pass --format"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConvertError) as err:
        convert(src, tmp_path / "out", format="coco")
    assert any(p.file == "ann.json" and "malformed JSON" in p.message for p in err.value.problems)


def test_a_look_alike_image_outside_the_root_is_never_taken(tmp_path):
    """The name-alike search keeps find_image's rule: a link leading out of the dataset is refused."""
    src = tmp_path / "src"
    src.mkdir()
    write_image(tmp_path / "elsewhere" / "a.jpg")
    (src / "a.jpg").symlink_to(tmp_path / "elsewhere" / "a.jpg")
    _voc(src, "b.xml", "A")
    record, problems = read_voc_file(src / "b.xml", src)
    assert record is None and "not found" in problems[0].message


@pytest.mark.parametrize("written", [r"C:\Users\qa\Desktop\frames\a.jpg", "/home/alice/labelling/frames/a.jpg",
                                     "//server/share/frames/a.jpg"])
def test_an_absolute_path_from_the_labellers_machine_finds_the_image_here(tmp_path, written):
    src = tmp_path / "src"
    write_image(src / "images" / "a.jpg")
    (src / "annotations").mkdir()
    _voc(src / "annotations", "frame.xml", written)
    report, images = _converted(src, tmp_path)
    assert images == ["a.jpg"] and not report.problems
    coco = _coco(tmp_path / "coco", [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]}], images=1)
    data = json.loads(coco.read_text())
    data["images"][0]["file_name"] = written.replace("a.jpg", "im0.jpg")
    coco.write_text(json.dumps(data))
    (record,) = read_coco_file(coco, tmp_path / "coco").records
    assert record.image.endswith("im0.jpg")


def test_the_pascal_voc_layout_reads(tmp_path):
    """Pascal VOC (and CVAT's VOC export): Annotations/ beside JPEGImages/, `<folder>VOC2007`."""
    src = tmp_path / "VOC2007"
    write_image(src / "JPEGImages" / "000001.jpg")
    (src / "Annotations").mkdir()
    (src / "Annotations" / "000001.xml").write_text(
        f"<annotation><folder>VOC2007</folder><filename>000001.jpg</filename><object><name>hole</name>"
        f"<bndbox>{BOX}</bndbox></object></annotation>")
    report, images = _converted(src, tmp_path)
    assert images == ["000001.jpg"] and not report.problems


def test_an_image_name_that_is_no_text_in_a_label_studio_export_is_a_problem(tmp_path):
    """JSON may hold lone surrogates (`\\udcd6`, `\\ud800`) that no file name on disk can be:
    each task is named and skipped, never a crash."""
    src = tmp_path / "src"
    write_image(src / "images" / "a.jpg")
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{bad}x.jpg"}, "annotations": [{"result": []}]}
             for i, bad in enumerate(("\udcd6", "\ud800"))]
    (src / "export.json").write_text(json.dumps(tasks))
    result = read_labelstudio(src)
    assert result.records == [] and len(result.problems) == 2
    assert all(p.file == "export.json" and "not found" in p.message for p in result.problems)
    assert find_image(src, "\udcd6x.jpg", [src], "export.json")[1].message.startswith(
        "image name '\\\\xd6x.jpg' is not valid UTF-8")


@pytest.mark.parametrize("fmt", ["cvat", "labelstudio", "voc", "coco"])
def test_a_file_whose_name_is_not_utf8_is_named_by_every_reader(tmp_path, fmt):
    src = tmp_path / "src"
    write_image(src / "images" / "a.png", (100, 80))
    try:
        write_image(src / "images" / os.fsdecode(b"\xd6lfleck.png"), (100, 80))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    if fmt == "cvat":
        (src / "annotations.xml").write_text('<annotations><image id="0" name="a.png" width="100" height="80">'
                                             "</image></annotations>")
    elif fmt == "labelstudio":
        (src / "export.json").write_text(json.dumps(
            [{"id": 1, "data": {"image": "images/a.png"}, "annotations": [{"result": []}]}]))
    elif fmt == "voc":
        write_voc(ImageRecord("images/a.png", 100, 80, []), src / "images" / "a.xml", src)
    else:
        write_coco([ImageRecord("images/a.png", 100, 80, [])], src / "coco.json", [])
    report, images = _converted(src, tmp_path, unlabelled_clean=True, keep_empty=True)
    (problem,) = report.problems
    assert problem.file == "images/\\xd6lfleck.png" and "not valid UTF-8" in problem.message
    assert images == ["a.png"]


def test_a_coco_image_listed_twice_under_its_id_is_one_image_with_its_boxes(tmp_path):
    src = tmp_path / "src"
    path = _coco(src, [{"id": 7, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10]}], images=2)
    data = json.loads(path.read_text())
    data["images"].append(dict(data["images"][0]))
    path.write_text(json.dumps(data))
    result = read_coco_file(path, src)
    assert {r.image: len(r.boxes) for r in result.records} == {"im0.jpg": 1, "im1.jpg": 0}
    (problem,) = result.problems
    assert "'im0.jpg' (id 0) is listed twice; the first entry kept" in problem.message
