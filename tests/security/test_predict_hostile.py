"""`loomlens predict` over hostile inputs (issue #16): one bad file among good ones must cost only
itself, and a run must never empty or half-write a good `predictions.jsonl`."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.predict.files import predict_files


def _good_frame(path, shade: int) -> None:
    Image.new("RGB", (96, 64), (shade, 80, 40)).save(path)


@pytest.fixture()
def mixed(tmp_path):
    """Two good frames, a 0-byte png, a truncated JPEG and a corrupt mp4: the issue's folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    _good_frame(folder / "a_good.png", 30)
    _good_frame(folder / "b_good.jpg", 200)
    (folder / "c_empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG", quality=95)
    (folder / "d_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "e_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return folder


BAD = {"c_empty.png", "d_truncated.jpg", "e_corrupt.mp4"}


def _predict(folder, out, *extra):
    return CliRunner().invoke(app, ["predict", str(folder), "--out", str(out), "--model", "tiny",
                                    "--max-boxes", "2", "--tile", "off", *extra])


def test_bad_files_are_skipped_and_listed_the_good_ones_predicted(mixed, tmp_path):
    pytest.importorskip("cv2")
    out = tmp_path / "out"
    result = _predict(mixed, out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["source"].rsplit("/", 1)[-1] for x in lines) == ["a_good.png", "b_good.jpg"]
    problems = json.loads((out / "problems.json").read_text())
    assert {p["source"].rsplit("/", 1)[-1] for p in problems} == BAD
    for p in problems:  # each message names the file and says what to do
        assert p["source"] in p["error"] and ("re-copy" in p["error"] or "re-encode" in p["error"]), p
    assert "3 input(s) skipped" in result.output and "Traceback" not in result.output
    assert sorted(f.name for f in (out / "drawn").iterdir()) == ["a_good.jpg", "b_good.jpg"]


def test_strict_exits_1_when_anything_was_skipped(mixed, tmp_path):
    pytest.importorskip("cv2")
    result = _predict(mixed, tmp_path / "out", "--strict")
    assert result.exit_code == 1, result.output
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2


def test_a_rerun_that_fails_midway_leaves_the_good_file_intact(mixed, tmp_path):
    from loomlens.predict import Predictor

    out = tmp_path / "out"
    predictor = Predictor(model="tiny", max_boxes=2, batch_size=1)
    predict_files(predictor, [mixed / "a_good.png", mixed / "b_good.jpg"], out, tile="off")
    good = (out / "predictions.jsonl").read_bytes()
    assert len(good.splitlines()) == 2

    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C after the first item

    with pytest.raises(KeyboardInterrupt):
        predict_files(predictor, [mixed / "a_good.png", mixed / "b_good.jpg"], out, tile="off", on_item=interrupted)
    assert (out / "predictions.jsonl").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_a_rerun_where_every_input_is_bad_keeps_the_good_file(mixed, tmp_path):
    out = tmp_path / "out"
    assert _predict(mixed / "a_good.png", out).exit_code == 0
    good = (out / "predictions.jsonl").read_bytes()
    result = _predict(mixed / "c_empty.png", out)
    assert result.exit_code == 1 and "left as it was" in result.output, result.output
    assert (out / "predictions.jsonl").read_bytes() == good
    assert json.loads((out / "problems.json").read_text()) == []  # the good run's own, beside its predictions
    assert "c_empty.png" in result.output  # the refused input is named on the console
