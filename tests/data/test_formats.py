"""Every annotation format round-trips: annotation -> JSONL -> parse_text, within half a bin;
and the seed's example line comes out of an equivalent LabelImg file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loomlens.data.coco import read_coco, write_coco
from loomlens.data.convert import convert
from loomlens.data.florence_text import parse_text, quantize
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import read_voc, write_voc
from loomlens.data.yolo import read_yolo, write_classes, write_yolo

from .conftest import NO_DEFECT, all_samples, write_image


def _write(fmt: str, root: Path, records: list[ImageRecord]) -> list[str]:
    """Write `records` and their images under `root` in `fmt`; return the class list."""
    classes = sorted({b.label for r in records for b in r.boxes})
    for record in records:
        write_image(root / record.image, (record.width, record.height))
        stem = Path(record.image).stem
        if fmt == "voc":
            write_voc(record, root / "annotations" / f"{stem}.xml", root)
        elif fmt == "yolo":
            write_yolo(record, root / "labels" / f"{stem}.txt", classes)
    if fmt == "yolo":
        write_classes(root / "classes.txt", classes)
    if fmt == "coco":
        write_coco(records, root / "annotations.json", classes)
    return classes


def _matches(original: list[Box], parsed: list[Box], width: int, height: int) -> bool:
    """Same labels, every coordinate within half a bin (greedy one-to-one)."""
    left = list(parsed)
    for box in original:
        for other in left:
            if other.label == box.label and all(
                abs(a - b) <= 0.5 * size / 1000 + 1e-9
                for a, b, size in ((box.x1, other.x1, width), (box.x2, other.x2, width),
                                   (box.y1, other.y1, height), (box.y2, other.y2, height))
            ):
                left.remove(other)
                break
        else:
            return False
    return not left


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_reader_gives_back_what_the_writer_wrote(tmp_path, records, fmt):
    classes = _write(fmt, tmp_path, records)
    read = {"voc": read_voc, "yolo": read_yolo, "coco": read_coco}[fmt](tmp_path)
    assert read.problems == []
    assert sorted(r.image for r in read.records) == sorted(r.image for r in records)
    if fmt != "voc":
        assert read.classes == classes
    by_image = {r.image: r for r in read.records}
    for record in records:
        back = by_image[record.image]
        assert (back.width, back.height) == (record.width, record.height)
        assert len(back.boxes) == len(record.boxes)
        for a, b in zip(sorted(back.boxes, key=lambda b: b.label), sorted(record.boxes, key=lambda b: b.label),
                        strict=True):
            assert a.label == b.label
            assert (a.x1, a.y1, a.x2, a.y2) == pytest.approx((b.x1, b.y1, b.x2, b.y2), abs=1e-3)


@pytest.mark.parametrize("fmt", ["voc", "yolo", "coco"])
def test_annotation_to_jsonl_to_parse_text_is_within_half_a_bin(tmp_path, records, fmt):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(fmt, src, records)
    report = convert(src, out, format="auto", tasks=("od",), val_fraction=0.34, seed=4)
    assert report.format == fmt and report.images == 3
    assert [p.message[:len(NO_DEFECT)] for p in report.problems] == [NO_DEFECT]  # c.jpg is val
    samples = all_samples(out)
    assert len(samples) == 3
    for record in records:
        (sample,) = [s for s in samples if s["image"] == f"../src/{record.image}"]
        assert (sample["width"], sample["height"], sample["task"]) == (record.width, record.height, "od")
        assert (out / sample["image"]).is_file()  # relative to the JSONL file
        parsed, dropped = parse_text(sample["suffix"], sample["width"], sample["height"])
        assert dropped == 0
        assert _matches(record.boxes, parsed, record.width, record.height)


def test_the_seeds_example_line_from_an_equivalent_labelimg_file(tmp_path):
    # Integer pixels (as LabelImg writes them) on the seed's 2560x1440 frames.
    # x: 1874/2560*1000 = 732.03 -> 732 and 1915/2560*1000 = 748.05 -> 748;
    # y:  693/1440*1000 = 481.25 -> 481 and  722/1440*1000 = 501.39 -> 501.
    write_image(tmp_path / "0 (1).jpg", (2560, 1440))
    write_voc(ImageRecord("0 (1).jpg", 2560, 1440, [Box("drop", 1874, 693, 1915, 722)]),
              tmp_path / "0 (1).xml", tmp_path)
    out = tmp_path / "jsonl"  # the seed wrote beside the images; convert refuses that (it clobbers classes.txt)
    convert(tmp_path, out, flip=True, val_fraction=0)
    lines = (out / "train.jsonl").read_text().splitlines()
    original = json.loads(next(line for line in lines if '"image":"../0 (1).jpg"' in line))
    assert {k: original[k] for k in ("prefix", "suffix", "image")} == {
        "prefix": "<OD>", "suffix": "drop<loc_732><loc_481><loc_748><loc_501>", "image": "../0 (1).jpg"}
    assert lines[0].startswith('{"prefix":"<OD>","suffix":"drop<loc_')  # compact, key order kept

    # The seed's flipped line says drop<loc_252><loc_481><loc_268><loc_501>, i.e. 1000 - x2 and
    # 1000 - x1 on the grid. Flipping in pixels (x1' = W - x2) and quantising with floor gives
    # floor(1000 - 1000 x2/W) = 1000 - ceil(1000 x2/W): that equals 1000 - 748 only if 1000 x2/W
    # is a whole number, i.e. x2 = 1914.88 and x1 = 1873.92 exactly, which no integer pixel is
    # (and in floating point 2560 - 1914.88 even lands a hair below the bin edge). So no pixel
    # pair gives both lines exactly; each flipped x is one bin lower: 251 and 267.
    flipped = json.loads(next(line for line in lines if "flipped_0 (1).jpg" in line))
    assert flipped["image"] == "images/flipped_0 (1).jpg" and (out / flipped["image"]).is_file()
    (box,), _ = parse_text(flipped["suffix"], 2560, 1440)
    bins = [quantize(box.x1, 2560), quantize(box.y1, 1440), quantize(box.x2, 2560), quantize(box.y2, 1440)]
    assert box.label == "drop"
    assert all(abs(a - b) <= 1 for a, b in zip(bins, [252, 481, 268, 501], strict=True))
    assert bins[1::2] == [481, 501]  # y is untouched by a horizontal flip
    assert flipped["suffix"] == "drop<loc_251><loc_481><loc_267><loc_501>"


@pytest.mark.parametrize("name", ["wrinkle", "drop", "broken-weft", "Broken Weft", "hole 2"])
def test_class_names_survive_annotation_to_jsonl_to_parse(tmp_path, name):
    write_image(tmp_path / "src" / "a.jpg")
    write_voc(ImageRecord("a.jpg", 64, 48, [Box(name, 5, 5, 30, 20)]), tmp_path / "src" / "a.xml", tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", tasks=("od", "phrase_grounding"), val_fraction=0)
    assert report.classes == [name]
    assert (tmp_path / "out" / "classes.txt").read_text() == f"{name}\n"
    od, grounding = all_samples(tmp_path / "out")
    assert grounding["prefix"] == f"<CAPTION_TO_PHRASE_GROUNDING>{name}"
    for sample in (od, grounding):
        (box,), dropped = parse_text(sample["suffix"], 64, 48)
        assert dropped == 0 and box.label == name
