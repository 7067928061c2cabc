"""convert never harms its input or its previous output: an output folder that is (or holds)
the source is refused, a full disk leaves every file whole; and nothing is silently lost or
mislabelled: images without annotation are reported, images whose every box was dropped are
not trained as defect-free."""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from loomlens.data import atomic, convert as convert_module
from loomlens.data.convert import MIN_TRAIN_BOXES, ConvertError, convert
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc
from loomlens.data.yolo import write_classes

from .conftest import all_samples, write_image


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _yolo_with_a_refused_class(root: Path) -> Path:
    """The issue's dataset: class 1 cannot round-trip (an angle bracket), so convert refuses
    its name, and class 2, wrinkle, would move up to id 1 in a rewritten classes.txt."""
    write_classes(root / "classes.txt", ["broken-weft", "bad<name>", "wrinkle"])
    write_image(root / "a.jpg")
    (root / "a.txt").write_text("2 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n")
    return root


@pytest.mark.parametrize("where", ["same", "parent", "parent of parent"])
def test_an_output_that_is_or_holds_the_source_is_refused_and_nothing_is_written(tmp_path, where):
    src = _yolo_with_a_refused_class(tmp_path / "data" / "src")
    out = {"same": src, "parent": src.parent, "parent of parent": tmp_path}[where]
    before = _tree(tmp_path)
    with pytest.raises(ConvertError, match="nothing written") as caught:
        convert(src, out)
    assert "source folder" in str(caught.value) and "-jsonl" in str(caught.value)  # says what to do
    assert _tree(tmp_path) == before
    # Spelt another way (a trailing "/.", or through a symlink) it is the same folder.
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(ConvertError, match="is the source folder"):
        convert(src / ".", tmp_path / "link")
    assert _tree(src) == _tree(tmp_path / "link")


def test_an_output_that_is_a_file_is_refused_and_kept(tmp_path):
    src = _yolo_with_a_refused_class(tmp_path / "src")
    (tmp_path / "out").write_text("notes")
    with pytest.raises(ConvertError, match="is a file, not a folder; nothing written"):
        convert(src, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "notes"


def test_an_output_holding_another_sources_conversion_is_kept(tmp_path):
    """Converting the same source again replaces its output; another source's is refused."""
    first = _yolo_with_a_refused_class(tmp_path / "first")
    second = _yolo_with_a_refused_class(tmp_path / "second")
    convert(first, tmp_path / "out", val_fraction=0)
    before = _tree(tmp_path / "out")
    with pytest.raises(ConvertError, match=r"holds the conversion of .*first.*nothing written"):
        convert(second, tmp_path / "out", val_fraction=0)
    assert _tree(tmp_path / "out") == before
    convert(first, tmp_path / "out", val_fraction=0, flip=True)
    assert _tree(tmp_path / "out") != before


def test_the_source_classes_keep_their_ids_after_a_refused_run(tmp_path):
    src = _yolo_with_a_refused_class(tmp_path / "src")
    with pytest.raises(ConvertError):
        convert(src, src)
    report = convert(src, tmp_path / "out", val_fraction=0)
    (sample,) = all_samples(tmp_path / "out")
    assert "wrinkle<loc_400><loc_400><loc_600><loc_600>" in sample["suffix"]  # id 2 still reads as wrinkle
    assert report.classes == ["broken-weft", "wrinkle"]


def test_an_output_inside_the_source_holding_other_files_is_refused(tmp_path):
    src = tmp_path / "src"
    write_image(src / "images" / "a.jpg")
    write_voc(ImageRecord("images/a.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]), src / "annotations" / "a.xml", src)
    before = _tree(src)
    with pytest.raises(ConvertError, match="holds files that are not a conversion's output"):
        convert(src, src / "annotations")  # its XML would be skipped as input
    assert _tree(src) == before
    # A new folder inside the source is the supported layout; it is skipped on a re-run.
    convert(src, src / "jsonl", flip=True, val_fraction=0)
    report = convert(src, src / "jsonl", flip=True, val_fraction=0)
    assert report.images == 1 and report.problems == []


def test_an_output_holding_another_dataset_is_refused_and_left_as_it_was(tmp_path):
    src = _yolo_with_a_refused_class(tmp_path / "src")
    other = _yolo_with_a_refused_class(tmp_path / "other")  # a user's own YOLO set given as OUT by mistake
    before = _tree(other)
    with pytest.raises(ConvertError, match="holds files that are not a conversion's output.*new or empty folder"):
        convert(src, other)
    assert _tree(other) == before  # its classes.txt keeps its ids
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is fine
    convert(src, tmp_path / "empty", val_fraction=0)
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_a_conversion_stopped_part_way_goes_on_and_is_never_read_as_input(tmp_path, monkeypatch):
    from loomlens.data import convert as module

    src = tmp_path / "src"
    write_image(src / "images" / "a.jpg")
    write_voc(ImageRecord("images/a.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]), src / "annotations" / "a.xml", src)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_items_by_split", killed)  # after the flipped copies, before any summary
    with pytest.raises(KeyboardInterrupt):
        convert(src, src / "jsonl", flip=True, val_fraction=0)
    assert list((src / "jsonl").rglob("*flipped*")) and not (src / "jsonl" / "summary.json").exists()
    with pytest.raises(ConvertError, match="holds the conversion of .*src"):
        convert(tmp_path / "src" / "annotations", src / "jsonl")  # another source is refused
    monkeypatch.undo()
    report = convert(src, tmp_path / "elsewhere", flip=True, val_fraction=0, unlabelled_clean=True)
    assert report.images == 1 and report.negatives == 0  # its copies are no unlabelled input
    assert convert(src, src / "jsonl", flip=True, val_fraction=0).images == 1  # the same command goes on


def test_the_summary_names_its_source_whole_so_another_working_folder_reads_it(tmp_path, monkeypatch):
    src = _yolo_with_a_refused_class(tmp_path / "src")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    convert(Path("src"), Path("out"), val_fraction=0)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["source"] == str(src.resolve())
    monkeypatch.chdir(tmp_path / "a")
    convert(tmp_path / "src", tmp_path / "out", val_fraction=0)  # the same source, named from elsewhere
    other = _yolo_with_a_refused_class(tmp_path / "a" / "src")
    with pytest.raises(ConvertError, match="holds the conversion of"):
        convert(Path("src"), Path("../out"), val_fraction=0)  # `src` here is another dataset
    assert other.exists()


def _voc_image(root: Path, name: str, box: str) -> None:
    write_image(root / f"{name}.jpg")
    (root / f"{name}.xml").write_text(
        f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height></size>"
        f"<object><name>drop</name><bndbox>{box}</bndbox></object></annotation>", encoding="utf-8")


def test_an_image_whose_every_box_was_dropped_is_left_out_unless_kept(tmp_path):
    _voc_image(tmp_path / "src", "good", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    _voc_image(tmp_path / "src", "emptied", "<xmin>30</xmin><ymin>5</ymin><xmax>30</xmax><ymax>20</ymax>")
    report = convert(tmp_path / "src", tmp_path / "out", val_fraction=0)
    assert report.images == 1 and report.negatives == 0
    assert [s["image"] for s in all_samples(tmp_path / "out")] == ["../src/good.jpg"]
    dropped, left_out = report.problems
    assert "no area" in dropped.message
    assert left_out.file == "emptied.xml" and "left out" in left_out.message and "--keep-empty" in left_out.fix

    kept = convert(tmp_path / "src", tmp_path / "kept", val_fraction=0, keep_empty=True)
    assert kept.images == 2 and kept.negatives == 1 and len(kept.problems) == 1
    assert {s["image"]: s["suffix"] for s in all_samples(tmp_path / "kept")}["../src/emptied.jpg"] == ""
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["keep_empty"] is True


def test_an_annotated_negative_is_still_a_negative(tmp_path):
    write_image(tmp_path / "src" / "clean.jpg")
    write_voc(ImageRecord("clean.jpg", 64, 48, []), tmp_path / "src" / "clean.xml", tmp_path / "src")
    _voc_image(tmp_path / "src", "good", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    report = convert(tmp_path / "src", tmp_path / "out", val_fraction=0)
    assert report.images == 2 and report.negatives == 1 and report.problems == []


def test_an_image_a_reader_skipped_is_reported_once_not_again_as_unannotated(tmp_path):
    from loomlens.data.coco import write_coco

    src = tmp_path / "src"
    write_image(src / "good.jpg")
    write_image(src / "resized.jpg", (32, 24))  # the annotation below says 64x48
    records = [ImageRecord("good.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)]),
               ImageRecord("resized.jpg", 64, 48, [Box("drop", 5, 5, 20, 20)])]
    write_coco(records, src / "_annotations.coco.json", ["drop"])
    report = convert(src, tmp_path / "out", val_fraction=0)
    assert report.images == 1
    assert [p.message for p in report.problems if "resized.jpg" in p.message] == \
        [p.message for p in report.problems], report.problems
    assert len(report.problems) == 1 and "32x24" in report.problems[0].message


def test_images_without_an_annotation_are_reported(tmp_path):
    src = tmp_path / "src"
    _voc_image(src, "good", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    write_image(src / "images" / "forgotten.png")
    write_image(src / "unlabelled.JPG")
    report = convert(src, src / "out", flip=True, val_fraction=0)
    assert sorted(p.file for p in report.problems) == ["images/forgotten.png", "unlabelled.JPG"]
    assert all("no usable annotation" in p.message and p.fix for p in report.problems)
    # Its own flipped copies (out inside src) are no unannotated images on a re-run.
    assert len(convert(src, src / "out", flip=True, val_fraction=0).problems) == 2
    with pytest.raises(ConvertError, match="strict"):
        convert(src, tmp_path / "strict", strict=True)


def test_a_frame_name_repeated_in_another_folder_is_still_reported(tmp_path):
    # Two cameras write the same frame names; cam2's 0002 was never labelled. The annotation
    # cam1/0002.xml was read and names cam1's image only, so it excuses nothing in cam2.
    src = tmp_path / "src"
    box = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"
    _voc_image(src / "cam1", "0002", box)
    _voc_image(src / "cam2", "0001", box)
    write_image(src / "cam2" / "0002.jpg")
    report = convert(src, tmp_path / "out", val_fraction=0)
    assert [(p.file, "no usable annotation" in p.message) for p in report.problems] == [("cam2/0002.jpg", True)]


def _disk_full_at(name: str):
    """`atomic.atomic_group` whose write of the file called `name` fills the disk part-way."""

    @contextmanager
    def group():
        with atomic.atomic_group() as opener:
            @contextmanager
            def one(path, *args, **kwargs):
                with opener(path, *args, **kwargs) as f:
                    if Path(path).name == name:
                        f.write("x" * 10)
                        raise OSError(errno.ENOSPC, "No space left on device", str(path))
                    yield f
            yield one
    return group


def test_a_full_disk_is_a_clear_error_and_the_previous_output_stays_whole(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _voc_image(src, "good", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    _voc_image(src, "other", "<xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>20</ymax>")
    out = tmp_path / "out"
    convert(src, out, val_fraction=0.5)
    before = _tree(out)
    monkeypatch.setattr(convert_module, "atomic_group", _disk_full_at("train.jsonl"))
    with pytest.raises(ConvertError) as caught:
        convert(src, out, val_fraction=0.5, seed=1, tasks=("od", "caption"))
    message = str(caught.value)
    assert message.startswith(f"the disk is full while writing {out / 'train.jsonl'}")
    assert "intact" in message and "free some space" in message
    assert _tree(out) == before  # the old files whole, no temporaries left


def test_a_write_that_fails_part_way_through_the_outputs_leaves_every_one_old(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name in ("good", "other", "third", "fourth"):
        _voc_image(src, name, "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    out = tmp_path / "out"
    convert(src, out, val_fraction=0.5)
    before = _tree(out)
    monkeypatch.setattr(convert_module, "atomic_group", _disk_full_at("val.jsonl"))  # after train.jsonl
    with pytest.raises(ConvertError, match="the disk is full while writing .*val.jsonl"):
        convert(src, out, val_fraction=0.5, seed=1)  # another split: train.jsonl would differ
    assert _tree(out) == before  # train.jsonl too is the old one, beside the old val.jsonl and summary


def test_another_write_error_names_the_file_and_the_fix(tmp_path, monkeypatch):
    _voc_image(tmp_path / "src", "good", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")

    def read_only(image, path, fmt):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(convert_module, "atomic_save_image", read_only)
    with pytest.raises(ConvertError, match=r"cannot write \(Permission denied\) while writing .*flipped_good.jpg"
                                           r".*permissions"):
        convert(tmp_path / "src", tmp_path / "out", flip=True, val_fraction=0)


def test_a_train_split_without_defects_is_reported(tmp_path):
    # An anomaly-detection layout: good frames in train/, the labelled defects in test/ only.
    src = tmp_path / "src"
    box = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"
    for i in range(3):
        _voc_image(src / "test", f"d{i}", box)
        write_image(src / "train" / f"g{i}.jpg")
        (src / "train" / f"g{i}.xml").write_text(f"<annotation><filename>g{i}.jpg</filename></annotation>")
    report = convert(src, tmp_path / "out", val_fraction=0)
    assert [p.message for p in report.problems] == ["the train split holds no defect box at all; training would "
                                                    "learn only 'no defect'"]
    assert "--resplit" in report.problems[0].fix
    assert convert(src, tmp_path / "again", val_fraction=0, resplit=True).problems == []


def test_a_class_missing_from_the_train_split_is_named(tmp_path):
    src = tmp_path / "src"
    box = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"
    for i in range(3):
        _voc_image(src / "train", f"d{i}", box)
    _voc_image(src / "valid", "rare", box.replace("5", "6"))
    (src / "valid" / "rare.xml").write_text((src / "valid" / "rare.xml").read_text().replace("drop", "knot"))
    report = convert(src, tmp_path / "out")
    assert [str(p) for p in report.problems] == [
        ".: class 'knot' has no box in the train split (1 in val); training cannot learn it (pass --resplit to draw "
        "the splits from all images, or move some of its images into the train split)"]


def test_a_class_with_few_training_boxes_is_counted_from_the_frames_not_their_mirrors(tmp_path):
    # A split's table counts mirrors and tiles; a class's learnability is its own boxes.
    src = tmp_path / "src"
    box = "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>"
    for i in range(MIN_TRAIN_BOXES):
        _voc_image(src / "train", f"d{i}", box)
    for i in range(3):
        _voc_image(src / "train", f"k{i}", box)
        (src / "train" / f"k{i}.xml").write_text((src / "train" / f"k{i}.xml").read_text().replace("drop", "knot"))
    _voc_image(src / "valid", "v", box)
    report = convert(src, tmp_path / "out", flip=True)
    assert report.thin_classes == {"knot": 3}  # `drop`, at the threshold, is not named
    assert report.splits["train"]["boxes_per_class"]["knot"] == 6  # the mirrors counted there
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["thin_classes"] == {"knot": 3}
    assert report.problems == []  # advice, not a problem: --strict does not fail on it


def test_unlabelled_frames_can_be_kept_as_defect_free(tmp_path):
    # A plant's folder of good frames has no label files; --unlabelled-clean says so.
    src = tmp_path / "src"
    _voc_image(src / "ng", "d", "<xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax>")
    write_image(src / "ok" / "g1.jpg")
    write_image(src / "ok" / "g2.png", (40, 30))
    (src / "ok" / "broken.jpg").write_bytes(b"not a picture")
    left_out = convert(src, tmp_path / "out", val_fraction=0)
    assert left_out.images == 1 and "--unlabelled-clean" in left_out.problems[0].fix
    report = convert(src, tmp_path / "clean", val_fraction=0, unlabelled_clean=True)
    assert (report.images, report.negatives, report.unlabelled_clean) == (3, 2, True)
    assert [p.file for p in report.problems] == ["ok/broken.jpg"]
    samples = {s["image"]: s for s in all_samples(tmp_path / "clean")}
    assert samples["../src/ok/g2.png"]["suffix"] == "" and samples["../src/ok/g2.png"]["width"] == 40


def test_a_conversion_refused_before_writing_leaves_no_mark_and_hidden_files_are_no_contents(tmp_path):
    src = _yolo_with_a_refused_class(tmp_path / "src")
    with pytest.raises(ConvertError, match="--group-by"):
        convert(src, tmp_path / "out", group_by="regex:(")
    assert not (tmp_path / "out").exists()
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "a.xml").write_text("<annotation><filename>gone.jpg</filename></annotation>")
    with pytest.raises(ConvertError, match="no usable annotated images"):
        convert(tmp_path / "gone", tmp_path / "out")  # nothing to convert: made, then taken back
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    for hidden in (".DS_Store", "Thumbs.db", "desktop.ini"):  # what macOS and Windows leave by themselves
        (tmp_path / "kept" / hidden).write_bytes(b"")
    convert(src, tmp_path / "kept", val_fraction=0)  # a folder with hidden files only is empty enough
    assert (tmp_path / "kept" / "summary.json").is_file()


def test_a_group_write_whose_rename_is_refused_leaves_no_temporary(tmp_path):
    (tmp_path / "b.txt").mkdir()  # a folder where a file goes
    with pytest.raises(OSError), atomic.atomic_group() as opener:
        for name in ("a.txt", "b.txt"):
            with opener(tmp_path / name) as f:
                f.write(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no .tmp left
