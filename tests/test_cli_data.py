"""`loomlens synth` then `loomlens convert`, through the real CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loomlens.cli import _expand_key_value_args, app

runner = CliRunner()


def test_synth_then_convert_prints_a_summary_and_writes_the_files(tmp_path):
    data, out = tmp_path / "loom", tmp_path / "jsonl"
    made = runner.invoke(app, _expand_key_value_args(["synth", str(data), "images=6", "seed=2", "size=256x144"]))
    assert made.exit_code == 0, made.output
    assert "6 frames 256x144" in made.output and "defect-free" in made.output
    assert len(list((data / "images").glob("*.jpg"))) == 6 and len(list((data / "annotations").glob("*.xml"))) == 6

    converted = runner.invoke(app, ["convert", str(data), str(out), "--flip", "--tasks", "od,caption",
                                    "--val-fraction", "0.34"])
    assert converted.exit_code == 0, converted.output
    assert "train" in converted.output and "val" in converted.output and "0 problem(s)" in converted.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["flip"] is True and summary["tasks"] == ["od", "caption"]
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] == 12
    assert (out / "train.jsonl").read_text().startswith('{"prefix":"<OD>"')


def test_user_errors_exit_1_with_a_message_and_no_traceback(tmp_path):
    missing = runner.invoke(app, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert missing.exit_code == 1
    assert "error:" in missing.output and "does not exist" in missing.output
    assert "Traceback" not in missing.output

    bad_size = runner.invoke(app, ["synth", str(tmp_path / "s"), "--size", "big"])
    assert bad_size.exit_code == 1 and "768x432" in bad_size.output
    too_big = runner.invoke(app, ["synth", str(tmp_path / "s"), "--size", "4000x3000"])
    assert too_big.exit_code == 1 and "out of range" in too_big.output


def test_strict_lists_the_problems_and_fails(tmp_path):
    (tmp_path / "a.xml").write_text("<annotation><filename>gone.jpg</filename></annotation>")
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "--strict"])
    assert result.exit_code == 1
    assert "a.xml" in result.output and "not found" in result.output
    assert not (tmp_path / "out").exists()


def test_problems_are_listed_when_not_strict(tmp_path):
    runner.invoke(app, ["synth", str(tmp_path), "--images", "3", "--size", "256x144"])
    (tmp_path / "annotations" / "extra.xml").write_text("<annotation><filename>gone.jpg</filename></annotation>")
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "annotations/extra.xml" in result.output and "1 problem(s)" in result.output


def test_help_texts():
    for command in ("convert", "synth"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--seed" in result.output
