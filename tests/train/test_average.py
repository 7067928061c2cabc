"""The moving average of the adapter's weights: its maths, that it is what a run evaluates and
saves while the raw weights train on, and that a checkpoint gives both back."""

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from loomlens.config import load_recorded
from loomlens.train import recipe
from loomlens.train.average import WeightAverage, decay_at
from loomlens.train.checkpoint import read_trainer_state
from loomlens.train.recipe import train


def test_the_decay_ramps_up_to_its_cap() -> None:
    assert decay_at(0.99, 1) == pytest.approx(2 / 11)
    assert decay_at(0.99, 90) == pytest.approx(91 / 100)
    assert decay_at(0.99, 10_000) == 0.99


def test_the_average_follows_the_weights_by_the_ramped_decay() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage({"w": w}, decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate([4.0, 8.0, -2.0], start=1):
        with torch.no_grad():
            w.fill_(value)
        average.update(step)
        keep = decay_at(0.5, step)
        expected = keep * expected + (1 - keep) * value
    torch.testing.assert_close(average.shadow["w"], expected)
    assert float(w[0]) == -2.0  # updating never touches the weights


def test_applied_swaps_the_average_in_and_the_raw_weights_back_even_on_an_error() -> None:
    w = torch.nn.Parameter(torch.full((2,), 3.0))
    average = WeightAverage({"w": w}, decay=0.9)
    average.shadow["w"].fill_(1.0)
    with average.applied() as raw:
        assert w.tolist() == [1.0, 1.0] and raw["w"].tolist() == [3.0, 3.0]
    assert w.tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError("evaluation failed")
    assert w.tolist() == [3.0, 3.0]


def test_loading_raw_weights_restarts_the_average_from_the_loaded_adapter() -> None:
    w = torch.nn.Parameter(torch.full((2,), 5.0))  # as the checkpoint's (averaged) adapter loaded it
    average = WeightAverage({"w": w}, decay=0.9)
    average.load_raw({"w": torch.full((2,), 7.0)})
    assert average.shadow["w"].tolist() == [5.0, 5.0] and w.tolist() == [7.0, 7.0]
    average.load_raw(None)  # saved without averaging: both start at the adapter
    assert average.shadow["w"].tolist() == [7.0, 7.0] and w.tolist() == [7.0, 7.0]
    with pytest.raises(ValueError, match=r"not this adapter's \(1 saved, 1 here; missing e.g. \['w'\]\)"):
        average.load_raw({"v": torch.zeros(2)})


def test_a_run_evaluates_saves_and_returns_the_average_of_its_steps(make_config, monkeypatch) -> None:
    """The adapter saved (and returned) is the average of every step's raw weights by the ramped
    decay, each evaluation sees that average, and last/ keeps the raw weights to resume from."""
    weights, evaluated = [], []  # the raw weights before the first step and after each one
    step_once, evaluate = recipe.optimizer_step, recipe._evaluate

    def trainable(s) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in s.adapter.named_parameters() if p.requires_grad}

    def record_step(s, loss):
        weights.extend([] if weights else [trainable(s)])
        found = step_once(s, loss)
        weights.append(trainable(s))
        return found

    def record_evaluation(s):
        evaluated.append(all(torch.equal(w, s.average.shadow[n]) for n, w in trainable(s).items()))
        return evaluate(s)

    monkeypatch.setattr(recipe, "optimizer_step", record_step)
    monkeypatch.setattr(recipe, "_evaluate", record_evaluation)
    cfg = make_config(max_steps=4, eval_every=2, ema_decay=0.998)
    result = train(cfg)
    assert len(weights) == 5 and evaluated == [True, True]
    expected = dict(weights[0])
    for step, raw in enumerate(weights[1:], start=1):
        keep = decay_at(0.998, step)
        expected = {n: keep * expected[n] + (1 - keep) * raw[n] for n in raw}
    returned = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
    for n in expected:
        torch.testing.assert_close(returned[n], expected[n], rtol=0, atol=1e-6, msg=n)
    assert any(not torch.allclose(returned[n], weights[-1][n]) for n in expected)  # not the last step's
    last = cfg.out / "checkpoints" / "last"
    raw = read_trainer_state(last)["raw"]
    assert raw.keys() == weights[-1].keys() and all(torch.equal(raw[n], weights[-1][n]) for n in raw)
    saved = load_file(last / "adapter_model.safetensors")
    as_saved = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    assert saved.keys() == as_saved.keys() and all(torch.equal(saved[k], as_saved[k]) for k in saved)


def test_without_averaging_a_run_saves_its_last_steps_weights(make_config) -> None:
    cfg = make_config(max_steps=4, ema_decay=0)
    result = train(cfg)
    assert read_trainer_state(cfg.out / "checkpoints" / "last")["raw"] is None
    saved = load_file(cfg.out / "checkpoints" / "last" / "adapter_model.safetensors")
    returned = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    assert all(torch.equal(saved[k], returned[k]) for k in saved)


def test_a_run_from_before_averaging_resumes_without_it(make_config) -> None:
    cfg = make_config(max_steps=2, ema_decay=0)
    train(cfg)
    recorded = cfg.out / "config.yaml"
    recorded.write_text("\n".join(line for line in recorded.read_text().splitlines() if "ema_decay" not in line))
    again = load_recorded(recorded, {"max_steps": 3})  # as `train --resume RUN --max-steps 3` reads it
    assert again.ema_decay == 0
    assert train(again, resume=True).state.step == 3
    assert read_trainer_state(cfg.out / "checkpoints" / "last")["raw"] is None
