"""`loomlens export --format onnx` on the tiny model: the four parts and the processor files,
checked against torch; `--backend onnx` answers as torch does; a failed check or an existing
folder leaves nothing that looks like an export."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.export import ExportCheckFailed, export_onnx
from loomlens.infer.onnx_runtime import MANIFEST, PARTS

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    result = CliRunner().invoke(app, ["export", "tiny", str(out), "--check-frames", "2"])
    assert result.exit_code == 0, result.output
    assert "check against torch" in result.output and "DIFFERS" not in result.output
    return out


def test_export_writes_the_parts_and_the_processor(exported) -> None:
    for part in PARTS:
        assert (exported / f"{part}.onnx").stat().st_size > 1000
    for name in ("config.json", "generation_config.json", "tokenizer.json", MANIFEST):
        assert (exported / name).is_file(), name
    assert not [p for p in exported.parent.iterdir() if p.name.endswith(".partial")]


def test_onnx_backend_answers_as_torch(exported) -> None:
    from loomlens.predict import Predictor

    frame = Image.new("RGB", (512, 288), (90, 80, 70))
    ImageDraw.Draw(frame).rectangle([200, 100, 260, 150], fill=(250, 250, 250))
    torch_boxes = Predictor(model="tiny", max_boxes=4, precision="fp32").predict([frame])[0].boxes
    onnx = Predictor(model=str(exported), backend="onnx", max_boxes=4)
    assert onnx.info()["backend"] == "onnx" and onnx.precision == "fp32"
    onnx_boxes = onnx.predict([frame])[0].boxes
    assert torch_boxes, "the tiny model finds the bright rectangle"
    assert [b.label for b in onnx_boxes] == [b.label for b in torch_boxes]
    for a, b in zip(torch_boxes, onnx_boxes):
        assert (a.x1, a.y1, a.x2, a.y2) == pytest.approx((b.x1, b.y1, b.x2, b.y2), abs=0.6)
        assert a.score == pytest.approx(b.score, abs=0.01)
    with pytest.raises(ValueError, match="greedily"):
        onnx.loaded.model.generate(onnx.loaded.processor, [frame], ["<OD>"], 8, num_beams=3)


def test_a_failed_check_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ExportCheckFailed, match="Nothing was written"):
        export_onnx(run=None, out=out, frames=1, score_tol=-1.0, log=lambda _: None)  # no answer can pass
    assert list(tmp_path.iterdir()) == []


def test_refusals(exported, tmp_path) -> None:
    runner = CliRunner()
    again = runner.invoke(app, ["export", "tiny", str(exported)])
    assert again.exit_code == 1 and "already exists" in again.output
    assert (exported / MANIFEST).is_file()  # the earlier export is untouched
    assert runner.invoke(app, ["export", "tiny", str(tmp_path / "x"), "--format", "tflite"]).exit_code == 1
    assert "opset" in runner.invoke(app, ["export", "tiny", str(tmp_path / "y"), "--opset", "9"]).output
    from loomlens.predict import Predictor

    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        Predictor(model=str(tmp_path), backend="onnx")
    with pytest.raises(FileNotFoundError, match="--int8"):
        Predictor(model=str(exported), backend="onnx", precision="int8")
