"""`loomlens predict` on a folder with the tiny model."""

import json

from PIL import Image, ImageDraw
from typer.testing import CliRunner

from loomlens.cli import app


def _predict(pattern, out, *options) -> list[dict]:
    result = CliRunner().invoke(app, ["predict", str(pattern), "--out", str(out), "--model", "tiny",
                                      "--max-boxes", "2", *options])
    assert result.exit_code == 0, result.output
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def test_predict_command_on_a_folder(tmp_path):
    square = Image.new("RGB", (96, 64), (40, 40, 40))  # the pretrained tiny finds it, scored under 0.9
    ImageDraw.Draw(square).rectangle([20, 15, 60, 50], fill=(230, 230, 230))
    square.save(tmp_path / "im0.png")
    Image.new("RGB", (96, 64), (100, 50, 50)).save(tmp_path / "im1.png")
    (tmp_path / "rules.yaml").write_text("min_score: 0.9\n")
    plain = _predict(tmp_path / "*.png", tmp_path / "plain", "--no-draw")
    assert [x["source"].endswith(f"im{i}.png") for i, x in enumerate(plain)] == [True, True]
    assert [b["label"] for b in plain[0]["boxes"]] == ["square"] and plain[0]["boxes"][0]["score"] < 0.9
    out = tmp_path / "out"
    ruled = _predict(tmp_path / "*.png", out, "--coco", "--regions", str(tmp_path / "rules.yaml"))
    assert ruled[0]["boxes"] == [] and all(b["score"] >= 0.9 for x in ruled for b in x["boxes"])
    assert (out / "coco_results.json").exists() and (out / "rules-applied.yaml").exists()
    assert len(list((out / "drawn").iterdir())) == 2
    # The same folder again for one picture, plainly: nothing of the run before stays beside it.
    again = _predict(tmp_path / "im1.png", out)
    assert [x["source"].endswith("im1.png") for x in again] == [True]
    assert not (out / "coco_results.json").exists() and not (out / "coco_images.json").exists()
    assert not (out / "rules-applied.yaml").exists() and [p.name for p in (out / "drawn").iterdir()] == ["im1.jpg"]


def test_predict_command_rejects_missing_input(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nothing.png"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no such file" in result.output


def test_predict_on_a_folder_without_pictures_fails_and_keeps_the_earlier_results(tmp_path):
    # A nightly `predict && process` must not take the last run's results for this one's.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("notes")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.jsonl").write_text('{"earlier": true}\n')
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no image or video found in the inputs" in result.output, result.output
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == '{"earlier": true}\n'
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "empty"), "--out", str(tmp_path / "new")])
    assert result.exit_code == 1 and "no predictions.jsonl was written" in result.output
    assert not (tmp_path / "new" / "predictions.jsonl").exists()  # no empty file to take for results
    assert "predictions.jsonl" not in result.output.split("error:")[0]  # the summary line does not list it


def test_predict_and_serve_refuse_an_unknown_precision_clearly(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    for command in (["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out")], ["serve", "--no-page"]):
        result = CliRunner().invoke(app, [*command, "--precision", "int4"])
        assert result.exit_code == 1 and "precision must be one of" in result.output, result.output


def test_sigterm_stops_predict_as_ctrl_c_does_and_the_same_command_goes_on(tmp_path, monkeypatch):
    import os
    import signal

    import loomlens.predict.files as files

    for i in range(3):
        Image.new("RGB", (96, 64), (i * 80, 50, 50)).save(tmp_path / f"im{i}.png")
    out = tmp_path / "out"
    command = ["predict", str(tmp_path / "*.png"), "--out", str(out), "--model", "tiny", "--max-boxes", "2",
               "--batch-size", "2"]
    real = files.predict_files

    def terminated_after_the_first_batch(*args, on_item, **kwargs):
        def tick() -> None:
            on_item()
            os.kill(os.getpid(), signal.SIGTERM)  # as a service manager stopping the command

        return real(*args, on_item=tick, **kwargs)

    def before(*_) -> None:  # stands in for the default, which would end the test run itself
        pass

    monkeypatch.setattr(files, "predict_files", terminated_after_the_first_batch)
    previous = signal.signal(signal.SIGTERM, before)
    try:
        stopped = CliRunner().invoke(app, command)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.exit_code == 130 and "the same command again goes on" in stopped.output, stopped.output
    assert after is before and not (out / "predictions.jsonl").exists()
    monkeypatch.setattr(files, "predict_files", real)
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0 and "2 images/frames it predicted were kept" in again.output, again.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_every_command_that_takes_a_run_takes_it_as_run_or_adapter(tmp_path):
    """`eval --run R` and `predict --adapter R` name the same thing: either spelling works on
    each command, and reaches the run's own check (a folder with no adapter)."""
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    (tmp_path / "data").mkdir()
    Image.new("RGB", (96, 64)).save(tmp_path / "data" / "im.png")  # inside the data, as eval's split check wants
    (tmp_path / "data" / "val.jsonl").write_text('{"prefix": "<OD>", "suffix": "", "image": "im.png"}\n')
    commands = {
        "predict": ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out")],
        "eval": ["eval", "--data", str(tmp_path / "data")],
        "select": ["select", str(tmp_path / "im.png"), "--out", str(tmp_path / "sel")],
        "serve": ["serve", "--no-page"],
        "watch": ["watch", str(tmp_path)],
    }
    for name, command in commands.items():
        for flag in ("--run", "--adapter"):
            result = CliRunner().invoke(app, [*command, flag, str(tmp_path / "no-run")])
            assert result.exit_code != 0 and "No such option" not in result.output, (name, flag, result.output)
            assert "no adapter at" in result.output, (name, flag, result.output)


def test_a_file_for_out_a_missing_database_driver_and_an_absent_gpu_are_one_line_errors(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 1 and "the output folder" in result.output and "is a file" in result.output
    result = CliRunner().invoke(app, ["watch", str(tmp_path), "--once", "--db", "mysql://u:secret@h/db"])
    assert result.exit_code == 1 and "needs the driver" in result.output and "secret" not in result.output
    import torch

    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["serve", "--device", "cuda", "--no-page"])
        assert result.exit_code == 1 and "sees none" in result.output and "error: 1" not in result.output


def test_paths_the_file_system_refuses_are_one_line_errors_naming_them(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    (tmp_path / "somefile.txt").write_text("x")
    cases = {  # options: what the error must say
        ("--out", str(tmp_path / "somefile.txt" / "sub")): f"the output folder {tmp_path / 'somefile.txt' / 'sub'}",
        ("--save-labels", "voc", "--labels-out", str(tmp_path / "somefile.txt")):
            f"the pre-annotations folder {tmp_path / 'somefile.txt'} (--labels-out) cannot be made",
        ("--regions", str(tmp_path)): f"region rules {tmp_path} cannot be read (Is a directory)",
        ("--regions", str(tmp_path / "nonexist.yaml")): "nonexist.yaml cannot be read (No such file or directory)",
        ("--out", str(tmp_path / "taken")): f"cannot read or write {tmp_path / 'taken' / 'drawn'} (File exists)",
    }
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "drawn").write_text("a file where predict draws")
    for options, says in cases.items():
        out = [] if "--out" in options else ["--out", str(tmp_path / "out")]
        result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--model", "tiny", *out, *options])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
        assert says in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
        assert result.output.count("error:") == 1, result.output


def test_bad_options_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import loomlens.predict

    def never(**_):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loomlens.predict, "Predictor", never)
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    for options, says in [(["--task", "detect"], "unknown task 'detect'; use one of: od, caption"),
                          (["--task", "phrase_grounding"], "needs --text"),
                          (["--text", "drop"], "task 'od' takes no --text"),
                          (["--tile", "maybe"], "--tile must be one of auto, on, off"),
                          (["--task", "ocr", "--save-labels", "voc"], "--save-labels writes boxes")]:
        result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out"),
                                          *options])
        assert result.exit_code == 1 and says in result.output, (options, result.output)
    assert not (tmp_path / "out").exists()


def test_a_phrase_too_long_for_the_model_is_one_line_error_before_any_picture(tmp_path):
    """It was an IndexError traceback from deep in the model, on the first picture."""
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out"),
                                      "--model", "tiny", "--task", "phrase_grounding", "--text", "drop " * 100])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
    assert "is too long for this model: with the picture it takes 366 positions of the 321" in output, output
    assert not (tmp_path / "out" / "problems.json").exists()  # the text is wrong, not the picture


def test_constrained_without_class_names_is_one_option_error_not_every_picture_unreadable(tmp_path):
    """A bare model has no classes for the grammar: each picture was listed as a problem and the
    run ended "no input could be read", blaming good pictures for an option."""
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out"),
                                      "--model", "tiny", "--constrained"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "--constrained needs the class names" in output, output
    assert "could be read" not in output and not (tmp_path / "out").exists()


def test_a_run_that_reads_no_input_leaves_the_earlier_results_and_names_the_bad_ones(tmp_path):
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    out = tmp_path / "out"
    _predict(tmp_path / "im.png", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "bad"), "--out", str(out), "--model", "tiny"])
    assert result.exit_code == 1 and "no input could be read; nothing was written" in result.output, result.output
    assert "empty.png is empty" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_serve_by_default_sees_a_2560x1440_frame_in_256_px_tiles_whole_as_eval_does(monkeypatch):
    import loomlens.predict
    from loomlens.data.tiles import tile_windows
    from loomlens.infer.tiling import mid_windows

    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise ValueError("stopped before loading a model")

    monkeypatch.setattr(loomlens.predict, "Predictor", capture)
    result = CliRunner().invoke(app, ["serve", "--no-page"])
    assert result.exit_code == 1 and "stopped before loading" in result.output, result.output
    tiles = len(tile_windows(2560, 1440, 256))
    crops = tiles + len(mid_windows(2560, 1440, 256)) + 1  # tiles, the middle view, the whole frame
    assert crops <= seen["max_tiles"]  # not downscaled: the defects at the size the run learnt them


def test_a_strip_longer_than_a_jpeg_holds_is_predicted_and_drawn_shrunk(tmp_path):
    """A 70000 px line-scan strip: its drawn JPEG (65500 px a side at most) failed to save,
    and the run stopped saying to check the output folder; the picture is drawn shrunk to fit,
    its boxes stay in the strip's own pixels."""
    Image.new("RGB", (70000, 4), (90, 90, 90)).save(tmp_path / "strip.png")
    (record,) = _predict(tmp_path / "strip.png", tmp_path / "out")
    assert (record["width"], record["height"]) == (70000, 4)
    with Image.open(tmp_path / "out" / "drawn" / "strip.jpg") as drawn:
        assert drawn.size == (65500, 3)
