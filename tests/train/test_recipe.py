"""The training loop: what a run folder holds, exact resume, accumulation, stops, best/."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loomlens.train import recipe
from loomlens.train.checkpoint import read_trainer_state
from loomlens.train.recipe import TrainingDiverged, train

from .conftest import assert_same_steps


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_run_folder_holds_config_env_metrics_curves_tb_and_checkpoints(make_config):
    cfg = make_config(tensorboard=True)
    result = train(cfg)
    run = cfg.out
    assert result.stopped == "max_steps" and result.state.step == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["r"] == 4
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] and env["versions"]["peft"] and "git_commit" in env
    assert (run / "classes.txt").read_text().split() == ["drop", "wrinkle"]
    assert json.loads((run / "data_summary.json").read_text())["tile"] is None  # what prediction reads
    assert not (run / "crop.json").exists()  # the crop is off by default
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows if r["train_loss"]] == ["1", "2", "3", "4"]
    assert [r["step"] for r in rows if r["val_loss"]] == ["2", "4"]
    assert (run / "curves" / "loss.png").stat().st_size > 0 and (run / "curves" / "map.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    for name in ("last", "best"):
        folder = run / "checkpoints" / name
        assert (folder / "adapter_model.safetensors").exists() and (folder / "trainer_state.json").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folders left behind


def test_kill_and_resume_gives_the_same_weights_as_training_straight(make_config, tmp_path, train_killed):
    # Dropout on, shuffling on, accumulation, and the kill lands mid-epoch with an epoch after.
    settings = dict(max_steps=6, grad_accum=2, batch_size=3, eval_every=4, save_every=1)
    straight = train(make_config(**settings, out=str(tmp_path / "a")))
    train_killed(make_config(**settings, out=str(tmp_path / "b")), 3)
    assert read_trainer_state(tmp_path / "b" / "checkpoints" / "last")["state"]["step"] == 3
    resumed = train(make_config(**settings, out=str(tmp_path / "b")), resume=True)
    assert resumed.state.step == 6 and resumed.state.epoch == straight.state.epoch
    a, b = adapter_weights(straight.model), adapter_weights(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    steps = [r["step"] for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv")) if r["train_loss"]]
    assert steps == [str(s) for s in range(1, 7)]


def test_a_finished_run_cannot_be_overwritten(make_config):
    cfg = make_config(max_steps=1)
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_accumulation_averages_over_tokens_not_micro_batches(make_config, tmp_path):
    """One step of 2 x 2 samples equals one step of 4 samples (labels of different lengths)."""
    common = dict(max_steps=1, shuffle=False, order="grouped", eval_every=0, lora={"r": 4, "dropout": 0.0})
    whole = train(make_config(**common, batch_size=4, out=str(tmp_path / "a")))
    split = train(make_config(**common, batch_size=2, grad_accum=2, out=str(tmp_path / "b")))
    a, b = adapter_weights(whole.model), adapter_weights(split.model)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)


def _poison(monkeypatch, at: set[int], factor: float = float("nan")) -> None:
    """Multiply the loss by `factor` (NaN, or a blow-up's size) on the given training calls of
    `batch_loss` (1-based: with whole batches, the steps; validation's calls are not counted)."""
    real, calls = recipe.batch_loss, []

    def poisoned(model, batch, spec):
        calls.append(model.training)
        loss, count = real(model, batch, spec)
        return (loss * factor, count) if model.training and sum(calls) in at else (loss, count)

    monkeypatch.setattr(recipe, "batch_loss", poisoned)


def test_nan_without_rollbacks_saves_the_good_state_and_stops_clearly(make_config, monkeypatch):
    _poison(monkeypatch, {3})
    cfg = make_config(max_steps=5, eval_every=0, guard={"collapse": False})
    with pytest.raises(TrainingDiverged, match="step 3.*weights of step 2 are saved"):
        train(cfg)
    saved = read_trainer_state(cfg.out / "checkpoints" / "last")
    assert saved["state"]["step"] == 2


@pytest.mark.parametrize(("factor", "says"), [(float("nan"), "diverged (loss nan"), (1e4, "diverged (train loss")])
def test_a_bad_step_after_an_evaluation_rolls_back_to_its_best(make_config, monkeypatch, factor, says):
    """A NaN loss right after the evaluation of step 5 (19 samples: an epoch is 5 steps), or a
    blown-up one two steps later (sound losses since vouch for best/), goes back to step 5."""
    _poison(monkeypatch, {6} if factor != factor else {8}, factor)
    result = train(make_config(max_steps=10, eval_every=0))
    events = [r["event"] for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r["event"]]
    assert len(events) == 1 and events[0].startswith(says) and events[0].endswith("back to step 5, learning rate x0.5")
    assert result.stopped == "max_steps" and result.state.lr_scale == 0.5
    # The bad step's loss is left out of the mean train loss the guard judges over-fitting by.
    judged = read_trainer_state(result.run_dir / "checkpoints" / "last")["state"]["guard"]["history"][-1]
    assert judged["step"] == 10 and judged["train_loss"] < 20


def test_a_nan_step_never_reaches_the_weights_and_the_run_rolls_back(make_config, monkeypatch):
    _poison(monkeypatch, {3})
    result = train(make_config(max_steps=5, eval_every=0))
    assert result.stopped == "max_steps" and result.state.step == 5 and result.state.lr_scale == 0.5
    assert all(torch.isfinite(v).all() for v in adapter_weights(result.model).values())
    events = [r["event"] for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r["event"]]
    assert len(events) == 1 and events[0].startswith("diverged (loss nan") and "x0.5" in events[0]


def test_a_huge_learning_rate_is_caught_and_never_saves_spoilt_weights(make_config):
    """lr 1e3 without clipping: AdamW's steps stay finite but the loss explodes (7.5 to ~1e3 on
    this model at step 2). The guard rolls back to the start twice, at a lower lr each time,
    then stops. The evaluation at the end of the first epoch (step 5) saved best/ from weights
    that step 6's loss shows were spoilt, so last/ gets the start's weights, not those."""
    from safetensors.torch import load_file

    cfg = make_config(max_steps=30, eval_every=0, save_every=1, lr=1e3, max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match=r"train loss .* over 10x .* the weights of step 0 are saved"):
        train(cfg)
    events = [r["event"] for r in csv.DictReader(open(cfg.out / "metrics.csv")) if r["event"]]
    assert len(events) == 2 and all(e.startswith("diverged (train loss") for e in events)
    assert "back to step 0, learning rate x0.5" in events[0] and "x0.25" in events[1]
    weights = load_file(cfg.out / "checkpoints" / "last" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert all(not v.any() for k, v in weights.items() if "lora_B" in k)  # LoRA's start: B = 0


def test_time_budget_stops_after_evaluating_and_saving(make_config):
    result = train(make_config(max_steps=50, time_budget=0.001, eval_every=0))
    assert result.stopped == "time_budget" and result.state.step == 1
    assert "val_loss" in result.last_eval and (result.run_dir / "checkpoints" / "best").exists()


def test_best_follows_val_map50_and_early_stopping_ends_the_run(make_config, monkeypatch):
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.1, 0.1])
    monkeypatch.setattr(recipe, "_detection_metrics", lambda *a, **k: {"map50": next(scores)})
    result = train(make_config(max_steps=10, eval_every=1, early_stopping=2, val_loss_max_samples=2))
    assert result.stopped == "early_stopping" and result.state.step == 4
    assert result.state.best_step == 2
    best = read_trainer_state(result.run_dir / "checkpoints" / "best")
    assert best["state"]["step"] == 2
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert [float(r["map50"]) for r in rows if r["map50"]] == [0.2, 0.5, 0.4, 0.3]


def test_a_resumed_early_stopped_run_stays_stopped_unless_given_more_patience(make_config, monkeypatch):
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.45, 0.6])
    monkeypatch.setattr(recipe, "_detection_metrics", lambda *a, **k: {"map50": next(scores)})
    cfg = make_config(max_steps=10, eval_every=1, early_stopping=2, val_loss_max_samples=2)
    assert train(cfg).stopped == "early_stopping"
    said = []
    again = train(cfg, resume=True, log=said.append)
    assert again.stopped == "early_stopping" and again.state.step == 4  # no step trained past the plateau
    assert any("already stopped (early_stopping) at step 4" in line for line in said)
    patient_cfg = cfg.model_copy(update={"early_stopping": 4, "max_steps": 6})
    real = recipe.forward_backward
    class Killed(BaseException):
        """A kill -9 or a power cut: nothing in the loop sees it."""

    monkeypatch.setattr(recipe, "forward_backward", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # the resume that gave more patience dies before its first save ...
        train(patient_cfg, resume=True)
    monkeypatch.setattr(recipe, "forward_backward", real)
    patient = train(patient_cfg, resume=True)  # ... and the same command again still goes on
    assert patient.stopped == "max_steps" and patient.state.step == 6 and patient.state.best_step == 6
    rows = list(csv.DictReader(open(cfg.out / "metrics.csv")))
    assert [float(r["map50"]) for r in rows if r["map50"]] == [0.2, 0.5, 0.4, 0.3, 0.45, 0.6]


def test_worker_processes_feed_the_same_batches(make_config, tmp_path):
    inline = train(make_config(max_steps=1, eval_every=0, out=str(tmp_path / "a")))
    workers = train(make_config(max_steps=1, eval_every=0, num_workers=1, out=str(tmp_path / "b")))
    a, b = adapter_weights(inline.model), adapter_weights(workers.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_cached_image_features_train_exactly_like_pixels(make_config, tmp_path):
    common = dict(max_steps=2, eval_every=0, augment=False,  # cached features are of the plain pictures
                  lora={"r": 4, "dropout": 0.0, "targets": ["language", "lm_head"]})
    pixels = train(make_config(**common, out=str(tmp_path / "a")))
    cached = train(make_config(**common, cache_image_features=True, out=str(tmp_path / "b")))
    a, b = adapter_weights(pixels.model), adapter_weights(cached.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)


def test_cached_features_say_that_they_turn_the_augmentation_off(make_config):
    said = []
    train(make_config(max_steps=1, eval_every=0, augment=True, cache_image_features=True,
                      lora={"r": 4, "dropout": 0.0, "targets": ["language", "lm_head"]}), log=said.append)
    assert any("online augmentation is off for this run" in line for line in said)


def test_cached_first_stages_train_exactly_like_pixels(make_config, tmp_path):
    """LoRA on the last DaViT stage (and the text side), the first two stages cached once."""
    common = dict(max_steps=2, eval_every=0, augment=False, lora={"r": 4, "dropout": 0.0, "targets": "seed"},
                  vision_frozen_stages=2)
    pixels = train(make_config(**common, out=str(tmp_path / "a")))
    cached = train(make_config(**common, cache_image_features=True, out=str(tmp_path / "b")))
    a, b = adapter_weights(pixels.model), adapter_weights(cached.model)
    assert any("blocks.2" in k for k in a) and not any("blocks.0" in k or "blocks.1" in k for k in a)
    moved = [k for k in a if "blocks.2" in k and "lora_B" in k]
    assert moved and all(b[k].abs().sum() > 0 for k in moved)  # the uncached stage did train
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)


def test_cached_image_features_refuse_a_trainable_vision_side(make_config):
    with pytest.raises(ValueError, match="freeze vision"):
        train(make_config(max_steps=1, cache_image_features=True, lora={"targets": "seed"}))
    with pytest.raises(ValueError, match="projector still trains"):
        train(make_config(max_steps=1, cache_image_features=True,
                          lora={"targets": "all-linear"}, vision_frozen_stages=3))


def test_soft_labels_and_pointer_train_and_validate_with_the_plain_loss(make_config, tmp_path):
    plain = train(make_config(max_steps=1, eval_every=1, out=str(tmp_path / "a")))
    helped = train(make_config(max_steps=1, eval_every=1, loc_sigma=4, pointer_weight=1, out=str(tmp_path / "b")))
    assert helped.model.config._attn_implementation == "eager"  # restored after evaluating with sdpa
    a, b = adapter_weights(plain.model), adapter_weights(helped.model)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the extra terms changed the step
    assert helped.last_eval["val_loss"] > 0


PRECISIONS = ("auto", "fp32", "fp16", "bf16", "bf16-base")


@pytest.mark.skipif(torch.cuda.is_available(), reason="how a CPU resolves precision")
@pytest.mark.parametrize("native", [True, False])
def test_precision_on_a_cpu_follows_its_bf16_instructions(native, monkeypatch):
    """`auto` autocasts in bf16 only where the CPU has bf16 instructions, else fp32; an explicit
    bf16 autocasts anyway; bf16-base stores the frozen base in bf16 and autocasts nothing;
    fp16 is CUDA only."""
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: native)
    auto = "bf16" if native else "fp32"
    assert [recipe.training_precision(p, "cpu") for p in PRECISIONS] == [auto, "fp32", "fp32", "bf16", "bf16-base"]
    assert [recipe.mixed_precision(p, "cpu") for p in PRECISIONS] == ["bf16" if native else "no", "no", "no", "bf16",
                                                                      "no"]
    assert [recipe.frozen_dtype(p, "cpu") for p in PRECISIONS] == [None, None, None, None, torch.bfloat16]


def test_bf16_base_with_qlora_is_refused_clearly(make_config):
    with pytest.raises(ValueError, match="bf16-base.*qlora.*precision bf16"):
        make_config(qlora=True, precision="bf16-base")


def _autocast_spy(monkeypatch) -> list[bool]:
    """Records, per `batch_loss` call, whether autocast was on inside the model's linears."""
    seen = []
    real = recipe.batch_loss

    def spy(model, batch, spec):
        inside = []
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda *_: inside.append(torch.is_autocast_enabled("cpu")))
        try:
            return real(model, batch, spec)
        finally:
            hook.remove()
            seen.append(any(inside))

    monkeypatch.setattr(recipe, "batch_loss", spy)
    return seen


def test_bf16_on_cpu_autocasts(make_config, tmp_path, monkeypatch):
    """An explicit bf16 autocasts on a CPU too, also after an fp32 run in the same process."""
    seen = _autocast_spy(monkeypatch)
    fp32 = train(make_config(max_steps=1, eval_every=0, precision="fp32", out=str(tmp_path / "a")))
    first = len(seen)
    bf16 = train(make_config(max_steps=1, eval_every=0, precision="bf16", out=str(tmp_path / "b")))
    assert not any(seen[:first]) and seen[first] is True  # the training step of each run
    a, b = adapter_weights(fp32.model), adapter_weights(bf16.model)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bf16_base_trains_an_fp32_adapter_over_a_bf16_base(make_config, tmp_path, monkeypatch, train_killed):
    """bf16-base: no autocast, the frozen base in bf16, the adapter (and its optimizer) in fp32;
    it evaluates (val loss, mAP) mid-run, resumes to the weights of a straight run, and what it
    saves loads onto an fp32 base like any adapter."""
    from loomlens.infer.loading import load_for_inference

    seen = _autocast_spy(monkeypatch)
    settings = dict(max_steps=3, eval_every=2, eval_max_images=2, save_every=1, precision="bf16-base",
                    lora={"r": 4, "dropout": 0.0, "targets": "seed"})
    straight = train(make_config(**settings, out=str(tmp_path / "a")))
    assert seen and not any(seen)
    for name, param in straight.model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in adapter_weights(straight.model).values())
    assert "map50" in straight.last_eval and straight.last_eval["val_loss"] > 0
    train_killed(make_config(**settings, out=str(tmp_path / "b")), 1)
    resumed = train(make_config(**settings, out=str(tmp_path / "b")), resume=True)
    a, b = adapter_weights(straight.model), adapter_weights(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    loaded = load_for_inference(adapter=tmp_path / "a", checkpoint="last").model  # a fresh fp32 base, unmerged
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    saved = adapter_weights(loaded)
    assert saved.keys() == a.keys() and all(torch.equal(saved[k], a[k]) for k in a)


def test_folded_lora_and_eager_attention_train_like_peft_and_sdpa(make_config, tmp_path):
    """The recipe's speed-ups change no step: folding LoRA into the weight (where it pays) and
    eager attention give the adapter peft's form and SDPA give, in fp32."""
    common = dict(max_steps=2, eval_every=0, lora={"r": 4, "dropout": 0.0, "targets": "seed"})
    fast = train(make_config(**common, out=str(tmp_path / "a")))
    plain = train(make_config(**common, fold_lora=False, attention="sdpa", out=str(tmp_path / "b")))
    if not torch.cuda.is_available():
        assert fast.model.config._attn_implementation == "eager"
    assert plain.model.config._attn_implementation == "sdpa"
    a, b = adapter_weights(fast.model), adapter_weights(plain.model)
    assert any("vision_tower" in k for k in a)
    assert_same_steps(a, b, rtol=1e-3, atol=1e-5)


def test_attention_follows_the_device_and_the_pointer_loss(make_config, monkeypatch):
    pick = recipe.attention_implementation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [pick(make_config(attention=a)) for a in ("auto", "sdpa", "eager")] == ["eager", "sdpa", "eager"]
    assert pick(make_config(attention="sdpa", pointer_weight=1)) == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick(make_config(device="auto")) == "sdpa"


def test_a_time_budget_is_planned_into_steps_before_the_first_one(make_config, monkeypatch):
    monkeypatch.setattr(recipe, "measure_step_seconds", lambda s: 0.01)
    said = []
    result = train(make_config(max_steps=None, time_budget=2.0, eval_every=0), log=said.append)
    # 85 % of 2 s at 0.01 s a step = 170 steps, two significant figures; the steps here are
    # slower than that, so evaluations cut the plan to what the budget holds.
    assert "planned 170 steps: 0.010 s a step measured, 2 s budget" in said
    saved = read_trainer_state(result.run_dir / "checkpoints" / "last")
    assert saved["state"]["planned_steps"] == result.state.planned_steps <= 170
    assert result.state.step <= result.state.planned_steps


def test_a_run_without_steps_epochs_or_budget_makes_3000_steps_or_3_passes_whichever_is_more(monkeypatch):
    from types import SimpleNamespace

    def cfg(**given):
        return SimpleNamespace(**{"max_steps": None, "epochs": None, "time_budget": None, "grad_accum": 1, **given})

    batches = {"small": 66, "large": 5000}  # a set of 50 frames in tiles; one of several thousand
    monkeypatch.setattr(recipe, "epoch_plan", lambda c, train_set, epoch: [[0]] * batches[train_set])
    assert recipe.step_count(cfg(), "small", world=1) == recipe.DEFAULT_STEPS == 3000  # not 198: under-trained
    assert recipe.step_count(cfg(), "large", world=1) == 3 * 5000
    assert recipe.step_count(cfg(epochs=2), "small", world=1) == 132  # what the user asked for, as before
    assert recipe.step_count(cfg(max_steps=50, epochs=2), "small", world=1) == 50
    assert recipe.step_count(cfg(time_budget=600.0), "small", world=1) is None  # the budget plans it
    assert recipe.step_count(cfg(epochs=1, time_budget=600.0), "large", world=2) == 2500  # a cap inside the budget


def test_a_run_without_steps_epochs_or_budget_says_what_it_planned(make_config, monkeypatch):
    monkeypatch.setattr(recipe, "DEFAULT_STEPS", 3)  # fewer than the small data's 3 passes of 5 batches
    said = []
    result = train(make_config(max_steps=None, eval_every=0), log=said.append)
    assert result.state.step == 15 and any(line.startswith("planned 15 steps, the default without") for line in said)


def test_warmup_is_a_share_of_the_planned_steps(make_config, monkeypatch):
    monkeypatch.setattr(recipe, "measure_step_seconds", lambda s: 1.0)
    said = []
    result = train(make_config(max_steps=1_000_000, time_budget=6.0, warmup=0.5, eval_every=1000), log=said.append)
    assert "planned 5 steps: 1.000 s a step measured, 6 s budget" in said  # not the nominal million
    assert result.state.step == 5
    lrs = [float(r["lr"]) for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r["lr"]]
    assert lrs[2] == pytest.approx(1e-2) and lrs[-1] < lrs[2]


def test_a_collapse_rolls_back_to_best_and_a_second_one_stops(make_config, monkeypatch):
    metrics = iter([{"map50": 0.4, "best_f1": 0.4, "empty_on_defects": 0.1},
                    {"map50": 0.0, "best_f1": 0.0, "empty_on_defects": 1.0},
                    {"map50": 0.3, "best_f1": 0.3, "empty_on_defects": 0.2},
                    {"map50": 0.0, "best_f1": 0.0, "empty_on_defects": 1.0}])
    monkeypatch.setattr(recipe, "_detection_metrics", lambda *a, **k: next(metrics))
    cfg = make_config(max_steps=10, eval_every=1, val_loss_max_samples=2, guard={"max_rollbacks": 1})
    result = train(cfg)
    assert result.stopped == "collapsed" and result.state.step == 4
    assert result.state.best_step == 1 and result.state.lr_scale == 0.5
    events = [r["event"] for r in csv.DictReader(open(cfg.out / "metrics.csv")) if r["event"]]
    assert "no box on 100% of val frames with a defect: back to step 1" in events[0]
    assert "after 1 rollback(s): stopping; last/ is best/ (step 1)" in events[1]
    assert read_trainer_state(cfg.out / "checkpoints" / "best")["state"]["step"] == 1
    # The run ends on best/'s weights, not on the collapsed ones: the final adapter is the best.
    last, best = (load_file(cfg.out / "checkpoints" / c / "adapter_model.safetensors") for c in ("last", "best"))
    assert last.keys() == best.keys() and all(torch.equal(last[k], best[k]) for k in last)
    # ... and so are the raw weights under best/'s average (train/average.py), put back with it
    raw_last, raw_best = (read_trainer_state(cfg.out / "checkpoints" / c)["raw"] for c in ("last", "best"))
    assert raw_last.keys() == raw_best.keys() and all(torch.equal(raw_last[k], raw_best[k]) for k in raw_last)


def test_a_signal_saves_and_says_how_to_resume(make_config, monkeypatch):
    import os
    import signal

    real = recipe.advance

    def advance_then_signal(s):
        done = real(s)
        if s.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return done

    monkeypatch.setattr(recipe, "advance", advance_then_signal)
    cfg = make_config(max_steps=6, eval_every=0)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    with pytest.raises(recipe.TrainingInterrupted, match=r"SIGINT at step 2.*--resume"):
        train(cfg)
    assert read_trainer_state(cfg.out / "checkpoints" / "last")["state"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # put back
    monkeypatch.setattr(recipe, "advance", real)
    assert train(cfg, resume=True).state.step == 6


def test_resume_refuses_changed_settings_and_records_allowed_ones(make_config):
    from loomlens.config import TrainConfig, load_config

    cfg = make_config(max_steps=2, eval_every=0)
    train(cfg)
    changed = load_config(TrainConfig, cfg.out / "config.yaml", {"lr": "0.5"})
    with pytest.raises(ValueError, match=r"would change lr \(0\.01 -> 0\.5\)"):
        train(changed, resume=True)
    longer = load_config(TrainConfig, cfg.out / "config.yaml", {"max_steps": "3"})
    assert train(longer, resume=True).state.step == 3
    amendments = yaml.safe_load((cfg.out / "amendments.yaml").read_text())
    assert amendments == [{"step": 2, "changes": {"max_steps": [2, 3]}}]
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["max_steps"] == 3


def test_slow_evaluations_are_spaced_and_a_slow_machine_plans_fewer_steps():
    from types import SimpleNamespace

    from loomlens.train.checkpoint import TrainerState

    said = []
    s = SimpleNamespace(
        state=TrainerState(step=100, train_seconds=60.0, eval_seconds=10.0, planned_steps=1000),
        cfg=SimpleNamespace(time_budget=200.0, eval_every=None), eval_every=50, total_steps=1000, nominal_steps=None,
        say=said.append, metrics=None, epoch=1.0, paced_from=None, epoch_length=30,
    )
    recipe.keep_to_budget(s, eval_seconds=10.0)
    # 0.5 s a step (evaluations excluded): a 10 s evaluation asks for 180 steps between two.
    assert s.eval_every == 180
    # 140 s left, 97 % of it for steps at 0.5 s, a 10 s evaluation every 180 of them and a
    # final one: 226 more steps fit, not 900.
    assert s.total_steps == s.state.planned_steps == 326
    assert any("evaluating every 180 steps" in line for line in said)
    assert any("10 s an evaluation: the budget holds 326 steps, not 1000" in line for line in said)
    recipe.keep_to_budget(s, eval_seconds=9.8)  # jitter changes neither the cadence nor the plan
    assert s.eval_every == 180 and s.total_steps == 326
    recipe.keep_to_budget(s, eval_seconds=1.0)  # a cheap evaluation leaves room for 40 more steps
    assert s.eval_every == 180 and s.total_steps == 366
    s.state.train_seconds, s.state.eval_seconds = 25.0, 5.0  # faster than planned: the plan grows
    recipe.keep_to_budget(s, eval_seconds=1.0)
    assert s.total_steps == 920  # 175 s left at 0.2 s a step


def test_the_budget_is_planned_at_the_pace_of_the_latest_steps():
    from types import SimpleNamespace

    from loomlens.train.checkpoint import TrainerState

    s = SimpleNamespace(
        state=TrainerState(step=100, train_seconds=19.0, eval_seconds=0.0, planned_steps=850),
        cfg=SimpleNamespace(time_budget=200.0, eval_every=0), eval_every=0, total_steps=850, nominal_steps=None,
        say=lambda _: None, metrics=None, epoch=1.0, paced_from=None, epoch_length=100,
    )
    recipe.keep_to_budget(s, eval_seconds=0.0)  # 0.19 s a step so far: 97 % of the 181 s left
    assert s.total_steps == 1020  # holds 924 more (three figures), not the first plan's 85 %
    s.state.step, s.state.train_seconds = 200, 70.0  # the machine slowed to 0.51 s a step
    recipe.keep_to_budget(s, eval_seconds=0.0)
    # 130 s left at 0.51 s a step (not the run's 0.35): 247 more, 447 in all
    assert s.total_steps == 447
    s.state.step, s.state.train_seconds = 210, 80.0  # 10 steps at 1 s are too few to time:
    recipe.keep_to_budget(s, eval_seconds=0.0)
    assert s.total_steps == 515  # the whole run's 0.38 s a step, 120 s left: 305 more


def test_gradient_checkpointing_trains_the_same_weights(make_config, tmp_path):
    common = dict(max_steps=2, eval_every=0, lora={"r": 4, "dropout": 0.0})
    plain = train(make_config(**common, out=str(tmp_path / "a")))
    saved = train(make_config(**common, gradient_checkpointing="both", out=str(tmp_path / "b")))
    a, b = adapter_weights(plain.model), adapter_weights(saved.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_selection_prefers_the_score_and_breaks_ties_by_val_loss():
    score = recipe.selection_score
    assert score({"map50": 0.4, "best_f1": 0.6, "val_loss": 3.0}, "map50_f1") > \
        score({"map50": 0.45, "best_f1": 0.5, "val_loss": 1.0}, "map50_f1")
    assert score({"map50": 0.0, "best_f1": 0.0, "val_loss": 3.0}, "map50_f1") > \
        score({"map50": 0.0, "best_f1": 0.0, "val_loss": 5.0}, "map50_f1")
    assert score({"val_loss": 2.0}, "map50_f1") == -2.0


def test_a_step_is_timed_in_training_mode_and_the_mode_is_put_back(make_config, monkeypatch):
    session = recipe.setup(make_config(), resume=False, log=lambda _: None)
    seen, loss = [], recipe.batch_loss
    monkeypatch.setattr(recipe, "batch_loss", lambda model, *a: seen.append(model.training) or loss(model, *a))
    session.model.eval()
    assert recipe.measure_step_seconds(session) > 0
    assert seen and all(seen)  # dropout and checkpointing cost in the timing what they cost in the loop
    assert not session.model.training


def test_automatic_evaluations_count_from_the_last_one_and_fixed_ones_keep_their_multiples():
    from types import SimpleNamespace

    def session(every_set, every, step, last):
        return SimpleNamespace(cfg=SimpleNamespace(eval_every=every_set), eval_every=every,
                               state=SimpleNamespace(step=step), evaluated_at=last)

    # re-spaced from 156 to 168 after evaluating at 312: not again at 336, but at 480
    assert not recipe.eval_due(session(None, 168, 336, 312), False)
    assert recipe.eval_due(session(None, 168, 480, 312), False)
    assert recipe.eval_due(session(100, 100, 300, 250), False)  # by hand: every multiple
    assert not recipe.eval_due(session(100, 100, 350, 300), False)
    assert recipe.eval_due(session(0, 0, 71, 0), True) and not recipe.eval_due(session(0, 0, 70, 0), False)


def test_a_run_trained_with_the_defect_crop_validates_and_predicts_tiled(make_config, strip_data, monkeypatch):
    from loomlens.evaluate import report
    from loomlens.predict import Predictor

    tiled, real = [], report.tiled_detect
    monkeypatch.setattr(report, "tiled_detect", lambda detect, image, tile, edge: tiled.append(tile) or real(detect, image, tile, edge))
    result = train(make_config(data=str(strip_data), augment={"crop": 1.0}, max_steps=2, eval_max_images=1))
    assert json.loads((result.run_dir / "crop.json").read_text()) == {"window": 64}  # the 64 px input
    assert tiled == [64]  # validation saw its one val strip (192 px > 2 x 64) as predict will
    predictor = Predictor(adapter=result.run_dir, precision="fp32", tta="off")  # one look: inputs are tiles
    assert predictor.tile_size == 64 and predictor.model_inputs(192, 64) > 1 and predictor.model_inputs(64, 48) == 1
    assert predictor.model_inputs(256, 256) == 25 + 9 + 1  # tiles, the middle view's 128 px windows, the frame


def test_lora_plus_moves_b_by_its_ratio_and_a_as_plain_lora(make_config, tmp_path):
    # B starts at zero, so A has no gradient on the first step and Adam moves each weight of B
    # by about lr whatever its gradient: one step at plus_ratio 4 leaves B four times as far
    # out as plain LoRA does, and A where it was.
    settings = dict(max_steps=1, warmup=0, schedule="constant", lr=1e-3, eval_every=0, lora={"r": 4, "dropout": 0})
    plain = adapter_weights(train(make_config(**settings, out=str(tmp_path / "a"))).model)
    plus = adapter_weights(train(make_config(**settings, out=str(tmp_path / "b"), **{"lora.plus_ratio": 4})).model)
    assert any("lora_B" in key for key in plain) and plain.keys() == plus.keys()
    for key in plain:
        want = 4 * plain[key] if "lora_B" in key else plain[key]
        torch.testing.assert_close(plus[key], want, rtol=1e-3, atol=1e-7, msg=key)


def test_each_evaluation_logs_the_val_frames_ok_ng_auroc(make_config, small_data):
    """Beside mAP, how well the model's defect probability tells the val frames with defects
    from those without: what a line's OK/NG decision will get."""
    val = [json.loads(line) for line in (small_data / "val.jsonl").read_text().splitlines()]
    kinds = {"<loc_" in s["suffix"] for s in val if s["task"] == "od"}
    assert kinds == {True, False}  # both kinds of frame, or there is no AUROC to log
    cfg = make_config(max_steps=2, eval_every=2, eval_max_images=4)
    train(cfg)
    (row,) = [r for r in csv.DictReader(open(cfg.out / "metrics.csv")) if r["val_loss"]]
    assert 0.0 <= float(row["auroc"]) <= 1.0 and row["map50"] != ""


def test_a_class_without_a_training_box_and_a_train_split_without_defects_are_warned(make_config, small_data,
                                                                                     tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "classes.txt").write_text("drop\nwrinkle\nknot\n")  # knot: all its boxes went to val or test
    said: list[str] = []
    recipe.setup(make_config(data=str(data)), resume=False, log=said.append)
    assert [line for line in said if line.startswith("warning: class")] == [
        "warning: class(es) knot have no box in the training samples, so the run cannot learn them; convert with "
        "--resplit, or label more images of them"]
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps({**r, "suffix": ""}) + "\n" for r in rows if r["task"] == "od"))
    said.clear()
    recipe.setup(make_config(data=str(data), out=str(tmp_path / "clean")), resume=False, log=said.append)
    assert any(line.startswith("warning: no training sample holds a defect box") for line in said), said


def test_a_run_without_a_val_split_says_so_and_keeps_its_last_weights_as_best(make_config, small_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "val.jsonl").write_text("")  # two images converted: nothing left for val
    said: list[str] = []
    result = train(make_config(data=str(data), max_steps=2), log=said.append)
    assert any(line.startswith("warning: no val split, so nothing is evaluated") for line in said), said
    best, last = result.run_dir / "checkpoints" / "best", result.run_dir / "checkpoints" / "last"
    assert (best / "adapter_model.safetensors").read_bytes() == (last / "adapter_model.safetensors").read_bytes()
    assert said[-1].endswith(f"best/ is the last step (no val split); run folder {result.run_dir}")
    # A val split of good frames only: evaluated, but blind to what matters.
    rows = [json.loads(line) for line in (small_data / "val.jsonl").read_text().splitlines()]
    (data / "val.jsonl").write_text("".join(json.dumps({**r, "suffix": ""}) + "\n" for r in rows if r["task"] == "od"))
    said.clear()
    recipe.setup(make_config(data=str(data), out=str(tmp_path / "clean-val")), resume=False, log=said.append)
    assert any(line.startswith("warning: the val split holds no defect box") for line in said), said
    # The seed's own lines name no task, so nothing says they answer boxes: no warning to give.
    (data / "val.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "task"}) + "\n"
                                            for r in rows))
    said.clear()
    recipe.setup(make_config(data=str(data), out=str(tmp_path / "seed-val")), resume=False, log=said.append)
    assert not any("val split" in line for line in said), said


def test_a_run_resumes_from_another_working_directory(make_config, small_data, tmp_path, monkeypatch):
    import os

    from loomlens.config import load_recorded

    monkeypatch.chdir(small_data.parent)
    cfg = make_config(data=small_data.name, max_steps=2, eval_every=0)  # relative, as typed in a shell
    train(cfg)
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["data"] == str(small_data.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # cron, a service: another working directory
    again = load_recorded(cfg.out / "config.yaml", {"out": str(cfg.out), "max_steps": "3",
                                                    "data": os.path.relpath(small_data, elsewhere)})
    assert train(again, resume=True).state.step == 3  # the same data, spelt from here, is no change


def test_the_progress_bar_stays_out_of_a_log_file(make_config, capsys):
    train(make_config(max_steps=2, eval_every=0, progress=True), log=lambda _: None)
    assert "train:" not in capsys.readouterr().err  # stderr is no terminal here, as in `train ... 2> log`


def test_validation_reads_as_many_boxes_as_the_densest_training_frame(make_config, small_data, tmp_path, monkeypatch):
    import shutil

    import loomlens.evaluate as evaluate
    from loomlens.data.florence_text import boxes_to_text
    from loomlens.data.records import Box

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    dense = [Box("drop", 2 * i, 2, 2 * i + 2, 6) for i in range(25)]  # 25 spots on one frame
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({**first, "prefix": "<OD>", "task": "od",
                            "suffix": boxes_to_text(dense, first["width"], first["height"])}) + "\n")
    asked = []
    real = evaluate.evaluate_jsonl
    monkeypatch.setattr(evaluate, "evaluate_jsonl", lambda *a, **k: asked.append(k["max_boxes"]) or real(*a, **k))
    train(make_config(data=str(data), max_steps=2, eval_every=2, eval_max_images=4), log=lambda _: None)
    assert asked == [25]
