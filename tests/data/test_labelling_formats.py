"""The datasets people already have: ultralytics / Roboflow YOLO (data.yaml), Roboflow COCO,
pre-split LabelImg folders, CVAT for images XML and Label Studio JSON. Each is detected by
`--format auto`, keeps its own split unless `--resplit`, and each malformed file is a problem
that names the file (and line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomlens.data.convert import ConvertError, convert
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc

from .conftest import NO_DEFECT, all_samples, besides_no_defect, read_jsonl, write_image


def _split_images(out: Path) -> dict[str, set[str]]:
    """Split -> the image file names its samples use."""
    return {name: {Path(s["image"]).name for s in read_jsonl(out / f"{name}.jsonl")}
            for name in ("train", "val", "test") if (out / f"{name}.jsonl").exists()}


def _boxes(out: Path) -> dict[str, str]:
    return {Path(s["image"]).name: s["suffix"] for s in all_samples(out)}


# --- ultralytics / Roboflow YOLO ---------------------------------------------------------------

def _roboflow_yolo(root: Path, data_yaml: str) -> Path:
    """Roboflow's YOLO export: data.yaml beside train/ valid/ test/, each with images/ labels/."""
    for split, stem, line in (("train", "a", "0 0.5 0.5 0.25 0.5\n"), ("train", "b", "1 0.1 0.1 0.3 0.1 0.3 0.4\n"),
                              ("valid", "c", ""), ("test", "d", "0 0.5 0.5 0.5 0.5\n")):
        write_image(root / split / "images" / f"{stem}.jpg", (64, 48))
        if line or stem == "c":
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{stem}.txt").write_text(line)
    (root / "data.yaml").write_text(data_yaml)
    return root


ROBOFLOW_YAML = ("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
                 "nc: 2\nnames: ['drop', 'wrinkle']\n")


def test_roboflow_yolo_export_converts_with_its_own_split(tmp_path):
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML)
    report = convert(src, tmp_path / "data")  # --format auto
    assert report.format == "yolo" and [p.message[:len(NO_DEFECT)] for p in report.problems] == [NO_DEFECT]
    assert report.classes == ["drop", "wrinkle"]
    assert _split_images(tmp_path / "data") == {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}
    assert report.split["kept"] == {"train": 2, "val": 1, "test": 1} and report.split["drawn"] == {}
    assert report.split["from"] == ["data.yaml"]  # not its train/ valid/ test/ folders: the data.yaml lists decide
    boxes = _boxes(tmp_path / "data")
    assert boxes["a.jpg"] == "drop<loc_375><loc_250><loc_625><loc_750>"
    # the polygon (0.1,0.1) (0.3,0.1) (0.3,0.4) became its bounding box
    assert boxes["b.jpg"] == "wrinkle<loc_100><loc_100><loc_300><loc_400>"
    assert boxes["c.jpg"] == ""  # an empty label file: defect-free


def test_ultralytics_yaml_with_a_path_a_names_dict_and_an_image_list(tmp_path):
    src = tmp_path / "set"
    for split, stem in (("train", "a"), ("train", "b"), ("val", "c")):
        write_image(src / "images" / split / f"{stem}.png", (40, 40))
        (src / "labels" / split).mkdir(parents=True, exist_ok=True)
        (src / "labels" / split / f"{stem}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (src / "train.txt").write_text("./images/train/a.png\nimages/train/b.png\n")
    (src / "data.yaml").write_text("path: .\ntrain: train.txt\nval: images/val\nnames:\n  0: drop\n  1: wrinkle\n")
    report = convert(src, tmp_path / "data")
    assert besides_no_defect(report.problems) == [] and report.classes == ["drop", "wrinkle"]
    assert _split_images(tmp_path / "data") == {"train": {"a.png", "b.png"}, "val": {"c.png"}}


def test_a_colab_data_yaml_with_absolute_paths_and_quoted_ids_reads_here(tmp_path):
    """Written on another machine: split paths absolute there, `names` ids quoted as strings."""
    colab = ("train: /content/datasets/fabric-3/train/images\nval: C:\\data\\fabric-3\\valid\\images\n"
             "test: /content/datasets/fabric-3/test/images\nnames:\n  '0': drop\n  '1': wrinkle\n")
    src = _roboflow_yolo(tmp_path / "export", colab)
    report = convert(src, tmp_path / "data")
    assert besides_no_defect(report.problems) == [] and report.classes == ["drop", "wrinkle"]
    assert _split_images(tmp_path / "data") == {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}


def test_a_data_yaml_that_points_nowhere_names_the_file_and_line(tmp_path):
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML.replace("../valid/images", "../validation/images"))
    report = convert(src, tmp_path / "data")
    (problem,) = [p for p in report.problems if p.file == "data.yaml"]
    assert problem.line == 2 and "val: '../validation/images' points nowhere" in problem.message
    assert "data.yaml" in problem.fix
    assert report.images == 3  # the other splits still convert


@pytest.mark.parametrize("fmt", ["auto", "yolo"])
def test_a_data_yaml_in_a_folder_below_the_one_given_names_the_folder_to_convert(tmp_path, fmt):
    """Windows' Extract All puts a Roboflow zip in a folder of its own: given the folder above,
    convert names the data.yaml and the folder to convert, not a missing classes.txt."""
    download = tmp_path / "download"
    _roboflow_yolo(download / "fabric.v1i.yolov8", ROBOFLOW_YAML)
    with pytest.raises(ConvertError) as raised:
        convert(download, tmp_path / "data", format=fmt)
    problem = raised.value.problems[0]
    assert problem.file == "fabric.v1i.yolov8/data.yaml" and "below the folder converted" in problem.message
    assert str(download / "fabric.v1i.yolov8") in problem.fix
    assert not any("classes.txt" in str(p) for p in raised.value.problems)


def test_a_split_folder_the_data_yaml_does_not_list_is_reported_image_by_image(tmp_path):
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML.replace("test: ../test/images\n", ""))
    report = convert(src, tmp_path / "data")
    (problem,) = besides_no_defect(report.problems)  # its label file was never read, so it excuses nothing
    assert problem.file == "test/images/d.jpg" and "no usable annotation" in problem.message
    assert report.images == 3


def test_unknown_class_ids_in_yolo_labels_are_reported_with_file_and_line(tmp_path):
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML)
    (src / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    report = convert(src, tmp_path / "data")
    (problem,) = besides_no_defect(report.problems)
    assert (problem.file, problem.line) == ("train/labels/a.txt", 2) and "class id 7" in problem.message
    with pytest.raises(ConvertError, match="strict"):
        convert(src, tmp_path / "strict", strict=True)


def test_names_that_are_neither_a_list_nor_ids_are_a_clear_error(tmp_path):
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML.replace("names: ['drop', 'wrinkle']", "names: drop"))
    with pytest.raises(ConvertError, match="no usable") as caught:
        convert(src, tmp_path / "data")
    assert any(p.file == "data.yaml" and p.line == 6 and "'names'" in p.message for p in caught.value.problems)


def test_yaml_words_in_names_that_are_no_text_are_refused_with_their_line(tmp_path):
    """`no` is YAML's False, `~` its None: trained, `no` would be a class 'False'."""
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML.replace("names: ['drop', 'wrinkle']",
                                                                    "names:\n  - drop\n  - no"))
    report = convert(src, tmp_path / "data")
    (problem,) = [p for p in report.problems if p.file == "data.yaml"]
    assert problem.line == 8 and "class 1 is 'no', which YAML reads as False" in problem.message
    assert problem.fix == "quote it: 'no'" and report.classes == ["drop"]
    assert any(p.file == "train/labels/b.txt" and "class id 1 has no usable name" in p.message for p in report.problems)


def test_a_label_file_no_image_reads_is_named_and_its_image_never_trains_as_defect_free(tmp_path):
    """Windows keeps `IMG_1.JPG` and `img_1.txt` together; ultralytics, case-sensitive, reads
    neither box: the label file is named with its right name, and its image left out."""
    src = tmp_path / "export"
    for stem, label in (("IMG_1", "img_1"), ("IMG_2", "IMG_2"), ("IMG_3", None)):
        write_image(src / "train" / "images" / f"{stem}.JPG")
        if label:
            (src / "train" / "labels").mkdir(parents=True, exist_ok=True)
            (src / "train" / "labels" / f"{label}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (src / "train" / "labels" / "img_2.txt").write_text("0 0.2 0.2 0.1 0.1\n")  # a second file for IMG_2
    (src / "train" / "labels" / "gone.txt").write_text("0 0.2 0.2 0.1 0.1\n")  # its image lost
    (src / "data.yaml").write_text("train: train/images\nval: train/images\nnames: [drop]\n")
    report = convert(src, tmp_path / "data", unlabelled_clean=True)
    orphan, renamed, merged = [p for p in report.problems if p.file.startswith("train/labels/")]
    assert renamed.file == "train/labels/img_1.txt" and "no image reads it" in renamed.message
    assert renamed.fix == "rename it to train/labels/IMG_1.txt" and Path(renamed.image).name == "IMG_1.JPG"
    assert merged.file == "train/labels/img_2.txt" and "move its lines into train/labels/IMG_2.txt" in merged.fix
    assert orphan.file == "train/labels/gone.txt" and "no image gone.*" in orphan.message
    assert _boxes(tmp_path / "data") == {"IMG_2.JPG": "drop<loc_375><loc_375><loc_625><loc_625>", "IMG_3.JPG": ""}


def test_a_labels_folder_in_another_case_is_reported_not_read(tmp_path):
    """Ultralytics swaps `/images/` for `/labels/`, so it never reads `Labels/`: neither does
    convert, which names every file there and leaves their images out."""
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML)
    (src / "train" / "labels").rename(src / "train" / "Labels")
    if (src / "train" / "labels").is_dir():
        pytest.skip("a case-insensitive file system: ultralytics reads Labels/ here too")
    report = convert(src, tmp_path / "data")
    moved = [p for p in report.problems if p.file.startswith("train/Labels/")]
    assert [(p.file, p.fix) for p in moved] == [("train/Labels/a.txt", "rename it to train/labels/a.txt"),
                                               ("train/Labels/b.txt", "rename it to train/labels/b.txt")]
    assert set(_boxes(tmp_path / "data")) == {"c.jpg", "d.jpg"}


def test_two_images_that_share_a_label_file_through_data_yaml_are_reported_not_guessed(tmp_path):
    """a.jpg and a.png in train/images/ both read train/labels/a.txt: as the YOLO reader says
    of LabelImg's files, which one its boxes were drawn on cannot be told, so neither trains."""
    src = _roboflow_yolo(tmp_path / "export", ROBOFLOW_YAML)
    write_image(src / "train" / "images" / "a.png", (64, 48))
    report = convert(src, tmp_path / "data")
    (shared,) = [p for p in report.problems if p.file == "train/labels/a.txt"]
    assert "share the label file's stem" in shared.message and "file skipped" in shared.message
    assert "train/images/a.jpg and train/images/a.png" in shared.message and "rename" in shared.fix
    assert set(_boxes(tmp_path / "data")) == {"b.jpg", "c.jpg", "d.jpg"}


# --- Roboflow COCO -------------------------------------------------------------------------------

def _roboflow_coco(root: Path) -> Path:
    """One `_annotations.coco.json` per split folder, images beside it, with Roboflow's project
    category (id 0, the supercategory of the real ones, never used)."""
    categories = [{"id": 0, "name": "fabric-defects", "supercategory": "none"},
                  {"id": 1, "name": "drop", "supercategory": "fabric-defects"},
                  {"id": 2, "name": "wrinkle", "supercategory": "fabric-defects"}]
    for split, names in (("train", ["a", "b"]), ("valid", ["c"])):
        images, annotations = [], []
        for i, stem in enumerate(names):
            write_image(root / split / f"{stem}_jpg.rf.123.jpg", (64, 48))
            images.append({"id": i, "file_name": f"{stem}_jpg.rf.123.jpg", "width": 64, "height": 48})
            annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 10, 8]})
        doc = {"info": {}, "licenses": [], "categories": categories, "images": images, "annotations": annotations}
        (root / split / "_annotations.coco.json").write_text(json.dumps(doc))
    return root


def test_roboflow_coco_export_keeps_its_split_and_drops_the_project_category(tmp_path):
    report = convert(_roboflow_coco(tmp_path / "export"), tmp_path / "data")
    assert report.format == "coco" and report.problems == []
    assert report.classes == ["drop", "wrinkle"]  # not "fabric-defects"
    assert _split_images(tmp_path / "data") == {"train": {"a_jpg.rf.123.jpg", "b_jpg.rf.123.jpg"},
                                                "val": {"c_jpg.rf.123.jpg"}}
    assert report.split["from"] == ["split folders train/, valid/"]


# --- pre-split LabelImg folders, --resplit -----------------------------------------------------

def _presplit_voc(root: Path, layout: dict[str, int]) -> Path:
    for split, count in layout.items():
        for i in range(count):
            image = write_image(root / split / f"{split}{i}.jpg")
            write_voc(ImageRecord(f"{split}/{image.name}", 64, 48, [Box("drop", 5, 5, 20, 20)]),
                      root / split / f"{split}{i}.xml", root)
    return root


def test_presplit_labelimg_folders_keep_their_split_and_resplit_reshuffles(tmp_path):
    src = _presplit_voc(tmp_path / "src", {"train": 8, "val": 2, "test": 2})
    kept = convert(src, tmp_path / "kept")
    assert {k: len(v) for k, v in _split_images(tmp_path / "kept").items()} == {"train": 8, "val": 2, "test": 2}
    assert all(n.startswith("val") for n in _split_images(tmp_path / "kept")["val"]) and kept.split["drawn"] == {}
    assert kept.split["from"] == ["split folders train/, val/, test/"]
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["split"]["from"] == kept.split["from"]

    redrawn = convert(src, tmp_path / "redrawn", resplit=True, val_fraction=0.5, seed=3)
    splits = _split_images(tmp_path / "redrawn")
    assert redrawn.split["kept"] == {} and redrawn.split["from"] == []
    assert not (tmp_path / "redrawn" / "test.jsonl").exists()
    assert len(splits["val"]) == 6 and not all(n.startswith("val") for n in splits["val"])


def test_a_dataset_without_its_own_val_split_draws_one_from_its_train_folder(tmp_path):
    src = _presplit_voc(tmp_path / "src", {"train": 6, "test": 2})
    report = convert(src, tmp_path / "data", val_fraction=0.34)
    splits = _split_images(tmp_path / "data")
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert all(n.startswith("test") for n in splits["test"]) and report.split["drawn"] == {"train": 4, "val": 2}
    assert report.split["from"] == ["split folders train/, test/"]  # train/ still the pool val is drawn from


def test_split_folders_are_named_as_written_and_found_in_the_annotations_path_too(tmp_path):
    src = tmp_path / "src"  # images side by side at the top, LabelImg's annotations in split folders
    for folder, stem in (("Train", "a"), ("Train", "b"), ("Train", "c"), ("Validation", "d")):
        write_image(src / f"{stem}.jpg")
        write_voc(ImageRecord(f"{stem}.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]), src / folder / f"{stem}.xml", src)
    report = convert(src, tmp_path / "data")
    assert report.problems == [] and report.split["kept"] == {"train": 3, "val": 1}
    assert report.split["from"] == ["split folders Train/, Validation/"]


def test_a_test_fraction_draws_a_test_split_from_the_train_folder_of_a_dataset_without_one(tmp_path):
    src = _presplit_voc(tmp_path / "src", {"train": 8, "val": 2})
    convert(src, tmp_path / "none")
    assert not (tmp_path / "none" / "test.jsonl").exists()  # no test asked for, none drawn
    report = convert(src, tmp_path / "data", test_fraction=0.25)
    splits = _split_images(tmp_path / "data")
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert all(n.startswith("train") for n in splits["test"]) and splits["val"] == {"val0.jpg", "val1.jpg"}
    assert report.split["kept"] == {"val": 2} and report.split["drawn"] == {"train": 6, "test": 2}


# --- Pascal VOC ImageSets/Main ------------------------------------------------------------------

def _vocdevkit(root: Path, stems: str, lists: dict[str, str]) -> Path:
    """The classic VOCdevkit layout (CVAT's Pascal VOC export too): `Annotations/<id>.xml` and
    `JPEGImages/<id>.jpg`, one drop box each, for every letter of `stems`, and
    `ImageSets/Main/<name>.txt` holding each text of `lists`."""
    for stem in stems:
        write_image(root / "JPEGImages" / f"{stem}.jpg")
        write_voc(ImageRecord(f"JPEGImages/{stem}.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]),
                  root / "Annotations" / f"{stem}.xml", root)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, text in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text(text)
    return root


def test_voc_imagesets_main_lists_give_the_split_and_per_class_lists_are_not_splits(tmp_path):
    src = _vocdevkit(tmp_path / "VOC2007", "abcdef", {
        "train": "a\nb\nc\n", "val": "d\n", "test": "e\n",
        "trainval": "a\nb\nc\nd\nf\n",  # train.txt and val.txt say it all: not read
        "drop_train": "a  1\nb -1\nf  1\nzz 1\n"})  # a per-class list, not a split
    report = convert(src, tmp_path / "data")  # --format auto
    assert report.format == "voc" and report.problems == []
    assert _split_images(tmp_path / "data") == {"train": {"a.jpg", "b.jpg", "c.jpg", "f.jpg"}, "val": {"d.jpg"},
                                                "test": {"e.jpg"}}
    # f.jpg is in no list: split at random, as an image outside any split folder is (val and test given: train)
    assert report.split["kept"] == {"train": 3, "val": 1, "test": 1} and report.split["drawn"] == {"train": 1}
    assert report.split["from"] == ["ImageSets/Main"]
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["split"]["from"] == ["ImageSets/Main"]

    redrawn = convert(src, tmp_path / "redrawn", resplit=True)
    assert redrawn.split["kept"] == {} and redrawn.split["from"] == []


def test_voc_trainval_is_the_pool_val_is_drawn_from_where_train_and_val_lists_are_absent(tmp_path):
    src = _vocdevkit(tmp_path / "VOC2007", "abcdefgh", {"trainval": "a\nb\nc\nd\ne\nf\n", "test": "g\nh\n",
                                                        "drop_trainval": "a 1\nb 1\n"})
    report = convert(src, tmp_path / "data", val_fraction=0.34)
    splits = _split_images(tmp_path / "data")
    assert report.problems == [] and {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert splits["test"] == {"g.jpg", "h.jpg"}
    assert report.split["kept"] == {"test": 2} and report.split["drawn"] == {"train": 4, "val": 2}


def test_each_year_of_a_vocdevkit_is_split_by_its_own_lists(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    _vocdevkit(devkit / "VOC2007", "abcd", {"val": "a\n", "trainval": "a\nb\nc\n"})  # trainval fills in train
    _vocdevkit(devkit / "VOC2012", "efgh", {"Train": "e\nf\n", "Validation": "g\nh\n", "test": "a\n"})
    report = convert(devkit, tmp_path / "data")
    (stray,) = report.problems  # 2012's test.txt names 2007's a
    assert (stray.file, stray.line) == ("VOC2012/ImageSets/Main/test.txt", 1) and "'a'" in stray.message
    splits = _split_images(tmp_path / "data")
    assert splits["val"] == {"a.jpg", "g.jpg", "h.jpg"} and splits["train"] == {"b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"}
    assert report.split["from"] == ["VOC2007/ImageSets/Main", "VOC2012/ImageSets/Main"]
    assert report.split["kept"] == {"train": 4, "val": 3} and report.split["drawn"] == {"train": 1}  # d: in no list


def test_voc_lists_without_a_split_list_leave_the_split_to_the_draw(tmp_path):
    src = _vocdevkit(tmp_path / "cvat-export", "abc", {"default": "a\nb\nc\n"})  # CVAT's export without subsets
    report = convert(src, tmp_path / "data", val_fraction=0.34)
    assert report.problems == [] and report.split["kept"] == {} and report.split["from"] == []
    assert {k: len(v) for k, v in _split_images(tmp_path / "data").items()} == {"train": 2, "val": 1}


def test_a_voc_list_id_without_an_annotation_or_in_two_splits_is_named_with_file_and_line(tmp_path):
    src = _vocdevkit(tmp_path / "VOC2007", "abcd", {"train": "a\nb\n", "val": "c\nzz\n", "test": "d\nb\n"})
    report = convert(src, tmp_path / "data")
    missing, twice = report.problems
    assert (missing.file, missing.line) == ("ImageSets/Main/val.txt", 2)
    assert "'zz'" in missing.message and "no annotation" in missing.message and "zz.xml" in missing.fix
    assert (twice.file, twice.line) == ("ImageSets/Main/test.txt", 2)
    assert "'b'" in twice.message and "ImageSets/Main/train.txt:2" in twice.message and "kept in train" in twice.message
    assert "one of the two lists" in twice.fix
    assert _split_images(tmp_path / "data") == {"train": {"a.jpg", "b.jpg"}, "val": {"c.jpg"}, "test": {"d.jpg"}}


# --- CVAT for images 1.1 -------------------------------------------------------------------------

CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><labels>
    <label><name>drop</name></label>
    <label><name>wrinkle</name></label>
    <label><name>stain</name></label>
  </labels></task></meta>
  <image id="0" name="a.png" width="100" height="80" subset="Train">
    <box label="drop" occluded="0" xtl="10" ytl="20" xbr="30" ybr="40" z_order="0"></box>
    <polygon label="wrinkle" points="50,10;70,12;60,30"></polygon>
    <box label="drop" xtl="40" ytl="40" xbr="60" ybr="50" rotation="90"></box>
    <polyline label="wrinkle" points="1,1;5,5"></polyline>
  </image>
  <image id="1" name="b.png" width="100" height="80" subset="Validation"></image>
  <image id="2" name="c.png" width="100" height="80" subset="Train">
    <box label="drop" xtl="ten" ytl="20" xbr="30" ybr="40"></box>
  </image>
</annotations>
"""


def test_cvat_for_images_xml_converts_shapes_subsets_and_labels(tmp_path):
    src = tmp_path / "cvat"
    for name in ("a.png", "b.png", "c.png"):
        write_image(src / "images" / name, (100, 80))
    (src / "annotations.xml").write_text(CVAT)
    report = convert(src, tmp_path / "data", keep_empty=True)
    assert report.format == "cvat"
    assert report.classes == ["drop", "wrinkle", "stain"]  # the <meta> labels, in order
    line, bad = besides_no_defect(report.problems)
    assert (line.file, line.line) == ("annotations.xml", 13) and "<polyline> 'wrinkle' has no area" in line.message
    assert (bad.file, bad.line) == ("annotations.xml", 17) and "bad coordinates" in bad.message
    assert _split_images(tmp_path / "data") == {"train": {"a.png", "c.png"}, "val": {"b.png"}}
    assert report.split["from"] == ["CVAT subsets"]
    from loomlens.data.cvat import read_cvat

    (a, *_) = read_cvat(src).records
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in a.boxes] == [
        ("drop", 10, 20, 30, 40), ("wrinkle", 50, 10, 70, 30), ("drop", pytest.approx(45), pytest.approx(35),
                                                               pytest.approx(55), pytest.approx(55))]


def test_a_cvat_image_without_a_subset_keeps_its_split_folder_and_both_sources_are_named(tmp_path):
    src = tmp_path / "cvat"
    for name in ("a.png", "b.png", "test/c.png"):
        write_image(src / "images" / name, (100, 80))
    box = '<box label="drop" xtl="10" ytl="20" xbr="30" ybr="40"></box>'
    (src / "annotations.xml").write_text(
        f'<annotations><image id="0" name="a.png" width="100" height="80" subset="Train">{box}</image>'
        f'<image id="1" name="b.png" width="100" height="80" subset="Validation">{box}</image>'
        f'<image id="2" name="test/c.png" width="100" height="80">{box}</image></annotations>')
    report = convert(src, tmp_path / "data")
    assert report.problems == [] and report.split["kept"] == {"train": 1, "val": 1, "test": 1}
    assert report.split["from"] == ["CVAT subsets", "split folders test/"]


def test_cvat_lines_and_points_never_leave_their_image_defect_free(tmp_path):
    src = tmp_path / "cvat"
    write_image(src / "images" / "a.png", (100, 80))
    (src / "annotations.xml").write_text(
        '<annotations><image id="0" name="a.png" width="100" height="80">'
        '<polyline label="broken-weft" points="0,40;99,41"></polyline><points label="hole" points="5,5"></points>'
        "</image></annotations>")
    with pytest.raises(ConvertError, match="no usable"):  # every mark dropped: left out, not trained as clean
        convert(src, tmp_path / "data")
    assert convert(src, tmp_path / "kept", keep_empty=True).negatives == 1  # unless asked for


def test_a_cvat_xml_bomb_is_refused_as_a_problem_naming_the_file(tmp_path):
    src = tmp_path / "cvat"
    write_image(src / "images" / "a.png", (100, 80))
    (src / "annotations.xml").write_text(CVAT)
    entities = "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10 if i else "lol"}">' for i in range(10))
    (src / "bomb.xml").write_text(f'<?xml version="1.0"?><!DOCTYPE annotations [{entities}]>'
                                  "<annotations><meta>&e9;</meta></annotations>")
    report = convert(src, tmp_path / "data", format="cvat", keep_empty=True)
    bomb = [p for p in report.problems if p.file == "bomb.xml"]
    assert len(bomb) == 1 and "malformed XML" in bomb[0].message and "amplification" in bomb[0].message


def test_a_cvat_for_video_file_is_named_and_its_frames_never_train_as_clean(tmp_path):
    """CVAT for video 1.1 keeps its boxes in `<track>`s by frame number: not read, but said so,
    and its frames are no unannotated images that --unlabelled-clean would take for clean."""
    src = tmp_path / "cvat"
    for frame in range(2):
        write_image(src / "images" / f"frame_{frame:06d}.jpg", (100, 80))
    (src / "annotations.xml").write_text(
        '<annotations><version>1.1</version><meta><task><labels><label><name>hole</name></label></labels></task>'
        '</meta>\n<track id="0" label="hole" source="manual">\n'
        '<box frame="0" outside="0" occluded="0" keyframe="1" xtl="10" ytl="10" xbr="30" ybr="30" z_order="0"/>\n'
        '<box frame="1" outside="1" occluded="0" keyframe="1" xtl="10" ytl="10" xbr="30" ybr="30" z_order="0"/>\n'
        "</track></annotations>\n")
    with pytest.raises(ConvertError, match="no usable") as failed:
        convert(src, tmp_path / "data", unlabelled_clean=True)
    video, *frames = failed.value.problems
    assert (video.file, video.line) == ("annotations.xml", 2) and "<track> found" in video.message
    assert "'CVAT for images 1.1'" in video.fix
    assert [p.file for p in frames] == ["images/frame_000000.jpg", "images/frame_000001.jpg"]
    assert all(p.image and "CVAT for video" in p.message for p in frames)


# --- Label Studio ---------------------------------------------------------------------------------

def _ls_box(label: str, x: float, y: float, w: float, h: float) -> dict:
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 200,
            "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                              "rectanglelabels": [label]}}


def test_label_studio_export_reads_percent_boxes_and_names_a_task_without_an_image(tmp_path):
    src = tmp_path / "ls"
    write_image(src / "images" / "a.jpg", (200, 100))
    write_image(src / "frames" / "b.jpg", (200, 100))
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/3/8c2a1b3f-a.jpg"},
         "annotations": [{"was_cancelled": True, "result": []},
                         {"result": [_ls_box("drop", 10, 20, 5, 30), {"type": "choices", "value": {}}]}],
         "predictions": [{"result": [_ls_box("wrinkle", 0, 0, 50, 50)]}]},
        {"id": 2, "data": {"image": "/data/local-files/?d=frames/b.jpg"}, "annotations": [{"result": []}]},
        {"id": 3, "data": {"text": "no picture"}, "annotations": [{"result": []}]},
    ]
    (src / "export.json").write_text(json.dumps(tasks))
    report = convert(src, tmp_path / "data", val_fraction=0)
    assert report.format == "labelstudio" and report.classes == ["drop"]
    (problem,) = report.problems
    assert problem.file == "export.json" and "task 3" in problem.message and "no image" in problem.message
    boxes = _boxes(tmp_path / "data")
    # 10 %, 20 %, 15 %, 50 % of 200 x 100 -> (20, 20, 30, 50) px
    assert boxes == {"a.jpg": "drop<loc_100><loc_200><loc_150><loc_500>", "b.jpg": ""}


@pytest.mark.parametrize("fmt", ["auto", "labelstudio"])
def test_a_label_studio_json_min_export_is_named_with_the_export_to_choose(tmp_path, fmt):
    """JSON-MIN, Label Studio's other JSON export, holds one record per annotation without the
    task's `data`: named as what it is (never silently passed over), with the export to choose."""
    src = tmp_path / "ls"
    write_image(src / "images" / "a.jpg", (200, 100))
    minimal = [{"image": "/data/local-files/?d=images/a.jpg", "id": 1, "annotator": 1, "annotation_id": 4,
                "label": [{"x": 10, "y": 20, "width": 5, "height": 30, "rotation": 0, "rectanglelabels": ["drop"],
                           "original_width": 200, "original_height": 100}], "lead_time": 3.2}]
    (src / "project-1-min.json").write_text(json.dumps(minimal))
    with pytest.raises(ConvertError, match="no usable") as failed:
        convert(src, tmp_path / "data", format=fmt)
    problem = failed.value.problems[0]
    assert problem.file == "project-1-min.json" and "JSON-MIN" in problem.message and "JSON" in problem.fix


def _exif_turned(path: Path, size: tuple[int, int], orientation: int = 6) -> None:
    """A JPEG stored `size` whose EXIF `orientation` shows it turned (6: a quarter, as a phone photo)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path, exif=exif)


def test_boxes_drawn_on_the_upright_picture_of_an_exif_turned_photo_are_named_not_misplaced(tmp_path):
    # Label Studio and CVAT show a phone photo upright by its EXIF orientation; loomlens reads it
    # as stored, so those boxes would land a quarter turn off: the file is named with the fix.
    src = tmp_path / "ls"
    _exif_turned(src / "images" / "turned.jpg", (200, 100))
    write_image(src / "images" / "plain.jpg", (200, 100))
    upright = {**_ls_box("drop", 10, 20, 5, 30), "original_width": 100, "original_height": 200}
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/turned.jpg"}, "annotations": [{"result": [upright]}]},
             {"id": 2, "data": {"image": "/data/upload/1/plain.jpg"},
              "annotations": [{"result": [_ls_box("drop", 10, 20, 5, 30)]}]}]
    (src / "export.json").write_text(json.dumps(tasks))
    report = convert(src, tmp_path / "data", val_fraction=0)
    (problem,) = [p for p in report.problems if p.file == "export.json"]
    assert "task 1" in problem.message and "EXIF orientation (6)" in problem.message
    assert "auto-orient" in problem.fix
    assert set(_boxes(tmp_path / "data")) == {"plain.jpg"}

    voc = tmp_path / "voc"
    _exif_turned(voc / "turned.jpg", (200, 100))
    write_voc(ImageRecord("turned.jpg", 100, 200, [Box("drop", 5, 5, 20, 20)]), voc / "turned.xml", voc)
    write_image(voc / "plain.jpg")
    write_voc(ImageRecord("plain.jpg", 64, 48, []), voc / "plain.xml", voc)
    (problem,) = [p for p in convert(voc, tmp_path / "voc-data", val_fraction=0).problems if "EXIF" in p.message]
    assert problem.file == "turned.xml" and "EXIF orientation (6)" in problem.message


def test_a_photo_exif_turns_half_round_is_kept_and_named_since_its_size_cannot_tell(tmp_path):
    # A 180-degree turn keeps width and height, so nothing else shows that a browser-based tool
    # displayed it the other way up: convert keeps it (LabelImg shows it as stored) and says so.
    voc = tmp_path / "voc"
    _exif_turned(voc / "upside.jpg", (200, 100), orientation=3)
    write_voc(ImageRecord("upside.jpg", 200, 100, [Box("drop", 5, 5, 20, 20)]), voc / "upside.xml", voc)
    write_image(voc / "plain.jpg")
    write_voc(ImageRecord("plain.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]), voc / "plain.xml", voc)
    report = convert(voc, tmp_path / "data", val_fraction=0)
    (problem,) = report.problems
    assert problem.file == "upside.xml" and problem.image is None
    assert "EXIF orientation 3" in problem.message and "turned 180 degrees" in problem.message
    assert "auto-orient" in problem.fix
    assert set(_boxes(tmp_path / "data")) == {"upside.jpg", "plain.jpg"}


def test_label_studio_labels_with_a_rectangle_and_ellipses_are_boxes_and_a_brush_is_named(tmp_path):
    src = tmp_path / "ls"
    write_image(src / "images" / "a.jpg", (200, 100))
    labels = {**_ls_box("drop", 10, 20, 5, 30), "type": "labels"}
    labels["value"] = {**labels["value"], "labels": ["drop"]}
    ellipse = {"type": "ellipselabels", "value": {"x": 50, "y": 50, "radiusX": 5, "radiusY": 10, "rotation": 0,
                                                   "ellipselabels": ["hole"]}}
    brush = {"type": "brushlabels", "value": {"format": "rle", "rle": [1, 2], "brushlabels": ["stain"]}}
    (src / "export.json").write_text(json.dumps(
        [{"id": 1, "data": {"image": "/data/upload/1/a.jpg"}, "annotations": [{"result": [labels, ellipse, brush]}]}]))
    report = convert(src, tmp_path / "data", val_fraction=0)
    (problem,) = report.problems
    assert "a brushlabels result is no labelled box" in problem.message and "RectangleLabels" in problem.fix
    from loomlens.data.labelstudio import read_labelstudio

    (record,) = read_labelstudio(src).records
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in record.boxes] == [
        ("drop", 20, 20, 30, 50), ("hole", 90, 40, 110, 60)]
    assert record.dropped == 1


def test_a_label_studio_box_needs_exactly_one_label(tmp_path):
    """A box drawn before its label was picked has none; one given two would train as the first
    alone: both are dropped and named, and the task's other box converts."""
    src = tmp_path / "ls"
    write_image(src / "images" / "a.jpg", (200, 100))
    unlabelled, doubled = _ls_box("drop", 50, 50, 10, 10), _ls_box("drop", 70, 50, 10, 10)
    unlabelled["value"]["rectanglelabels"], doubled["value"]["rectanglelabels"] = [], ["drop", "wrinkle"]
    tasks = [{"id": 1, "data": {"image": "images/a.jpg"},
              "annotations": [{"result": [_ls_box("drop", 10, 20, 5, 30), unlabelled, doubled]}]}]
    (src / "export.json").write_text(json.dumps(tasks))
    report = convert(src, tmp_path / "data", val_fraction=0)
    assert [p.message.split(": ", 1)[1] for p in report.problems] == [
        "a box with 0 labels []; box dropped", "a box with 2 labels ['drop', 'wrinkle']; box dropped"]
    assert all("exactly one label" in p.fix for p in report.problems)
    assert _boxes(tmp_path / "data") == {"a.jpg": "drop<loc_100><loc_200><loc_150><loc_500>"}


def test_a_label_studio_label_written_as_a_string_is_that_label(tmp_path):
    """`"rectanglelabels": "drop"` (a script's pre-annotation) is the label drop, not 'd'."""
    src = tmp_path / "ls"
    write_image(src / "images" / "a.jpg", (200, 100))
    bare = _ls_box("drop", 10, 20, 5, 30)
    bare["value"]["rectanglelabels"] = "drop"
    (src / "export.json").write_text(json.dumps(
        [{"id": 1, "data": {"image": "images/a.jpg"}, "annotations": [{"result": [bare]}]}]))
    report = convert(src, tmp_path / "data", val_fraction=0)
    assert report.problems == [] and report.classes == ["drop"]
    assert _boxes(tmp_path / "data") == {"a.jpg": "drop<loc_100><loc_200><loc_150><loc_500>"}
