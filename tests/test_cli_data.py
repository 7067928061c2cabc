"""`loomlens synth` then `loomlens convert`, through the real CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from loomlens import cli
from loomlens.cli import _expand_key_value_args, _print_convert_report, app
from loomlens.data.convert import ConvertReport
from loomlens.data.records import Problem

runner = CliRunner()


def test_synth_then_convert_prints_a_summary_and_writes_the_files(tmp_path):
    data, out = tmp_path / "loom", tmp_path / "jsonl"
    made = runner.invoke(app, _expand_key_value_args(["synth", str(data), "images=6", "seed=2", "size=256x144"]))
    assert made.exit_code == 0, made.output
    assert "6 frames 256x144" in made.output and "defect-free" in made.output
    assert len(list((data / "images").glob("*.jpg"))) == 6 and len(list((data / "annotations").glob("*.xml"))) == 6

    converted = runner.invoke(app, ["convert", str(data), str(out), "--flip", "--tasks", "od,caption",
                                    "--val-fraction", "0.34", "--seed", "3"])  # a seed that leaves each class some training box
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
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "--seed", "4"])  # every class in train
    assert result.exit_code == 0, result.output
    assert "annotations/extra.xml" in result.output and "2 problem(s)" in result.output
    assert "the val split holds no defect box" in " ".join(result.output.split())  # its one frame is clean


def test_help_texts():
    for command in ("convert", "synth"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--seed" in result.output


def test_key_value_words_become_options_only_for_the_commands_own_options(tmp_path, monkeypatch):
    assert _expand_key_value_args(["predict", "frame=7.jpg", "tile=off", "tile_size=64"]) == \
        ["predict", "frame=7.jpg", "--tile", "off", "--tile-size", "64"]
    # train's own options become options; any other setting stays a word train reads itself,
    # its name as typed for an error (`lora_r` is no setting, and is reported so).
    assert _expand_key_value_args(["train", "data=d", "lora.r=4", "warmup=0.1", "lora_r=8"]) == \
        ["train", "--data", "d", "lora.r=4", "warmup=0.1", "lora_r=8"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out=a.jpg").write_bytes(b"")  # an existing file is a file, whatever its name
    assert _expand_key_value_args(["predict", "out=a.jpg", "out=b"]) == ["predict", "out=a.jpg", "--out", "b"]
    # A flag's word: on is the flag, off its off switch, or nothing where it has none (off is its default).
    assert _expand_key_value_args(["convert", "a", "b", "flip=true", "strict=false", "strict=1"]) == \
        ["convert", "a", "b", "--flip", "--strict"]
    assert _expand_key_value_args(["eval", "constrained=false"]) == ["eval", "--no-constrained"]
    assert _expand_key_value_args(["--help"]) == ["--help"]
    assert _expand_key_value_args(["nosuchcommand", "a=b"]) == ["nosuchcommand", "a=b"]


def test_convert_into_its_own_source_exits_1_and_writes_nothing(tmp_path):
    runner.invoke(app, ["synth", str(tmp_path), "--images", "2", "--size", "256x144"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 1 and "is the source folder" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_output_folder_may_be_given_as_out_like_train_takes_it(tmp_path):
    runner.invoke(app, ["synth", str(tmp_path / "src"), "--images", "3", "--size", "256x144"])
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "data"), "--flip"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "train.jsonl").exists()
    for args in ([], [str(tmp_path / "a"), "--out", str(tmp_path / "b")]):
        refused = runner.invoke(app, ["convert", str(tmp_path / "src"), *args])
        assert refused.exit_code == 1 and "give the output folder once" in refused.output
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_on_a_missing_test_split_says_how_to_make_one(tmp_path):
    runner.invoke(app, ["synth", str(tmp_path / "src"), "--images", "3", "--size", "256x144"])
    runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "data")])
    result = runner.invoke(app, ["eval", "--data", str(tmp_path / "data"), "--split", "test"])
    assert result.exit_code == 1 and "--test-fraction 0.2" in result.output and "new folder" in result.output


def test_keep_empty_keeps_an_emptied_image_as_defect_free(tmp_path):
    src = tmp_path / "src"
    runner.invoke(app, ["synth", str(src), "--images", "2", "--size", "256x144", "--negatives", "0"])
    xml = src / "annotations" / "frame_00000.xml"
    xml.write_text(re.sub(r"<name>[^<]*</name>", "<name>bad&lt;label</name>", xml.read_text()))
    left_out = runner.invoke(app, ["convert", str(src), str(tmp_path / "a"), "--val-fraction", "0"])
    kept = runner.invoke(app, ["convert", str(src), str(tmp_path / "b"), "--val-fraction", "0", "--keep-empty"])
    assert left_out.exit_code == 0 and kept.exit_code == 0, (left_out.output, kept.output)
    assert "1 images (0 defect-free)" in left_out.output and "2 images (1 defect-free)" in kept.output


def _report(classes: list[str], problems: list[Problem] = ()) -> ConvertReport:
    split = {"images": 40, "samples": 40, "tiles": 0, "tile_samples": 0,
             "boxes_per_class": {c: 100 + i for i, c in enumerate(classes)}, "samples_per_task": {"od": 40}}
    return ConvertReport(
        source="src", out="out", source_root="../src", format="voc", tasks=["od"], order="grouped", flip=False,
        tile=None, tile_overlap=0.25, seed=0, classes=classes, images=80, negatives=8, keep_empty=False, unlabelled_clean=False,
        boxes_per_class={}, splits={"train": split, "val": split}, problems=list(problems))


def test_the_summary_turns_one_row_per_class_when_the_columns_would_not_fit():
    classes = [f"defect-kind-{i:02d}" for i in range(12)]
    console = Console(width=80, record=True)
    _print_convert_report(console, _report(classes), Path("src"))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines() if "defect-kind" in line]
    assert rows == [[c, str(100 + i), str(100 + i)] for i, c in enumerate(classes)]  # class, train, val

    wide = Console(width=80, record=True)
    _print_convert_report(wide, _report(["drop", "wrinkle"]), Path("src"))
    header = next(line for line in wide.export_text().splitlines() if "split" in line)
    assert "drop" in header and "wrinkle" in header  # few classes: one column each, as before


def test_problems_are_printed_verbatim_brackets_and_all():
    problem = Problem(file="a.json", message="annotation 3: bbox 'x' is not [x, y, w, h]; dropped",
                      fix="write bbox as four numbers [x, y, w, h]")
    console = Console(width=200, record=True)
    _print_convert_report(console, _report(["drop"], [problem]), Path("data[1]"))
    text = console.export_text()
    assert f"problem {problem}" in text and "data[1] [voc]" in text


def test_classes_with_few_boxes_to_learn_from_are_named_with_their_counts():
    report = _report(["drop", "knot", "slub"])
    console = Console(width=200, record=True)
    _print_convert_report(console, report, Path("src"))
    assert "few boxes to learn from" not in console.export_text()
    report.thin_classes = {"knot": 3, "slub": 7}
    _print_convert_report(console, report, Path("src"))
    text = " ".join(console.export_text().split())
    assert "few boxes to learn from in the train split's own frames (mirrors and tiles not counted): knot 3, slub 7;" in text
    assert "label more frames that show it" in text


def test_a_split_kept_from_list_files_names_where_it_came_from():
    report = _report(["drop"])
    report.split = {"kept": {"train": 3, "val": 1}, "drawn": {"train": 1}, "from": ["ImageSets/Main"]}
    console = Console(width=200, record=True)
    _print_convert_report(console, report, Path("src"))
    assert "kept the dataset's own split from ImageSets/Main (train 3, val 1); 1 image(s) split at random" \
        in console.export_text()


def test_a_split_kept_from_split_folders_names_them(tmp_path):
    for folder in ("train", "valid"):
        made = runner.invoke(app, ["synth", str(tmp_path / "src" / folder), "--images", "3", "--size", "256x144"])
        assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "kept the dataset's own split from split folders train/, valid/ (train 3, val 3); 0 image(s) split at " \
        "random" in " ".join(result.output.split())


def test_a_command_missing_an_optional_dependency_names_the_extra(monkeypatch, capsys):
    """`make demo` installs loomlens without extras: `loomlens serve` there says what to install."""
    def needs(module: str):
        def command():
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)
        return command

    monkeypatch.setattr(sys, "argv", ["loomlens", "serve"])
    monkeypatch.setattr(cli, "_expand_key_value_args", list)  # it reads the real app's commands
    monkeypatch.setattr(cli, "app", needs("uvicorn"))
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 1
    assert "pip install 'loomlens[serve]'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "app", needs("not_an_extra"))
    with pytest.raises(ModuleNotFoundError):  # a missing module no extra installs is a bug: its traceback stays
        cli.main()


def test_a_mistyped_run_for_export_or_split_for_eval_says_so_at_once(tmp_path):
    export = runner.invoke(app, ["export", "nosuchrun", str(tmp_path / "e")])
    assert export.exit_code == 1 and "no run folder at nosuchrun, and no model of that name" in export.output
    split = runner.invoke(app, ["eval", "--data", str(tmp_path), "--split", "tst"])
    assert split.exit_code == 1 and "--split takes val or test" in split.output
    for command in (["synth", str(tmp_path / "afile")], ["demo", "--out", str(tmp_path / "afile")]):
        (tmp_path / "afile").write_text("x")
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output, command
