"""Hostile JSONL splits given to training: lines that are not samples, missing or damaged
images, and image paths that lead outside the data. The whole split is checked before the
first training step, and every bad line is named with its file, line and fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from loomlens.data.convert import convert
from loomlens.data.dataset import FlorenceDataset
from loomlens.data.jsonl import SplitError, validate_split

from .conftest import voc_dataset


def _split(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder / "train.jsonl"


def _sample(image: str, **extra) -> str:
    return json.dumps({"prefix": "<OD>", "suffix": "", "image": image, **extra})


def test_a_hostile_split_fails_before_training_naming_every_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")  # outside the data folder
    data = tmp_path / "data"
    jsonl = _split(data, [
        _sample("ok.png"),
        "{not json",
        json.dumps({"prefix": "<OD>", "image": "ok.png"}),
        _sample("../../../../etc/passwd"),
        _sample("../secret.png"),
        _sample(str(tmp_path / "secret.png")),
        _sample("gone.png"),
        _sample("ok.png", width="64"),
        "[1, 2]",
        "",
        _sample("ok.png"),
    ])
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    (data / "bad.png").write_bytes(b"")

    with pytest.raises(SplitError) as caught:
        validate_split(jsonl)
    # A line that is not JSON stops the reading first: nothing else is trusted.
    assert [(p.line, p.message) for p in caught.value.problems] == [(2, "not JSON (Expecting property name "
                                                                        "enclosed in double quotes)")]
    assert f"{jsonl}:2: not JSON" in str(caught.value)

    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(line for line in lines if line != "{not json") + "\n" + _sample("bad.png") + "\n")
    with pytest.raises(SplitError) as caught:
        validate_split(jsonl)
    found = {p.line: p.message for p in caught.value.problems}
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 11]
    assert found[2] == "no 'suffix'"
    assert all("outside the data folder" in found[line] for line in (3, 4, 5))
    assert "not found" in found[6] and "'width' is '64', not a int" == found[7] and "not an object" in found[8]
    assert "bad.png" in found[11]
    assert all(p.fix for p in caught.value.problems)
    assert str(caught.value).startswith(f"8 problem(s) in {jsonl}") and f"{jsonl}:3: image " in str(caught.value)
    # The dataset checks before it tokenises anything, so no model is needed to see it fail.
    with pytest.raises(SplitError, match="outside the data folder"):
        FlorenceDataset(jsonl, processor=None)


def test_an_explicit_root_admits_images_there_and_only_there(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "shared.png")
    jsonl = _split(tmp_path / "data", [_sample("../shared.png")])
    with pytest.raises(SplitError, match="outside the data folder"):
        validate_split(jsonl)
    assert [s["image"] for s in validate_split(jsonl, root=tmp_path)] == ["../shared.png"]


def test_a_converted_folder_may_point_at_its_source_and_nowhere_else(tmp_path):
    src = voc_dataset(tmp_path / "far" / "away" / "src", ["a.jpg", "b.jpg"])
    out = tmp_path / "jsonl"
    convert(src, out, val_fraction=0, flip=True)
    samples = validate_split(out / "train.jsonl")
    assert {s["image"] for s in samples} >= {"../far/away/src/images/a.jpg", "images/flipped_a.jpg"}

    Image.new("RGB", (8, 8)).save(tmp_path / "far" / "other.png")
    with (out / "train.jsonl").open("a") as f:
        f.write(_sample("../far/other.png") + "\n")
    with pytest.raises(SplitError, match=r"train.jsonl:5: image '../far/other.png' leads outside"):
        validate_split(out / "train.jsonl")

    # A summary.json without a source (one convert did not write) admits nothing outside.
    (out / "summary.json").write_text("{}")
    with pytest.raises(SplitError) as caught:
        validate_split(out / "train.jsonl")
    assert len(caught.value.problems) == 3 and "convert the data again" in str(caught.value)


def test_a_moved_data_tree_still_validates(tmp_path):
    src = voc_dataset(tmp_path / "site" / "raw", ["a.jpg"])
    convert(src, tmp_path / "site" / "jsonl", val_fraction=0)
    shutil.move(tmp_path / "site", tmp_path / "elsewhere")
    assert len(validate_split(tmp_path / "elsewhere" / "jsonl" / "train.jsonl")) == 1


def test_a_bomb_in_a_split_is_refused_before_training(tmp_path, bomb_png):
    data = tmp_path / "data"
    shutil.copy(bomb_png, data.mkdir() or data / "bomb.png")
    with pytest.raises(SplitError, match="megapixels"):
        validate_split(_split(data, [_sample("bomb.png")]))


def test_train_on_a_hostile_split_is_a_clear_error_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from loomlens.cli import app

    data = tmp_path / "data"
    _split(data, [_sample("../../../../etc/passwd")])
    (data / "val.jsonl").write_text("")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--max-steps", "1", "progress=false", "tensorboard=false"])
    assert result.exit_code == 1, result.output
    assert f"{data / 'train.jsonl'}:1: image '../../../../etc/passwd' leads outside" in result.output
    assert "Traceback" not in result.output
