"""Group-aware splits keep look-alike frames (one video, roll or burst) on one side, and a
converted folder made with --copy-images / --link-images can be moved on its own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from loomlens.data.convert import ConvertError, convert
from loomlens.data.jsonl import SplitError, validate_split
from loomlens.data.records import Box, ImageRecord
from loomlens.data.splits import assign_splits, group_keys
from loomlens.data.voc import write_voc

from .conftest import read_jsonl, write_image


def _voc(root: Path, images: list[str]) -> Path:
    for image in images:
        write_image(root / image)
        write_voc(ImageRecord(image, 64, 48, [Box("drop", 5, 5, 20, 20)]), root / f"{image}.xml", root)
    return root


def _split_of(out: Path) -> dict[str, str]:
    """Image path inside the source -> its split."""
    return {s["image"].split("src/", 1)[-1]: name for name in ("train", "val", "test")
            if (out / f"{name}.jsonl").exists() for s in read_jsonl(out / f"{name}.jsonl")}


def _sides(split_of: dict[str, str], group: str) -> set[str]:
    return {split for image, split in split_of.items() if group in image}


def test_assign_splits_keeps_each_group_whole_and_train_never_empty():
    keys = [f"roll{r}/f{i}" for r in range(6) for i in range(5)]
    groups = {k: k.split("/")[0] for k in keys}
    split = assign_splits(keys, 0.2, 0.2, seed=4, groups=groups)
    for roll in {g for g in groups.values()}:
        assert len({split[k] for k in keys if groups[k] == roll}) == 1
    assert {"train", "val", "test"} == set(split.values())
    assert set(assign_splits(["a", "b"], 0.5, 0.0, 0, groups={"a": "g", "b": "g"}).values()) == {"train"}


def test_group_by_folder_keeps_each_roll_in_one_split_and_summary_records_the_groups(tmp_path):
    src = _voc(tmp_path / "src", [f"roll{r}/frame{i}.jpg" for r in range(5) for i in range(4)])
    ungrouped = [convert(src, tmp_path / f"plain{seed}", val_fraction=0.3, seed=seed) for seed in range(3)]
    assert any(len(_sides(_split_of(tmp_path / f"plain{seed}"), f"roll{r}/")) > 1
               for seed in range(3) for r in range(5)), "without groups the rolls straddle splits"
    report = convert(src, tmp_path / "out", val_fraction=0.3, group_by="folder")
    split_of = _split_of(tmp_path / "out")
    assert all(len(_sides(split_of, f"roll{r}/")) == 1 for r in range(5))
    assert {s for s in split_of.values()} == {"train", "val"}
    assert report.split["groups"]["roll0"]["images"] == 4 and ungrouped[0].split["groups"] == {}


def test_group_by_regex_and_time_bursts(tmp_path):
    names = [f"cam_{day}_{t}.jpg" for day, t in (("20240101", "080000"), ("20240101", "080001"),
                                                  ("20240101", "080003"), ("20240101", "120000"),
                                                  ("20240101", "120002"), ("20240102", "090000"))]
    src = _voc(tmp_path / "src", names)
    report = convert(src, tmp_path / "time", val_fraction=0.4, group_by="time:5")
    assert len(report.split["groups"]) == 3 and sorted(g["images"] for g in report.split["groups"].values()) == [1, 2, 3]
    split_of = _split_of(tmp_path / "time")
    assert len({split_of[n] for n in names[:3]}) == 1 and len({split_of[n] for n in names[3:5]}) == 1

    by_day = convert(src, tmp_path / "regex", val_fraction=0.4, group_by=r"regex:cam_(\d{8})")
    assert set(by_day.split["groups"]) == {"20240101", "20240102"}
    with pytest.raises(ConvertError, match="group-by"):
        convert(src, tmp_path / "bad", group_by="day")


def test_frames_loomlens_saved_from_one_video_stay_together_by_default(tmp_path):
    src = _voc(tmp_path / "src", [f"line{v}_f{i:06d}.jpg" for v in range(4) for i in range(0, 30, 10)])
    report = convert(src, tmp_path / "out", val_fraction=0.3)
    split_of = _split_of(tmp_path / "out")
    assert all(len(_sides(split_of, f"line{v}_")) == 1 for v in range(4))
    assert set(report.split["groups"]) == {f"video:line{v}" for v in range(4)}


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_a_folder_converted_with_its_images_can_be_moved(tmp_path, mode):
    src = _voc(tmp_path / "src", ["a/x.jpg", "b/x.jpg", "c.jpg"])
    report = convert(src, tmp_path / "out", val_fraction=0, images=mode)
    assert report.source_root == "." and report.images_mode == mode
    if mode == "link":
        assert os.stat(tmp_path / "out" / "images" / "originals" / "c.jpg").st_ino == os.stat(src / "c.jpg").st_ino
    shutil.move(tmp_path / "out", tmp_path / "elsewhere")
    shutil.rmtree(src)
    samples = validate_split(tmp_path / "elsewhere" / "train.jsonl")
    assert sorted(s["image"] for s in samples) == ["images/originals/a_x.jpg", "images/originals/b_x.jpg",
                                                    "images/originals/c.jpg"]


def test_one_large_group_does_not_swell_val_and_one_group_is_a_problem(tmp_path):
    keys = [f"big/f{i}" for i in range(10)] + [f"mid/f{i}" for i in range(10)] + [f"small/f{i}" for i in range(4)]
    groups = {k: k.split("/")[0] for k in keys}
    for seed in range(6):  # 17 % of 24 is 4 images: the small roll, whichever order the rolls were drawn in
        split = assign_splits(keys, 0.17, 0.0, seed=seed, groups=groups)
        assert sorted(k for k, s in split.items() if s == "val") == [f"small/f{i}" for i in range(4)]
    # Every group larger than the share: the smallest one, not the first drawn.
    split = assign_splits(keys[:20] + ["tiny/f0", "tiny/f1"], 0.05, 0.0, seed=0, groups={**groups, "tiny/f0": "tiny",
                                                                                           "tiny/f1": "tiny"})
    assert sorted(k for k, s in split.items() if s == "val") == ["tiny/f0", "tiny/f1"]
    src = _voc(tmp_path / "src", [f"roll/frame{i}.jpg" for i in range(6)])
    report = convert(src, tmp_path / "out", val_fraction=0.3, test_fraction=0.2, group_by="folder")
    assert [p.message for p in report.problems] == [
        f"--group-by folder made 1 group(s), and whole groups left the {split} split empty" for split in ("val", "test")]
    assert "leave --group-by out" in report.problems[0].fix


def test_a_held_out_split_of_defect_free_images_only_is_a_problem(tmp_path):
    src = tmp_path / "src"
    for i in range(8):  # two defective frames, six good ones
        write_image(src / f"f{i}.jpg")
        boxes = [Box("drop", 5, 5, 20, 20)] if i < 2 else []
        write_voc(ImageRecord(f"f{i}.jpg", 64, 48, boxes), src / f"f{i}.xml", src)
    seen = set()
    for seed in range(6):
        report = convert(src, tmp_path / f"out{seed}", val_fraction=0.25, test_fraction=0.0, seed=seed)
        val = _split_of(tmp_path / f"out{seed}")
        judged = any(split == "val" and int(image[1]) < 2 for image, split in val.items())
        gaps = [p for p in report.problems if "holds no defect box" in p.message]
        assert len(gaps) == (not judged), (seed, val)
        assert all("raise --val-fraction" in p.fix for p in gaps)
        seen.add(judged)
    assert seen == {True, False}  # both cases met


def test_roboflow_copies_of_one_picture_stay_in_one_split(tmp_path):
    # A train-only Roboflow export with 3 augmented copies of each of 6 source pictures.
    images = [f"frame{i:03d}_jpg.rf.{h}{i:02d}{'0' * 28}.jpg" for i in range(6) for h in ("ab", "cd", "ef")]
    src = _voc(tmp_path / "src", images)
    for seed in range(3):
        convert(src, tmp_path / f"out{seed}", val_fraction=0.34, seed=seed)
        split_of = _split_of(tmp_path / f"out{seed}")
        for i in range(6):
            assert len(_sides(split_of, f"frame{i:03d}_jpg.rf.")) == 1, (seed, i)
        assert set(split_of.values()) == {"train", "val"}


def test_a_regex_group_that_takes_no_part_in_the_match_groups_by_the_match():
    records = [ImageRecord(name, 64, 48, []) for name in ("cam1/a.jpg", "cam2/b.jpg", "other/c.jpg")]
    assert group_keys(records, Path("."), r"regex:(cam\d)?/") == {"cam1/a.jpg": "cam1", "cam2/b.jpg": "cam2",
                                                                  "other/c.jpg": "/"}


def test_a_split_whose_od_boxes_do_not_parse_is_refused_with_file_and_line(tmp_path):
    """The check training's datasets and `eval` share: a hand-edited `drop<loc_10><loc_20>` would
    train and score its frame as holding no defect."""
    import json

    from PIL import Image

    from loomlens.data.jsonl import SplitError

    Image.new("RGB", (64, 32)).save(tmp_path / "a.png")
    good = {"image": "a.png", "prefix": "<OD>", "suffix": "drop<loc_1><loc_2><loc_30><loc_40>", "width": 64,
            "height": 32}
    caption = {**good, "prefix": "<CAPTION>", "suffix": "a loom<loc_1>"}  # not boxes: not parsed as boxes
    torn = {**good, "suffix": "drop<loc_10><loc_20>"}
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(s) + "\n" for s in (good, caption, torn)))
    with pytest.raises(SplitError) as caught:
        validate_split(tmp_path / "val.jsonl")
    assert [(p.line, p.message) for p in caught.value.problems] == [
        (3, "the true boxes 'drop<loc_10><loc_20>' hold 1 part that is no box")]


def test_a_folder_converted_without_its_images_and_moved_is_told_how_to_make_one_that_can_be_moved(tmp_path):
    # "image not found (restore the image, or convert the data again)" left out the way to a
    # folder that survives a move.
    src = _voc(tmp_path / "src", ["a.jpg", "b.jpg"])
    convert(src, tmp_path / "out", val_fraction=0)
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "out", tmp_path / "moved" / "out")
    with pytest.raises(SplitError) as caught:
        validate_split(tmp_path / "moved" / "out" / "train.jsonl")
    assert all("not found" in p.message and "`loomlens convert --copy-images` makes one that holds its images and "
               "can be moved" in p.fix for p in caught.value.problems), caught.value
    convert(src, tmp_path / "copied", val_fraction=0, images="copy")
    (tmp_path / "copied" / "images" / "originals" / "a.jpg").unlink()  # its own copy gone: moving is no cure
    with pytest.raises(SplitError) as caught:
        validate_split(tmp_path / "copied" / "train.jsonl")
    (problem,) = caught.value.problems
    assert "not found" in problem.message and problem.fix == "restore the image, or convert the data again"
