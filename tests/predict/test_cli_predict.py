"""`loomlens predict` on a folder with the tiny model."""

import json

from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app


def test_predict_command_on_a_folder(tmp_path):
    for i in range(2):
        Image.new("RGB", (96, 64), (i * 100, 50, 50)).save(tmp_path / f"im{i}.png")
    (tmp_path / "rules.yaml").write_text("min_score: 0.5\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "*.png"), "--out", str(out), "--model", "tiny",
                                      "--max-boxes", "2", "--coco", "--regions", str(tmp_path / "rules.yaml")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["source"].endswith(f"im{i}.png") for i, x in enumerate(lines)] == [True, True]
    assert all(b["score"] >= 0.5 for x in lines for b in x["boxes"])
    assert (out / "coco_results.json").exists() and (out / "regions.yaml").exists()
    assert len(list((out / "drawn").iterdir())) == 2


def test_predict_command_rejects_missing_input(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nothing.png"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no such file" in result.output


def test_predict_and_serve_refuse_an_unknown_precision_clearly(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    for command in (["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out")], ["serve", "--no-page"]):
        result = CliRunner().invoke(app, [*command, "--precision", "int4"])
        assert result.exit_code == 1 and "precision must be one of" in result.output, result.output
