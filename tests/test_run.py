"""`Run`, the one reader of a run folder: every way of naming a run, what it says, clear errors."""

import json

import pytest
import yaml

from loomlens.run import CROP, DATA_SUMMARY, RULES_FILE, Run


def adapter(folder, base="/somewhere/base"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


@pytest.fixture
def run(tmp_path):
    """A run folder as `loomlens train` writes it (no evaluation ran: no best/)."""
    folder = tmp_path / "run"
    adapter(folder / "checkpoints" / "last")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "tasks": ["od", "caption"], "data": "d"}))
    (folder / "classes.txt").write_text("drop\n\nwrinkle\n")
    return folder


def test_a_run_folder_a_checkpoint_in_it_and_an_adapter_alone(run, tmp_path):
    for given in (run, run / "checkpoints" / "last"):
        r = Run(given)
        assert r.folder == run and r.adapter("last") == run / "checkpoints" / "last"
        assert r.base == "tiny" and r.recorded_base("last") == "tiny"
        assert r.classes == ["drop", "wrinkle"] and r.tasks == {"od", "caption"}
    bare = Run(adapter(tmp_path / "loose"))
    assert bare.folder is None and bare.config == {} and bare.base is None
    assert bare.adapter() == bare.adapter("last") == tmp_path / "loose"
    assert bare.recorded_base() == "/somewhere/base"  # peft's record, when there is no run
    assert bare.classes == [] and bare.tasks == {"od"} and bare.tile is None and bare.rules is None
    assert bare.crop is None


def test_missing_adapters_say_what_to_do(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="use --checkpoint last"):
        Run(run).adapter("best")
    with pytest.raises(FileNotFoundError, match="loomlens train"):
        Run(tmp_path / "empty").adapter()
    (run / "checkpoints" / "best").mkdir()
    (run / "checkpoints" / "best" / "adapter_model.safetensors").write_bytes(b"")  # a copy that broke off
    with pytest.raises(FileNotFoundError, match="best/ lacks adapter_config.json: copy the run folder again"):
        Run(run).adapter("best")


def test_tile_rules_and_tasks_from_the_training_data(run, tmp_path, monkeypatch):
    assert Run(run).tile is None and Run(run).rules is None
    (run / DATA_SUMMARY).write_text('{"tile": 512, "tile_overlap": 0.25}')
    (run / RULES_FILE).write_text("min_score: 0.5\n")
    assert Run(run).tile == 512 and Run(run).rules == run / RULES_FILE
    # No `tasks` in the config: the tasks of its training JSONL (relative to the working dir).
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": "d"}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"task": "od"}\n{"task": "phrase_grounding"}\n\n')
    monkeypatch.chdir(tmp_path)
    assert Run(run).tasks == {"od", "phrase_grounding"}
    monkeypatch.chdir(run)
    assert Run(run).tasks == {"od"}  # no data found: od


def test_most_boxes_one_image_of_any_split_holds(run):
    """What eval and predict read an image by default (`LoadedModel.max_boxes`, at least 20)."""
    assert Run(run).most_boxes is None  # no summary: a bare adapter, or seed lines never converted
    (run / DATA_SUMMARY).write_text('{"splits": {"train": {"images": 4}}}')
    assert Run(run).most_boxes is None  # a summary from before it was kept
    (run / DATA_SUMMARY).write_text('{"splits": {"train": {"most_boxes": 7}, "val": {"most_boxes": 31}, "test": {}}}')
    assert Run(run / "checkpoints" / "last").most_boxes == 31


def test_a_run_that_cropped_tiles_at_its_window_in_predict_and_eval(run):
    # No crop record (no crop, no large frame, or a run from before the crop): whole frames.
    assert Run(run).crop is None and Run(run).tile is None
    (run / DATA_SUMMARY).write_text('{"tile": 512}')
    assert Run(run).tile == 512  # data cut to tiles: predicted and evaluated in them
    (run / CROP).write_text('{"window": 256}')
    assert Run(run).crop == 256 and Run(run).tile == 512  # the data's tiles first
    (run / DATA_SUMMARY).write_text('{"tile": null}')
    assert Run(run).tile == 256
    assert Run(run / "checkpoints" / "last").tile == 256


def test_views_are_the_mirrors_the_run_was_trained_on(run, tmp_path):
    """Test-time augmentation looks only through mirrors the model learnt (`infer/tta.py`)."""
    def trained(augment=None, flip=None, **speed):
        config = {"model": "tiny", "speed": speed} | ({"augment": augment} if augment is not None else {})
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / DATA_SUMMARY).unlink(missing_ok=True)
        if flip is not None:
            (run / DATA_SUMMARY).write_text(json.dumps({"flip": flip}))
        return Run(run).views

    assert trained() == ("",)  # a run from before online augmentation, whole frames only
    assert trained(flip=True) == ("", "h")  # `convert --flip` copies
    assert trained({"enabled": True, "hflip": 0.5, "vflip": 0.5}) == ("", "h", "v", "hv")
    assert trained({"enabled": True, "hflip": 0.0, "vflip": 0.5}) == ("", "v")
    assert trained({"enabled": True, "hflip": 0.0, "vflip": 0.5}, flip=True) == ("", "h", "v", "hv")
    assert trained({"enabled": False, "hflip": 0.5, "vflip": 0.5}) == ("",)
    assert trained({"enabled": True, "hflip": 0.5, "vflip": 0.5}, cache_image_features=True) == ("",)
    assert trained(True) == ("", "h", "v", "hv")  # `augment: true` by hand, TrainConfig's flips
    assert trained({"vflip": 0.0}) == ("", "h")
    assert Run(adapter(tmp_path / "loose")).views == ("",)


def test_a_checkpoint_name_other_than_best_or_last_says_so(tmp_path):
    (tmp_path / "checkpoints" / "best").mkdir(parents=True)
    (tmp_path / "checkpoints" / "best" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--checkpoint takes best or last, not 'middle'"):
        Run(tmp_path).adapter("middle")


def test_last_asked_where_only_best_is_points_to_best(tmp_path):
    # A run copied with best/ alone was told to "train one with `loomlens train`".
    adapter(tmp_path / "run" / "checkpoints" / "best")
    with pytest.raises(FileNotFoundError, match=r"it holds best/ only: use --checkpoint best"):
        Run(tmp_path / "run").adapter("last")
    with pytest.raises(FileNotFoundError, match=r"no such folder.*loomlens train"):
        Run(tmp_path / "nosuch").adapter()


@pytest.mark.parametrize("text, says", [
    ("model: tiny\nlr: 0.1\n  tasks: [od\n", "config.yaml:3: not valid YAML (mapping values are not allowed here)"),
    ("- tiny\n- od\n", "config.yaml holds a list, not a run's settings"),
])
def test_a_config_yaml_that_holds_no_settings_is_one_line_naming_the_file_and_the_fix(run, text, says):
    """It raised YAML's own error, which train, eval, predict, merge and export printed as a traceback."""
    (run / "config.yaml").write_text(text)
    for given in (run, run / "checkpoints" / "last"):
        with pytest.raises(ValueError) as refused:
            Run(given)
        message = str(refused.value)
        assert f"{run / 'config.yaml'}" in message and says in message, message
        assert "restore it from a copy of the run folder" in message and "\n" not in message


def test_the_commands_that_read_a_run_name_its_broken_config_yaml_without_a_traceback(run, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from loomlens.cli import app
    from loomlens.data.convert import convert
    from loomlens.data.synth import synthesize

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    convert(tmp_path / "raw", tmp_path / "data", val_fraction=0.5)
    Image.new("RGB", (64, 48)).save(tmp_path / "frame.png")
    (run / "config.yaml").write_text("model: tiny\nlr: 0.1\n  tasks: [od\n")
    fresh = tmp_path / "fresh"  # a new run's --out holding another tool's broken config.yaml
    fresh.mkdir()
    (fresh / "config.yaml").write_text("a: [1,\n")
    (fresh / "notes.txt").write_text("x")
    commands = {
        run: [["train", "--resume", run], ["eval", "--data", tmp_path / "data", "--run", run, "--checkpoint", "last"],
              ["predict", tmp_path / "frame.png", "--run", run, "--checkpoint", "last", "--out", tmp_path / "p"],
              ["merge", run, tmp_path / "merged", "--checkpoint", "last"],
              ["export", run, tmp_path / "exported", "--checkpoint", "last"]],
        fresh: [["train", "--data", tmp_path / "data", "--out", fresh, "model=/no/such/model", "--no-progress"]],
    }
    for folder, lines in commands.items():
        for line in lines:
            result = CliRunner().invoke(app, [str(word) for word in line])
            text = " ".join(result.output.split())
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (line, result.output)
            assert f"{folder / 'config.yaml'}:" in text and "not valid YAML" in text, (line, result.output)


@pytest.mark.parametrize("hidden", [".DS_Store", "._frame.jpg", "Thumbs.db", "desktop.ini", "DESKTOP.INI", ".git"])
def test_an_output_folder_holding_only_what_a_file_manager_hides_counts_as_empty(tmp_path, hidden):
    """train, merge and export refused a folder holding only the .DS_Store or Thumbs.db the OS left
    there, which convert took (`data.atomic.holds_files`, the one rule)."""
    from loomlens.run import check_output_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / hidden).write_bytes(b"")
    check_output_folder(tmp_path / "out", "--out", "choose an empty folder")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty: choose an empty folder"):
        check_output_folder(tmp_path / "out", "--out", "choose an empty folder")


def test_a_run_that_saved_no_checkpoint_yet_is_not_told_to_train_one(tmp_path):
    # eval/predict/merge of a run still training (or stopped before its first save) said
    # "train one with `loomlens train`", as for a folder that holds no run.
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "tiny"}))
    for made in (False, True):  # no checkpoints/ yet, or made and still empty
        if made:
            (folder / "checkpoints").mkdir()
        for checkpoint in ("best", "last"):
            with pytest.raises(FileNotFoundError) as missing:
                Run(folder).adapter(checkpoint)
            message = str(missing.value)
            assert "the run has saved no checkpoint yet" in message and "loomlens train --resume" not in message
            assert "train one with" not in message and f"--out {folder}" in message, message


def test_a_folder_of_runs_such_as_a_sweeps_names_them(tmp_path):
    # `eval --run runs/sweep` was told to "train one with `loomlens train`".
    for name in ("lr=0.01", "lr=0.001"):
        adapter(tmp_path / "sweep" / name / "checkpoints" / "best")
        (tmp_path / "sweep" / name / "config.yaml").write_text("model: tiny\n")
    (tmp_path / "sweep" / "sweep.md").write_text("| lr |\n")
    with pytest.raises(FileNotFoundError) as missing:
        Run(tmp_path / "sweep").adapter()
    message = str(missing.value)
    assert "it holds the runs lr=0.001, lr=0.01: give one of them" in message and "train one" not in message, message
