"""convert: tasks, order, flips, negatives, splits, atomic writes."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.convert import ConvertError, assign_splits, caption, convert, flip_image, write_jsonl
from loomlens.data.florence_text import parse_text
from loomlens.data.records import Box, ImageRecord
from loomlens.data.coco import write_coco
from loomlens.data.voc import write_voc

from .conftest import all_samples, read_jsonl, write_image


def _voc(root: Path, records: list[ImageRecord]) -> Path:
    for record in records:
        write_image(root / record.image, (record.width, record.height))
        write_voc(record, root / "annotations" / f"{Path(record.image).stem}.xml", root)
    return root


def _many(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"images/{i:02d}.png", 40, 30, [Box("drop", 2, 3, 10 + i % 5, 12)] if i % 3 else [])
            for i in range(n)]


def test_all_tasks_grouped_in_the_seeds_order(tmp_path, records):
    out = tmp_path / "out"
    convert(_voc(tmp_path / "src", records), out,
            tasks=("caption", "phrase_grounding", "od", "dense_region_caption"), val_fraction=0)
    samples = read_jsonl(out / "train.jsonl")
    tasks = [s["task"] for s in samples]
    assert tasks == sorted(tasks, key=["od", "dense_region_caption", "phrase_grounding", "caption"].index)
    assert tasks.count("od") == 3  # the negative too
    assert tasks.count("dense_region_caption") == 2  # not for the negative
    assert tasks.count("phrase_grounding") == 4  # one per class present in each image
    assert tasks.count("caption") == 3
    grounding = {s["prefix"]: s["suffix"] for s in samples if s["task"] == "phrase_grounding"}
    assert grounding["<CAPTION_TO_PHRASE_GROUNDING>broken-weft"].startswith("broken-weft<loc_")
    assert "drop" not in grounding["<CAPTION_TO_PHRASE_GROUNDING>broken-weft"]
    captions = {s["suffix"] for s in samples if s["task"] == "caption"}
    assert "defect-free woven fabric." in captions
    assert {s["prefix"] for s in samples if s["task"] == "dense_region_caption"} == {"<DENSE_REGION_CAPTION>"}


def test_caption_templates():
    assert caption(["drop", "wrinkle", "drop"]) == "woven fabric with 2 drop defects and 1 wrinkle."
    assert caption([]) == "defect-free woven fabric."
    assert caption(["a", "b", "c"]) == "woven fabric with 1 a, 1 b and 1 c."


def test_interleaved_keeps_each_images_tasks_together(tmp_path, records):
    out = tmp_path / "out"
    convert(_voc(tmp_path / "src", records), out, tasks=("od", "caption"), order="interleaved", val_fraction=0)
    images = [s["image"] for s in read_jsonl(out / "train.jsonl")]
    runs = [images[0]] + [b for a, b in itertools.pairwise(images) if a != b]
    assert len(runs) == len(set(runs)) == 3


def test_negatives_are_kept_as_od_samples_with_an_empty_suffix(tmp_path, records):
    out = tmp_path / "out"
    report = convert(_voc(tmp_path / "src", records), out, val_fraction=0)
    assert report.negatives == 1
    (negative,) = [s for s in all_samples(out) if s["image"].endswith("c.jpg")]
    assert negative["prefix"] == "<OD>" and negative["suffix"] == ""


def test_flips_land_in_their_originals_split_and_mirror_the_boxes(tmp_path):
    src, out = _voc(tmp_path / "src", _many(30)), tmp_path / "out"
    report = convert(src, out, flip=True, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert report.splits["test"]["images"] > 0 and report.splits["val"]["images"] > 0
    for split in ("train", "val", "test"):
        images = {s["image"]: s for s in read_jsonl(out / f"{split}.jsonl")}
        originals = {k for k in images if not k.startswith("images/flipped_")}
        flipped = {k for k in images if k.startswith("images/flipped_")}
        assert {f"images/flipped_{Path(k).name}" for k in originals} == flipped
        for name in originals:
            boxes, _ = parse_text(images[name]["suffix"], 40, 30)
            mirrored, _ = parse_text(images[f"images/flipped_{Path(name).name}"]["suffix"], 40, 30)
            assert [b.label for b in mirrored] == [b.label for b in boxes]
            for box, mirror in zip(boxes, mirrored, strict=True):
                assert abs((40 - mirror.x2) - box.x1) <= 40 / 1000 * 1.01  # within one bin
                assert (mirror.y1, mirror.y2) == (box.y1, box.y2)


def test_flipped_image_file_is_mirrored_and_twice_is_identity(tmp_path):
    image = Image.new("RGB", (5, 3))
    image.putpixel((0, 1), (255, 0, 0))
    image.save(tmp_path / "a.png")
    flip_image(tmp_path / "a.png", tmp_path / "b.png")
    flip_image(tmp_path / "b.png", tmp_path / "c.png")
    assert Image.open(tmp_path / "b.png").getpixel((4, 1)) == (255, 0, 0)
    assert Image.open(tmp_path / "c.png").tobytes() == image.tobytes()


def test_a_replaced_image_gets_a_new_flipped_copy_even_under_an_older_time(tmp_path):
    # unzip, `cp -p` and `rsync -a` give a replaced picture its own, older, modification time.
    src = tmp_path / "src"
    record = ImageRecord("images/a.png", 40, 30, [Box("drop", 2, 3, 10, 12)])
    _voc(src, [record])
    convert(src, tmp_path / "out", flip=True, val_fraction=0)
    flipped = tmp_path / "out" / "images" / "flipped_a.png"
    before = flipped.stat().st_mtime_ns
    Image.new("RGB", (40, 30), (255, 0, 0)).save(src / "images" / "a.png")
    os.utime(src / "images" / "a.png", ns=(0, before - 10**10))
    convert(src, tmp_path / "out", flip=True, val_fraction=0)
    assert Image.open(flipped).getpixel((0, 0)) == (255, 0, 0)


def test_flipped_names_never_collide(tmp_path):
    records = [ImageRecord("x/a.png", 40, 30, []), ImageRecord("y/a.png", 40, 30, [])]
    for record in records:
        write_image(tmp_path / "src" / record.image, (40, 30))
        write_voc(record, tmp_path / "src" / f"{record.image}.xml", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", flip=True, val_fraction=0)
    names = {s["image"] for s in all_samples(tmp_path / "out") if "flipped" in s["image"]}
    assert names == {"images/flipped_x_a.png", "images/flipped_y_a.png"}


def test_a_new_picture_of_a_shared_name_never_takes_another_ones_flipped_copy(tmp_path):
    # Unpacked from one archive, the pictures share a modification time.
    src = tmp_path / "src"
    for folder, colour in (("cam2", (255, 0, 0)), ("cam3", (0, 0, 255))):
        (src / folder).mkdir(parents=True)
        Image.new("RGB", (40, 30), colour).save(src / folder / "x.png")
        write_voc(ImageRecord(f"{folder}/x.png", 40, 30, []), src / folder / "x.xml", src)
        os.utime(src / folder / "x.png", ns=(0, 10**18))
    convert(src, tmp_path / "out", flip=True, val_fraction=0, keep_empty=True)
    (src / "cam1").mkdir()
    Image.new("RGB", (40, 30), (0, 255, 0)).save(src / "cam1" / "x.png")
    write_voc(ImageRecord("cam1/x.png", 40, 30, []), src / "cam1" / "x.xml", src)
    os.utime(src / "cam1" / "x.png", ns=(0, 10**18))
    convert(src, tmp_path / "out", flip=True, val_fraction=0, keep_empty=True)
    flipped = {s["image"] for s in all_samples(tmp_path / "out") if "flipped" in s["image"]}
    assert flipped == {f"images/flipped_cam{i}_x.png" for i in (1, 2, 3)}
    assert Image.open(tmp_path / "out" / "images" / "flipped_cam1_x.png").getpixel((0, 0)) == (0, 255, 0)


def test_split_is_deterministic_grouped_and_sized():
    keys = [f"k{i}" for i in range(100)]
    first = assign_splits(keys, 0.17, 0.1, seed=1)
    assert first == assign_splits(list(reversed(keys)), 0.17, 0.1, seed=1)
    assert first != assign_splits(keys, 0.17, 0.1, seed=2)
    assert sorted(first.values()).count("val") == 17 and sorted(first.values()).count("test") == 10
    assert set(assign_splits(["only"], 0.5, 0.0, 0).values()) == {"train"}  # train keeps one


def test_a_dataset_without_a_split_of_its_own_names_no_source_for_one(tmp_path):
    report = convert(_voc(tmp_path / "src", _many(12)), tmp_path / "out")  # images/ and annotations/: no split
    assert report.split["kept"] == {} and report.split["from"] == []
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["split"]["from"] == []


def test_same_seed_same_files(tmp_path):
    src = _voc(tmp_path / "src", _many(12))
    convert(src, tmp_path / "a", tasks=("od", "caption"), seed=5)
    convert(src, tmp_path / "b", tasks=("od", "caption"), seed=5)
    for name in ("train.jsonl", "val.jsonl", "classes.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_output_inside_the_source_is_not_read_again(tmp_path, records, fmt):
    src = tmp_path / "src"
    if fmt == "voc":
        _voc(src, records)
    else:
        for record in records:
            write_image(src / record.image, (record.width, record.height))
        write_coco(records, src / "annotations.json", sorted({b.label for r in records for b in r.boxes}))
    for _ in range(2):  # the second run sees the first one's summary.json, classes.txt, flips
        report = convert(src, src / "jsonl", flip=True, tasks=("od", "caption"), val_fraction=0)
        assert report.format == fmt and report.problems == [] and report.images == 3
    # Into another folder inside it: the first output's flipped copies are no unannotated images,
    # also when its summary names the source as typed from another working folder.
    summary = json.loads((src / "jsonl" / "summary.json").read_text())
    (src / "jsonl" / "summary.json").write_text(json.dumps({**summary, "source": "elsewhere/src"}))
    report = convert(src, src / "jsonl2", flip=True, tasks=("od",), val_fraction=0)
    assert report.problems == [] and report.images == 3


def test_summary_counts(tmp_path, records):
    out = tmp_path / "out"
    convert(_voc(tmp_path / "src", records), out, tasks=("od", "caption"), val_fraction=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["negatives"] == 1
    assert summary["boxes_per_class"] == {"Broken Weft": 1, "broken-weft": 1, "drop": 1, "wrinkle": 1}
    assert summary["splits"]["train"]["samples_per_task"] == {"od": 3, "caption": 3}
    assert summary["splits"]["train"]["most_boxes"] == max(len(r.boxes) for r in records) > 1  # eval's default
    assert summary["problems"] == []
    assert not (out / "test.jsonl").exists()


def test_bad_arguments_are_user_errors(tmp_path, records):
    src = _voc(tmp_path / "src", records)
    for kwargs in ({"format": "pascal"}, {"tasks": ("od", "segment")}, {"order": "random"},
                   {"val_fraction": 0.6, "test_fraction": 0.5}):
        with pytest.raises(ConvertError):
            convert(src, tmp_path / "out", **kwargs)
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no annotations"):
        convert(tmp_path / "empty", tmp_path / "out")


def test_a_crash_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "train.jsonl"
    target.write_text("old and good\n")

    def samples():
        yield {"prefix": "<OD>", "suffix": ""}
        raise KeyboardInterrupt  # the process dies half-way

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(target, samples())
    assert target.read_text() == "old and good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temporary left behind
