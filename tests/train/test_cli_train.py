"""`loomlens train | sweep | merge` from the command line: flags, key=value, --config, resume."""

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from loomlens.cli import _expand_key_value_args, app


def run(*args: str):
    return CliRunner().invoke(app, _expand_key_value_args([str(a) for a in args]))


def fast(small_data, small_model_dir) -> list[str]:
    return ["--data", small_data, f"model={small_model_dir}", "--batch-size", "4", "--eval-every", "1",
            "eval_max_images=0", "--no-progress", "tensorboard=false", "lora.r=4"]


def test_train_resume_and_merge(small_data, small_model_dir, tmp_path):
    out = tmp_path / "run"
    first = run("train", *fast(small_data, small_model_dir), "--out", out, "--max-steps", "2", "lr=0.01",
                "--targets", "q_proj,v_proj,lm_head", "--dora")
    assert first.exit_code == 0, first.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.01 and saved["lora"]["r"] == 4 and saved["lora"]["dora"] is True
    assert saved["lora"]["targets"] == ["q_proj", "v_proj", "lm_head"] and saved["progress"] is False

    again = run("train", "--resume", out, "--max-steps", "3")
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in csv.DictReader(open(out / "metrics.csv")) if r["train_loss"]] == ["1", "2", "3"]
    done = run("train", "--resume", out)  # already at its 3 steps
    assert done.exit_code == 0 and "nothing trained: the run had already reached its max_steps" in done.output

    merged = run("merge", out, tmp_path / "merged", "--checkpoint", "last")
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_config_file_with_flags_on_top(small_data, small_model_dir, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("max_steps: 1\nlr: 0.5\nlora:\n  targets: attention\n")
    result = run("train", "--config", config, *fast(small_data, small_model_dir), "--out", tmp_path / "run",
                 "--lr", "0.02")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 0.02 and saved["max_steps"] == 1 and saved["lora"]["targets"] == "attention"


def test_user_errors_exit_1_with_the_reason(small_data, small_model_dir, tmp_path):
    bad_target = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "a", "--targets", "o_proj")
    assert bad_target.exit_code == 1 and "o_proj" in bad_target.output
    bad_key = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "b", "--learning-rate", "1")
    assert bad_key.exit_code == 1 and "learning-rate" in bad_key.output and "did you mean 'lr'" in bad_key.output
    no_data = run("train", "--out", tmp_path / "c")
    assert no_data.exit_code == 1 and "--data" in no_data.output
    qlora = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "d", "--qlora")
    missing = "bitsandbytes" if torch.cuda.is_available() else "CUDA"  # says what this machine lacks
    assert qlora.exit_code == 1 and missing in qlora.output


def test_sweep_writes_runs_table_and_overlay(small_data, small_model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.01,0.001",
                 "--targets", "attention,q_proj+lm_head", "max_steps=1")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["lr"], r["targets"]) for r in rows] == [
        ("0.01", "attention"), ("0.01", "q_proj,lm_head"), ("0.001", "attention"), ("0.001", "q_proj,lm_head")]
    assert all(r["final_val_loss"] and r["steps"] == "1" for r in rows)
    assert (out / "val_loss.png").stat().st_size > 0 and "| lr | targets |" in (out / "sweep.md").read_text()
    second = yaml.safe_load((out / rows[1]["run"] / "config.yaml").read_text())
    assert second["lora"]["targets"] == ["q_proj", "lm_head"]
    rerun = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.01,0.001",
                "--targets", "attention,q_proj+lm_head", "max_steps=1")  # finished runs: nothing to redo
    assert rerun.exit_code == 0, rerun.output
    assert [r["steps"] for r in csv.DictReader(open(out / "sweep.csv"))] == ["1"] * 4


def test_a_sweep_checks_every_point_first_and_goes_on_past_a_diverged_one(small_data, small_model_dir, tmp_path,
                                                                          monkeypatch):
    from loomlens.train import recipe

    out = tmp_path / "sweep"
    bad = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.01,abc", "max_steps=1")
    assert bad.exit_code == 1 and "invalid settings" in bad.output and "lr" in bad.output
    assert not out.exists()  # nothing trained before the last value was read
    real = recipe.train

    def diverging(cfg, **kwargs):
        if cfg.lr > 1:
            raise recipe.TrainingDiverged("loss nan at step 1; saved the last finite weights")
        return real(cfg, **kwargs)

    monkeypatch.setattr(recipe, "train", diverging)
    result = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "1e8,0.001,0.001", "max_steps=1")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["lr"], r["stopped"]) for r in rows] == [("1e8", "diverged"), ("0.001", "max_steps")]  # once each

    def interrupted(cfg, **kwargs):
        raise recipe.TrainingInterrupted(f"SIGINT at step 3: saved in {cfg.out}; resume with `loomlens train ...`")

    monkeypatch.setattr(recipe, "train", interrupted)
    stopped = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.002", "max_steps=1")
    assert stopped.exit_code == 130 and "run the same sweep command again" in stopped.output


def test_sweep_over_the_location_loss_settings(small_data, small_model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--pointer-weight", "0,1",
                 "--loc-sigma", "8", "max_steps=1")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    saved = [yaml.safe_load((out / r["run"] / "config.yaml").read_text()) for r in rows]
    assert [(c["pointer_weight"], c["loc_sigma"]) for c in saved] == [(0.0, 8.0), (1.0, 8.0)]


def test_num_processes_relaunches_under_accelerate(monkeypatch, small_data):
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.delenv("LOOMLENS_LAUNCHED", raising=False)
    argv = ["loomlens", "train", "--data", str(small_data), "--num-processes", "2", "--lr", "0.1"]
    monkeypatch.setattr(sys, "argv", argv)
    result = run(*sys.argv[1:])
    assert result.exit_code == 0, result.output
    (command, env), = calls
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[command.index("--num_processes") + 1] == "2"
    assert command[-7:] == ["-m", "loomlens.cli", "train", "--data", str(small_data), "--lr", "0.1"]
    assert env["LOOMLENS_LAUNCHED"] == "1"


def test_null_reaches_the_config_and_the_device_is_checked_there(tmp_path):
    result = run("train", "--data", tmp_path, "max_steps=null", "time_budget=null", "device=gpu")
    assert result.exit_code == 1 and "unknown device 'gpu'" in result.output, result.output


def test_every_command_takes_device_auto():
    import re

    for command in ("train", "eval", "predict", "serve", "sweep", "demo"):
        text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", run(command, "--help").output))
        assert "--device" in text and "auto (CUDA when there is one, else the CPU)" in text, command


def test_pretrain_is_a_maintainer_tool_not_a_user_command():
    commands = {line.split()[1] for line in run("--help").output.splitlines() if line.startswith("│ ")}
    assert "train" in commands and "pretrain" not in commands  # python -m loomlens.train.pretrain


def test_the_data_and_the_run_folder_are_checked_before_the_model_loads(small_data, small_model_dir, tmp_path):
    nowhere = ["model=/no/such/model", "--no-progress"]  # loading it would be the error otherwise
    missing = run("train", "--data", tmp_path / "nodata", "--out", tmp_path / "e", *nowhere)
    assert missing.exit_code == 1 and "no training split at" in missing.output and "loomlens convert" in missing.output
    (tmp_path / "afile").write_text("x")
    assert "is a file" in run("train", "--data", small_data, "--out", tmp_path / "afile", *nowhere).output
    assert "is the data folder" in run("train", "--data", small_data, "--out", small_data, *nowhere).output
    below = run("train", "--data", small_data, "--out", tmp_path / "afile" / "run", *nowhere).output
    assert "afile is a file, so" in below and "cannot be made" in below  # was "[Errno 20] Not a directory"
    assert not (small_data / "config.yaml").exists()


def test_a_class_the_data_does_not_list_is_refused_before_training(small_data, small_model_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "classes.txt").write_text("drop\n")  # the samples have wrinkle boxes too
    result = run("train", *fast(data, small_model_dir), "--out", tmp_path / "run", "--max-steps", "1")
    assert result.exit_code == 1 and "'wrinkle'" in result.output and "does not list" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tasks_the_data_lacks_are_refused_with_what_it_holds(small_data, small_model_dir, tmp_path):
    absent = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "a", "tasks=[od,caption]")
    assert absent.exit_code == 1 and "tasks caption have no sample in" in absent.output
    unknown = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "b", "tasks=[odd]")
    assert unknown.exit_code == 1 and "(it holds od, phrase_grounding)" in unknown.output


def test_a_flag_never_takes_a_key_value_word_as_its_value(small_data, small_model_dir, tmp_path):
    from loomlens.cli import _extra_overrides

    assert _extra_overrides(["--no-shuffle", "lora.r=0", "--group-by-length", "lr=1", "--warmup", "0.1"]) == \
        {"shuffle": "false", "lora.r": "0", "group-by-length": "true", "lr": "1", "warmup": "0.1"}
    typo = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "a", "lora_r=8")
    assert typo.exit_code == 1 and "unknown setting 'lora_r': did you mean 'lora.r'" in typo.output


def test_resume_refuses_a_config_file_and_names_a_missing_run(small_data, small_model_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.1\n")
    both = run("train", "--resume", tmp_path, "--config", config)
    assert both.exit_code == 1 and "--config with --resume" in both.output
    missing = run("train", "--resume", tmp_path / "nosuch")
    assert missing.exit_code == 1 and "no run folder at" in missing.output
    across = run("train", *fast(small_data, small_model_dir), "--out", tmp_path / "r", "batch_size=3", "micro_batch=2")
    assert across.exit_code == 1 and "settings: Value error, speed.micro_batch 2 does not divide" in across.output


def test_config_prints_every_setting_with_what_it_does():
    result = run("config", "lr=0.01", "lora.r=4")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("data: DATA  # required: folder written by `loomlens convert`")
    assert "lr: 0.01  # peak learning rate" in result.output and "  r: 4  # LoRA rank" in result.output
    assert run("config", "rank=4").exit_code == 1


def test_config_shows_the_data_a_config_file_names(tmp_path):
    (tmp_path / "c.yaml").write_text(f"data: {tmp_path / 'mine'}\n")
    assert run("config", "--config", tmp_path / "c.yaml").output.startswith(f"data: {tmp_path / 'mine'}  #")


def test_resume_refuses_an_out_other_than_the_run(tmp_path):
    # --out beside --resume was dropped without a word: the run went on in the --resume folder.
    other = run("train", "--resume", tmp_path / "r", "--out", tmp_path / "copy")
    assert other.exit_code == 1 and "--out with --resume" in other.output and "copy the folder" in other.output
    same = run("train", "--resume", tmp_path / "r", "--out", tmp_path / "r")  # the run's own folder: no conflict
    assert "--out with --resume" not in same.output and "no run folder at" in same.output


def test_a_run_whose_data_folder_moved_resumes_with_the_new_place(small_data, small_model_dir, tmp_path):
    # The message told to `loomlens convert` the gone folder again, and data=NEW was refused as
    # a change of data, so a run whose data moved (a new disk, another machine) could not go on.
    import shutil

    shutil.copytree(small_data, tmp_path / "data")
    out = tmp_path / "run"
    assert run("train", *fast(tmp_path / "data", small_model_dir), "--out", out, "--max-steps", "1").exit_code == 0
    (tmp_path / "data").rename(tmp_path / "moved")
    gone = run("train", "--resume", out, "--max-steps", "2")
    assert gone.exit_code == 1 and f"{tmp_path / 'data'}" in gone.output and "is gone" in gone.output
    assert f"--resume {out} data=" in gone.output
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "moved", other)
    (other / "summary.json").write_text('{"tile": null, "classes": ["drop"]}')
    refused = run("train", "--resume", out, "--max-steps", "2", f"data={other}")
    assert refused.exit_code == 1 and "would change data" in refused.output and "summary.json" in refused.output
    moved = run("train", "--resume", out, "--max-steps", "2", f"data={tmp_path / 'moved'}")
    assert moved.exit_code == 0, moved.output
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == str(tmp_path / "moved")


def test_an_empty_out_or_data_is_refused_before_the_model_loads(small_data, tmp_path, monkeypatch):
    # `out=$RUN` with RUN unset trained in the working directory (typer made "" the path ".").
    monkeypatch.chdir(tmp_path)
    nowhere = ["model=/no/such/model", "--no-progress"]
    for args in (["--data", small_data, "out="], ["--data", small_data, "--out", ""], ["data=", "--out", "r"]):
        result = run("train", *args, *nowhere)
        assert result.exit_code == 1 and "is empty: give a folder" in result.output, result.output
    swept = run("sweep", "--data", small_data, "--out", "", "--lr", "0.1", *nowhere)
    assert swept.exit_code == 1 and "is empty: give a folder" in swept.output, swept.output
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_is_echoed_so_a_sweep_list_or_a_file_shows_which(small_data, tmp_path):
    # "lr: Input should be a valid number" did not say which of a sweep's values, or whether the
    # file's or the line's, was wrong.
    swept = run("sweep", "--data", small_data, "--out", tmp_path / "s", "--lr", "1e-3,2e-3x")
    assert swept.exit_code == 1 and "lr: Input should be a valid number" in swept.output
    assert "(given '2e-3x')" in swept.output, swept.output
    (tmp_path / "c.yaml").write_text("lora:\n  r: eight\n")
    from_file = run("config", "--config", tmp_path / "c.yaml")
    assert from_file.exit_code == 1 and "lora.r: Input should be a valid integer" in from_file.output
    assert "(given 'eight')" in from_file.output


def test_an_out_folder_of_other_files_is_refused_before_the_model_loads(small_data, tmp_path):
    # Training wrote its config.yaml, checkpoints and curves among whatever the folder held.
    nowhere = ["model=/no/such/model", "--no-progress"]  # loading it would be the error otherwise
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"x")
    refused = run("train", "--data", small_data, "--out", photos, *nowhere)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and str(photos) in text and "no loomlens run" in text, refused.output
    assert "empty or new folder" in text and "--resume" in text
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"  # a run that stopped before its first save: trained afresh
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("lr: 0.1\n")
    for accepted in (tmp_path / "empty", unfinished):
        result = run("train", "--data", small_data, "--out", accepted, *nowhere)
        assert result.exit_code == 1 and "/no/such/model" in result.output, result.output  # past the folder
    (unfinished / "checkpoints" / "last").mkdir(parents=True)
    again = run("train", "--data", small_data, "--out", unfinished, *nowhere)
    assert again.exit_code == 1 and "already holds a run; resume it with --resume" in again.output


def test_an_empty_training_split_is_refused_before_the_model_loads(small_data, tmp_path):
    # It was found only once the model had loaded, as "train.jsonl has no samples".
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    for empty in ("", "\n  \n"):
        (data / "train.jsonl").write_text(empty)
        result = run("train", "--data", data, "--out", tmp_path / "run", "model=/no/such/model", "--no-progress")
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and f"{data / 'train.jsonl'} holds no samples" in text, result.output
        assert "convert" in text and "split" in text
    assert not (tmp_path / "run").exists()


def test_resume_reads_the_run_through_run_and_names_the_run_above_a_checkpoint(tmp_path):
    # `--resume RUN/checkpoints/last` was told to "give the --out of a run", not which one.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "last").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("lr: 0.1\n")
    inside = run("train", "--resume", run_dir / "checkpoints" / "last")
    text = " ".join(inside.output.split())
    assert inside.exit_code == 1 and f"no run folder at {run_dir / 'checkpoints' / 'last'}" in text, inside.output
    assert f"it lies inside the run {run_dir}: --resume {run_dir}" in text


def test_a_sweep_list_with_an_empty_value_is_refused_before_any_point_trains_and_spaces_are_no_part_of_a_value(
        small_data, small_model_dir, tmp_path):
    # `--targets attention,` trained the attention point, then failed loading the '' one; and
    # `--lr "0.01, 0.001"` ran a point named `lr=-0.001` with the value ' 0.001'.
    out = tmp_path / "sweep"
    for option, text in (("--targets", "attention,"), ("--lr", "0.01,,0.001"), ("--r", "")):
        refused = run("sweep", *fast(small_data, small_model_dir), "--out", out, option, text, "max_steps=1")
        said = " ".join(refused.output.split())
        assert refused.exit_code == 1 and f"{option} {text!r} has an empty value" in said, refused.output
        assert not out.exists()
    spaced = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.01, 0.001 ", "max_steps=1")
    assert spaced.exit_code == 0, spaced.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["lr=0.001", "lr=0.01"]
    assert [r["lr"] for r in csv.DictReader(open(out / "sweep.csv"))] == ["0.01", "0.001"]


@pytest.mark.parametrize("listed, shown", [("lr: [1.0e-4, 2.0e-3]\n", "[0.0001, 0.002]"), ("lr: []\n", "[]")])
def test_a_list_in_a_sweeps_config_names_the_file_the_list_and_where_lists_go(small_data, tmp_path, listed, shown):
    # A grid written into the --config YAML said only "lr: Input should be a valid number".
    (tmp_path / "grid.yaml").write_text(listed)
    swept = run("sweep", "--data", small_data, "--out", tmp_path / "s", "--config", tmp_path / "grid.yaml", "--r", "4,8")
    said = " ".join(swept.output.split())
    assert swept.exit_code == 1 and f"invalid settings (from {tmp_path / 'grid.yaml'} and the command line)" in said
    assert f"lr: Input should be a valid number (given {shown}: a list where one value goes" in said, swept.output
    assert "`loomlens sweep` tries several, each option's values as a comma list: --lr 1e-4,2e-3" in said
    assert not (tmp_path / "s").exists()


def test_a_sweep_run_again_with_a_setting_its_finished_points_cannot_resume_with_is_refused_before_any_trains(
        small_data, small_model_dir, tmp_path):
    # The new point lr=0.02 trained, and only then did lr=0.01 refuse to resume with warmup=0.2.
    out = tmp_path / "sweep"
    first = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.01", "max_steps=1")
    assert first.exit_code == 0, first.output
    again = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "0.02,0.01", "max_steps=1",
                "warmup=0.2")
    said = " ".join(again.output.split())
    assert again.exit_code == 1 and f"resuming {out / 'lr=0.01'} would change warmup" in said, again.output
    assert not (out / "lr=0.02").exists()


def test_the_labelled_folder_given_as_data_is_told_to_convert_it(tmp_path):
    # It was told to `loomlens convert SRC` into the labelled folder itself, which convert refuses.
    from loomlens.data.synth import synthesize

    synthesize(tmp_path / "raw", images=2, seed=1, size=(160, 90))
    result = run("train", "--data", tmp_path / "raw", "--out", tmp_path / "run", "model=/no/such/model")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{tmp_path / 'raw'} holds voc annotations, not their conversion" in said
    assert f"`loomlens convert {tmp_path / 'raw'} {tmp_path / 'raw-jsonl'}`" in said, result.output


def test_sweep_resume_says_how_a_sweep_goes_on(small_data, tmp_path):
    # `sweep --resume runs/sweep`, as train takes it, got "unknown setting 'resume'; known:" and 80 names.
    result = run("sweep", "--data", small_data, "--resume", tmp_path / "sweep", "--lr", "0.01")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "known:" not in said, result.output
    assert "a sweep goes on when the same sweep command runs again" in said
    assert f"--out {tmp_path / 'sweep'}" in said


def test_a_sweep_or_a_config_without_data_names_the_option_and_what_it_takes(tmp_path):
    # `sweep` with no --data, and a --config without data:, said only "data: Field required".
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    for command in (["sweep", "--lr", "0.01,0.02"], ["sweep", "--config", tmp_path / "c.yaml", "--r", "4"],
                    ["train", "--config", tmp_path / "c.yaml"]):
        result = run(*command, "--out", tmp_path / "out")
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and "give --data DIR (a folder from `loomlens convert`)" in said, result.output
    assert not (tmp_path / "out").exists()


def test_a_sweep_into_its_data_folder_is_refused_before_any_point_trains(small_data, tmp_path):
    # Train refused `--out DATA`; a sweep's runs went into DATA/lr=.../ and its table beside the splits.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    held = sorted(p.name for p in data.iterdir())
    result = run("sweep", "--data", data, "--out", data, "--lr", "0.01,0.02", "model=/no/such/model", "--no-progress")
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and f"--out {data} is the data folder; give the sweep a folder of its own" in said, \
        result.output
    assert sorted(p.name for p in data.iterdir()) == held


def test_values_spelled_differently_but_equal_train_one_point_and_say_so(small_data, small_model_dir, tmp_path):
    # `--lr 1e-2,0.01` and `--dora False,false` trained the same point twice, in folders of their own.
    out = tmp_path / "sweep"
    result = run("sweep", *fast(small_data, small_model_dir), "--out", out, "--lr", "1e-2,0.01", "--dora",
                 "False,false", "max_steps=1")
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "sweep: --lr 0.01 is 1e-2 again: that point trains once" in said
    assert "sweep: --dora false is False again: that point trains once" in said
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["lr=1e-2_dora=False"]
    assert [(r["lr"], r["dora"]) for r in csv.DictReader(open(out / "sweep.csv"))] == [("1e-2", "False")]
