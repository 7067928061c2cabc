"""Hostile images given to convert: decompression bombs and damaged files. Each is reported
with its annotation file and a fix, and skipped; it never aborts the conversion, and under
--strict it fails it before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.convert import ConvertError, convert
from loomlens.data.dataset import read_jsonl
from loomlens.data.jsonl import validate_split
from loomlens.data.records import Box, ImageRecord
from loomlens.data.voc import write_voc

from .conftest import one_colour_png, voc_dataset


def _annotate(root: Path, image: Path, size: tuple[int, int]) -> None:
    """Put `image` into the dataset at `root` with a one-box annotation declaring `size`."""
    shutil.copy(image, root / "images" / image.name)
    write_voc(ImageRecord(f"images/{image.name}", *size, [Box("drop", 5, 5, 20, 20)]),
              root / "annotations" / f"{image.stem}.xml", root)


def test_a_decompression_bomb_is_a_problem_not_an_abort(tmp_path, bomb_png):
    src = voc_dataset(tmp_path / "src", ["a.jpg", "b.jpg"])
    _annotate(src, bomb_png, (30000, 30000))
    report = convert(src, tmp_path / "out", val_fraction=0)
    (problem,) = report.problems
    assert problem.file == "annotations/bomb.xml" and "megapixels" in problem.message and problem.fix
    assert report.images == 2
    assert "bomb" not in (tmp_path / "out" / "train.jsonl").read_text()

    with pytest.raises(ConvertError, match="strict") as caught:
        convert(src, tmp_path / "strict", strict=True)
    assert "megapixels" in str(caught.value.problems[0])
    assert not (tmp_path / "strict").exists()


def test_an_image_in_pils_warning_band_is_refused_the_same_way(tmp_path, monkeypatch):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes; refused all the same.
    src = voc_dataset(tmp_path / "src", ["a.jpg"])
    Image.new("RGB", (100, 80)).save(tmp_path / "big.jpg")
    _annotate(src, tmp_path / "big.jpg", (100, 80))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # big.jpg: 8000 pixels, under twice that
    report = convert(src, tmp_path / "out", val_fraction=0)
    (problem,) = report.problems
    assert problem.file == "annotations/big.xml" and "over the limit of 0 megapixels" in problem.message
    assert report.images == 1


@pytest.mark.parametrize(("name", "damage"), [
    ("empty.jpg", lambda data: b""),
    ("truncated.jpg", lambda data: data[: len(data) // 2]),
    ("garbage.jpg", lambda data: b"\x00garbage, not an image" * 40),
])
def test_a_damaged_image_is_reported_and_skipped(tmp_path, name, damage):
    src = voc_dataset(tmp_path / "src", ["a.jpg", "b.jpg", name])
    noisy = src / "images" / name
    Image.effect_noise((640, 480), 60).convert("RGB").save(noisy)  # enough bytes that half is no image
    noisy.write_bytes(damage(noisy.read_bytes()))
    for flip in (False, True):
        out = tmp_path / f"out-{flip}"
        report = convert(src, out, val_fraction=0, flip=flip)
        (problem,) = report.problems
        assert problem.file == f"annotations/{Path(name).stem}.xml" and name in problem.message and problem.fix
        assert report.images == 2
        samples = read_jsonl(out / "train.jsonl")
        assert len(samples) == 2 * (1 + flip) and not [s for s in samples if name in s["image"]]
        validate_split(out / "train.jsonl")  # whatever convert writes, training can read

    with pytest.raises(ConvertError, match="nothing written"):
        convert(src, tmp_path / "strict", flip=True, tile=32, strict=True)
    assert not (tmp_path / "strict").exists()  # no flipped copy or tile either


def test_the_png_maker_makes_a_real_png(tmp_path):
    (tmp_path / "p.png").write_bytes(one_colour_png(5, 3))
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (5, 3) and im.getextrema() == (0, 0)


def test_a_real_frame_over_the_limit_converts_once_the_limit_is_raised(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from loomlens.cli import app
    from loomlens.predict.sources import read_image

    src = voc_dataset(tmp_path / "src", ["a.jpg"])
    Image.new("RGB", (200, 100)).save(tmp_path / "big.jpg")
    _annotate(src, tmp_path / "big.jpg", (200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # big.jpg: 20,000 pixels, past twice that: PIL's error
    (problem,) = convert(src, tmp_path / "refused", val_fraction=0).problems
    assert "set LOOMLENS_MAX_MEGAPIXELS above its size" in problem.message and "LOOMLENS_MAX_MEGAPIXELS" in problem.fix
    with pytest.raises(ValueError, match="big.jpg is over the limit .* set LOOMLENS_MAX_MEGAPIXELS"):
        read_image(src / "images" / "big.jpg")  # predict's reader says the same
    command = ["convert", str(src), str(tmp_path / "out"), "--val-fraction", "0"]
    result = CliRunner().invoke(app, command, env={"LOOMLENS_MAX_MEGAPIXELS": "0.03"})  # 30,000 pixels
    assert result.exit_code == 0, result.output
    assert "big.jpg" in (tmp_path / "out" / "train.jsonl").read_text()
    result = CliRunner().invoke(app, command, env={"LOOMLENS_MAX_MEGAPIXELS": "lots"})
    assert result.exit_code == 1 and "must be a positive number of megapixels" in result.output
