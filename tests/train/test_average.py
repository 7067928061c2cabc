"""The moving average of the adapter's weights: its maths, that it is what a run evaluates and
saves while the raw weights train on, and that a checkpoint gives both back."""

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from loomlens.train.average import WeightAverage, decay_at
from loomlens.train.checkpoint import read_trainer_state
from loomlens.train.recipe import train


def test_the_decay_ramps_up_to_its_cap() -> None:
    assert decay_at(0.99, 1) == pytest.approx(2 / 11)
    assert decay_at(0.99, 90) == pytest.approx(91 / 100)
    assert decay_at(0.99, 10_000) == 0.99


def test_the_average_follows_the_weights_by_the_ramped_decay() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([w], decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate([4.0, 8.0, -2.0], start=1):
        with torch.no_grad():
            w.fill_(value)
        average.update(step)
        keep = decay_at(0.5, step)
        expected = keep * expected + (1 - keep) * value
    torch.testing.assert_close(average.shadow[0], expected)
    assert float(w[0]) == -2.0  # updating never touches the weights


def test_applied_swaps_the_average_in_and_the_raw_weights_back_even_on_an_error() -> None:
    w = torch.nn.Parameter(torch.full((2,), 3.0))
    average = WeightAverage([w], decay=0.9)
    average.shadow[0].fill_(1.0)
    with average.applied() as raw:
        assert w.tolist() == [1.0, 1.0] and raw[0].tolist() == [3.0, 3.0]
    assert w.tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError("evaluation failed")
    assert w.tolist() == [3.0, 3.0]


def test_loading_raw_weights_restarts_the_average_from_the_loaded_adapter() -> None:
    w = torch.nn.Parameter(torch.full((2,), 5.0))  # as the checkpoint's (averaged) adapter loaded it
    average = WeightAverage([w], decay=0.9)
    average.load_raw([torch.full((2,), 7.0)])
    assert average.shadow[0].tolist() == [5.0, 5.0] and w.tolist() == [7.0, 7.0]
    average.load_raw([])  # saved without averaging: both start at the adapter
    assert average.shadow[0].tolist() == [7.0, 7.0] and w.tolist() == [7.0, 7.0]
    with pytest.raises(ValueError, match="holds 2 raw weights, this adapter has 1"):
        average.load_raw([torch.zeros(2), torch.zeros(2)])


def lora(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_a_run_saves_and_returns_the_average_and_keeps_its_raw_weights_to_resume(make_config) -> None:
    cfg = make_config(max_steps=4, ema_decay=0.99)
    result = train(cfg)
    last = cfg.out / "checkpoints" / "last"
    saved = load_file(last / "adapter_model.safetensors")
    raw = read_trainer_state(last)["raw"]
    weights = lora(result.model)
    assert len(raw) == len(weights) == len(saved)
    # The model returned is the one saved (the average), and it is not the last step's weights.
    returned = get_peft_model_state_dict(result.model, save_embedding_layers=False)  # as a checkpoint saves it
    assert saved.keys() == returned.keys()
    for key in saved:
        assert torch.equal(saved[key], returned[key]), key
    assert any(not torch.allclose(w, r) for w, r in zip(weights.values(), raw))


def test_without_averaging_a_run_saves_its_last_steps_weights(make_config) -> None:
    cfg = make_config(max_steps=4, ema_decay=0)
    result = train(cfg)
    assert read_trainer_state(cfg.out / "checkpoints" / "last")["raw"] is None
    saved = load_file(cfg.out / "checkpoints" / "last" / "adapter_model.safetensors")
    returned = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    for key in saved:
        assert torch.equal(saved[key], returned[key]), key
