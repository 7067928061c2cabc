"""Warmup + decay schedules, and configs: YAML < overrides, typed, typos rejected."""

import math

import pytest
from pydantic import ValidationError

from loomlens.config import TrainConfig, dump_config, load_config
from loomlens.train.schedule import lr_factor, plan_steps, position, warmup_steps


def test_warmup_then_cosine_or_linear_to_zero():
    assert warmup_steps(0.1, 100) == 10 and warmup_steps(7, 100) == 7
    assert lr_factor(0, 10, 100) == pytest.approx(1 / 11)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(99, 10, 100, "constant") == 1.0
    factors = [lr_factor(s, 10, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 0, 1, "exp")


def test_a_time_budget_paces_the_schedule_when_it_runs_out_first():
    assert position(10, 5.0, total_steps=100) == 10  # no budget: steps alone
    assert position(10, 5.0, total_steps=100, time_budget=100) == 10  # steps ahead of time
    assert position(10, 55.0, total_steps=100, time_budget=100) == 50  # time ahead: half-way after the grace
    assert position(3, 9.0, total_steps=100, time_budget=100) == 3  # slow first steps do not pace
    assert lr_factor(position(10, 100.0, 100, 100), 5, 100) == pytest.approx(0.0, abs=1e-12)  # budget spent


def test_a_budget_is_planned_with_room_for_evaluations_measured_once_they_are():
    # Before any evaluation: 85 % of 1200 s at 0.4 s a step is 2550 steps, 2500 in two figures.
    assert plan_steps(nominal=None, time_budget=1200, seconds_per_step=0.4) == 2500
    assert plan_steps(nominal=1000, time_budget=1200, seconds_per_step=0.4) == 1000  # the cap holds
    # After one: 1080 s left, 97 % of it for steps at 0.4 s, 20 s evaluations every 250 of them
    # and a final one: (1047.6 - 20) / 0.48 = 2140 more, 2440 in all (three figures).
    assert plan_steps(nominal=None, time_budget=1200, seconds_per_step=0.4, done_steps=300, done_seconds=120,
                      evaluation=(20.0, 250)) == 2440
    # A budget already spent still makes the next step.
    assert plan_steps(nominal=None, time_budget=100, seconds_per_step=1, done_steps=7, done_seconds=100,
                      evaluation=(5.0, 10)) == 8
    with pytest.raises(ValueError, match="max_steps, epochs or a time_budget"):
        plan_steps(nominal=None, time_budget=None, seconds_per_step=1)


def test_yaml_then_overrides_with_bare_and_dotted_lora_keys(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: d\nlr: 1.0e-5\nlora:\n  r: 8\n  targets: attention\nbatch_size: 2\n")
    cfg = load_config(TrainConfig, path, {"lr": "3e-6", "r": "16", "lora.dora": "true", "tasks": "od,phrase_grounding"})
    assert cfg.lr == 3e-6 and cfg.batch_size == 2
    assert cfg.lora.r == 16 and cfg.lora.dora is True and cfg.lora.targets == "attention"
    assert cfg.lora.lora_alpha == 32  # alpha defaults to 2 r
    assert cfg.tasks == ["od", "phrase_grounding"]
    listed = load_config(TrainConfig, overrides={"data": "d", "targets": "q_proj,v_proj"})
    assert listed.lora.targets == ["q_proj", "v_proj"]


def test_unknown_or_bad_settings_fail_with_their_name():
    with pytest.raises(ValueError, match="lrr"):
        load_config(TrainConfig, overrides={"data": "d", "lrr": "1"})
    with pytest.raises(ValidationError, match="freeze"):
        load_config(TrainConfig, overrides={"data": "d", "freeze": "text"})
    with pytest.raises(ValidationError, match="batch_size"):
        load_config(TrainConfig, overrides={"data": "d", "batch_size": "0"})


def test_shipped_configs_are_valid():
    import yaml

    from loomlens.config import CONFIG_DIR, DemoConfig

    base = load_config(TrainConfig, "base", {"data": "d"})
    assert base.lr == 1e-6 and base.lora.r == 8 and base.lora.lora_alpha == 16 and base.epochs == 10
    demo = DemoConfig.model_validate(yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text()))
    assert math.isfinite(load_config(TrainConfig, base=demo.train, overrides={"data": "d"}).lr)


def test_configs_import_without_torch():
    import subprocess
    import sys

    code = "import sys, loomlens.config; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_speed_knobs_live_under_speed_and_take_bare_names():
    cfg = load_config(TrainConfig, overrides={"data": "d", "fold_lora": "false", "speed.attention": "sdpa",
                                              "vision_frozen_stages": "1", "precision": "fp32"})
    assert cfg.speed.fold_lora is False and cfg.speed.attention == "sdpa"
    assert cfg.speed.vision_frozen_stages == 1 and cfg.speed.precision == "fp32"
    assert cfg.group_by_length is False  # the shipped recipe had to undo True


def test_an_old_run_config_with_top_level_speed_keys_still_loads(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("data: d\nfold_lora: false\nattention: eager\ncache_image_features: true\nnum_workers: 2\n"
                   "precision: bf16-base\nlora:\n  r: 4\n  vision_frozen_stages: 2\n")
    cfg = load_config(TrainConfig, old)
    assert cfg.speed.model_dump() == {"precision": "bf16-base", "attention": "eager", "fold_lora": False,
                                      "cache_image_features": True, "vision_frozen_stages": 2, "num_workers": 2,
                                      "gradient_checkpointing": "none", "micro_batch": "auto"}
    assert cfg.lora.r == 4
    dump_config(cfg, tmp_path / "new.yaml")
    assert load_config(TrainConfig, tmp_path / "new.yaml") == cfg


def test_null_overrides_clear_a_setting(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: d\nmax_steps: 5\ntime_budget: 60\n")
    cfg = load_config(TrainConfig, path, {"max_steps": "null", "time_budget": "null", "max_grad_norm": "null"})
    assert cfg.max_steps is None and cfg.time_budget is None and cfg.max_grad_norm is None


def test_train_config_demo_takes_the_demos_training_recipe():
    import yaml

    from loomlens.config import CONFIG_DIR

    cfg = load_config(TrainConfig, "demo", {"data": "d"})
    recipe = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())["train"]
    assert cfg.lr == recipe["lr"] and cfg.lora.r == recipe["lora"]["r"] and cfg.max_steps == recipe["max_steps"]


def test_an_unknown_device_is_refused_with_the_choices():
    with pytest.raises(ValidationError, match="unknown device 'gpu'.*auto.*cpu.*cuda:N"):
        load_config(TrainConfig, overrides={"data": "d", "device": "gpu"})
    assert load_config(TrainConfig, overrides={"data": "d", "device": "cuda:1"}).device == "cuda:1"


def test_a_mistyped_setting_gets_the_nearest_names_in_a_file_or_on_the_line(tmp_path):
    for typed, meant in (("lr0", "'lr'"), ("rank", "'lora.r'"), ("lora.rank", "'lora.r'"), ("lerning_rate", "'lr'")):
        with pytest.raises(ValueError, match=rf"unknown setting '{typed}': did you mean {meant}"):
            load_config(TrainConfig, overrides={typed: 8})
    (tmp_path / "typo.yaml").write_text("lora:\n  dropot: 0.1\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting 'lora.dropot': did you mean 'lora.dropout'"):
        load_config(TrainConfig, tmp_path / "typo.yaml")


@pytest.mark.parametrize(("text", "says"), [
    ("data: d\nlora:\n\tr: 8\n", r"bad.yaml:3:1: not valid YAML: .*never tabs"),
    ("- lr: 1\n", r"bad.yaml: holds a list, not settings"),
    # YAML keeps the last of a key given twice: a second `lora:` section silently put lora.r back to its default
    ("data: d\nlora:\n  r: 8\nlr: 0.01\nlora:\n  dora: true\n",
     r"bad.yaml:5:1: .*'lora' is given twice \(first at line 2\): keep one"),
    ("data: d\nlora:\n  r: 8\n  r: 4\n", r"bad.yaml:4:3: .*'r' is given twice \(first at line 3\)"),
])
def test_a_config_file_that_is_no_yaml_mapping_of_settings_is_named_with_its_line(tmp_path, text, says):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=says):
        load_config(TrainConfig, tmp_path / "bad.yaml")


def test_a_config_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_config(TrainConfig, tmp_path)


def test_a_missing_config_file_in_a_folder_never_falls_back_to_a_shipped_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config .*myexp/base.yaml not found"):
        load_config(TrainConfig, tmp_path / "myexp" / "base.yaml")
    data = {"data": "d"}
    assert load_config(TrainConfig, "base.yaml", data).model == load_config(TrainConfig, "base", data).model  # bare


def test_infinite_settings_are_refused():
    for key in ("lr", "epochs"):
        with pytest.raises(ValidationError, match="finite number"):
            load_config(TrainConfig, overrides={"data": "d", key: "inf"})


def test_a_switch_is_never_read_as_a_number(tmp_path):
    # `--warmup` with its value forgotten, or `lr: yes` in a file, reached pydantic as True and
    # was taken as 1 (a one-step warmup, lr 1.0, patience 1) without a word.
    for key in ("warmup", "lr", "early_stopping", "lora.r", "r", "max_steps"):
        with pytest.raises(ValueError, match=rf"setting '{key}' takes a number, not true"):
            load_config(TrainConfig, overrides={"data": "d", key: "true"})
    (tmp_path / "c.yaml").write_text("data: d\nlr: yes\n")
    with pytest.raises(ValueError, match=r"c.yaml: setting 'lr' takes a number, not true"):
        load_config(TrainConfig, tmp_path / "c.yaml")
    switched = load_config(TrainConfig, overrides={"data": "d", "dora": "true", "augment": "false", "qlora": "1"})
    assert switched.lora.dora and not switched.augment.enabled and switched.qlora


def test_an_empty_folder_setting_is_refused_not_read_as_the_working_directory():
    # `out=` (a shell variable that was never set) trained into the working directory, and
    # `data=` read it as the data folder.
    for key in ("out", "data"):
        with pytest.raises(ValidationError, match=rf"{key}[\s\S]*is empty: give a folder"):
            load_config(TrainConfig, overrides={"data": "d", key: ""})
