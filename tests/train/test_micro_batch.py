"""`speed.micro_batch`: a batch in passes that fit memory, the same steps and schedule, recorded
and kept on resume; `auto` probes on CUDA only (a fake out-of-memory stands in for one here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from loomlens.config import TrainConfig, load_config
from loomlens.model import memory
from loomlens.train import micro_batch, recipe
from loomlens.train.recipe import setup, train

from .conftest import assert_same_steps

EXACT = {"shuffle": False, "lora": {"r": 4, "dropout": 0.0}}  # no dropout: splitting a batch changes nothing


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def fake_cuda(monkeypatch, *, fits: int) -> list[tuple[int, int]]:
    """Run the real probe step as if on CUDA, raising out-of-memory above `fits` samples; returns
    what was tried: (samples, the padded answer length of the batch the step ran, 0 if none)."""
    tried: list[tuple[int, int]] = []
    widths, real_loss = [], micro_batch.batch_loss

    def loss_spy(model, batch, spec):
        widths.append(batch["labels"].shape[1])
        return real_loss(model, batch, spec)

    def find(step, requested, device):
        def oom_above(size: int) -> None:
            widths.clear()
            if size > fits:
                tried.append((size, 0))
                raise torch.cuda.OutOfMemoryError("fake")
            step(size)
            tried.append((size, widths[0]))

        monkeypatch.setattr(micro_batch, "batch_loss", loss_spy)
        try:
            return memory.find_micro_batch(oom_above, requested, "cuda")
        finally:
            monkeypatch.setattr(micro_batch, "batch_loss", real_loss)

    monkeypatch.setattr(micro_batch, "find_micro_batch", find)
    return tried


def spy_windows(monkeypatch) -> list[list[int]]:
    """Samples in each micro-batch of each window the loop accumulates."""
    windows, real = [], recipe.forward_backward

    def spy(s, micro):
        windows.append([len(batch["labels"]) for batch in micro])
        return real(s, micro)

    monkeypatch.setattr(recipe, "forward_backward", spy)
    return windows


def test_cpu_auto_is_the_whole_batch_and_nothing_is_probed(make_config, monkeypatch):
    monkeypatch.setattr(micro_batch, "probe_step", lambda s: lambda size: pytest.fail("a CPU run probes nothing"))
    windows, said = spy_windows(monkeypatch), []
    cfg = make_config(max_steps=2, eval_every=0)
    assert cfg.speed.micro_batch == "auto"
    train(cfg, log=said.append)
    assert windows == [[4], [4]]
    assert "micro-batch 4 (auto: no probe on cpu): whole batches; 4 samples an optimizer step" in said
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["speed"]["micro_batch"] == 4


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_step(make_config, monkeypatch, tmp_path):
    """Batch 4 does not fit: 2 x 2 passes a batch, the same 2 steps of 4 samples, the same weights."""
    common = {**EXACT, "max_steps": 2, "eval_every": 0}
    whole = train(make_config(**common, out=str(tmp_path / "whole")))
    tried = fake_cuda(monkeypatch, fits=2)
    windows, said = spy_windows(monkeypatch), []
    cfg = make_config(**common, out=str(tmp_path / "split"))
    split = train(cfg, log=said.append)

    assert [size for size, _ in tried] == [4, 2]
    assert tried[1][1] == max(len(ex.labels) for ex in split_set(cfg).examples)  # the longest answer is in it
    assert windows == [[2, 2], [2, 2]] and split.state.step == whole.state.step == 2
    assert "micro-batch 2 (auto: 4 samples did not fit on cpu): each batch of 4 in 2 passes, gradients " \
           "accumulated; 4 samples an optimizer step" in said
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["speed"]["micro_batch"] == 2
    assert_same_steps(adapter_weights(whole.model), adapter_weights(split.model), rtol=1e-4, atol=1e-6)


def split_set(cfg: TrainConfig):
    from loomlens.data.dataset import FlorenceDataset
    from loomlens.model import load_model

    _, processor = load_model(str(cfg.model))
    return FlorenceDataset(cfg.data / "train.jsonl", processor)


def test_a_probe_that_fits_changes_nothing_the_run_does(make_config, monkeypatch, tmp_path):
    """Dropout on: the probe puts the RNG states and the gradients back, so the run is the one
    that was never probed, to the bit."""
    plain = train(make_config(max_steps=2, eval_every=0, out=str(tmp_path / "a")))
    tried = fake_cuda(monkeypatch, fits=4)
    probed = train(make_config(max_steps=2, eval_every=0, out=str(tmp_path / "b")))
    assert [size for size, _ in tried] == [4]
    a, b = adapter_weights(plain.model), adapter_weights(probed.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_step_of_4_has_the_gradients_of_2_micro_batches_of_2(make_config, tmp_path):
    grads, losses = [], []
    for micro in (4, 2):
        s = setup(make_config(**EXACT, micro_batch=micro, out=str(tmp_path / str(micro))), resume=False,
                  log=lambda _: None)
        s.model.train()
        window = next(recipe.window_batches(s, recipe.epoch_windows(s)))
        assert [len(b["labels"]) for b in window] == ([4] if micro == 4 else [2, 2])
        losses.append(recipe.forward_backward(s, window))
        grads.append({n: p.grad.clone() for n, p in s.adapter.named_parameters() if p.requires_grad})
        if s.metrics:
            s.metrics.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_resume_keeps_the_recorded_micro_batch(make_config, monkeypatch, train_killed):
    cfg = make_config(max_steps=3, eval_every=0, save_every=1, micro_batch=2)
    train_killed(cfg, 1)
    monkeypatch.setattr(micro_batch, "find_micro_batch", lambda *a: pytest.fail("a resumed run is not probed"))
    windows, said = spy_windows(monkeypatch), []
    resumed = train(make_config(max_steps=3, eval_every=0, save_every=1), resume=True,
                    log=said.append)  # auto: as recorded
    assert resumed.state.step == 3 and len(windows) == 2 and windows[0] == [2, 2]
    assert all(size <= 2 for window in windows for size in window)
    assert any(line.startswith("micro-batch 2 (recorded by the run)") for line in said)
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["speed"]["micro_batch"] == 2
    said.clear()  # the CLI resumes with the settings config.yaml records: the recorded number itself
    longer = load_config(TrainConfig, cfg.out / "config.yaml", {"max_steps": "4"})
    assert train(longer, resume=True, log=said.append).state.step == 4
    assert any(line.startswith("micro-batch 2 (recorded by the run)") for line in said)


def test_a_run_recorded_before_the_setting_resumes_with_whole_batches(make_config, monkeypatch, train_killed):
    cfg = make_config(max_steps=2, eval_every=0, save_every=1)
    train_killed(cfg, 1)
    saved = yaml.safe_load((cfg.out / "config.yaml").read_text())
    del saved["speed"]["micro_batch"]
    (cfg.out / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setattr(micro_batch, "find_micro_batch", lambda *a: pytest.fail("a resumed run is not probed"))
    windows = spy_windows(monkeypatch)
    assert train(make_config(max_steps=2, eval_every=0, save_every=1), resume=True).state.step == 2
    assert len(windows) == 1 and len(windows[0]) == 1  # one pass a batch


@pytest.mark.parametrize(("value", "says"), [
    ("3", "speed.micro_batch 3 does not divide batch_size 8: use one of 1, 2, 4, 8, or auto"),
    ("16", "speed.micro_batch 16 does not divide batch_size 8"),
    ("0", "speed.micro_batch must be auto or a number of samples"),
    ("true", "takes a number, not true (YAML reads true, yes and on as a switch, and so does --micro_batch given no "
             "value): give it a number or auto, as micro_batch=N"),
    ("half", "speed.micro_batch must be auto or a number of samples (1 or more, dividing batch_size), got 'half'"),
])
def test_a_bad_micro_batch_names_the_key_and_the_fix(value, says):
    with pytest.raises(ValueError) as err:  # pydantic's ValidationError is one
        load_config(TrainConfig, overrides={"data": "d", "micro_batch": value})
    assert says in str(err.value)


def test_micro_batch_is_read_wherever_it_is_given():
    assert load_config(TrainConfig, overrides={"data": "d", "speed.micro_batch": "2"}).speed.micro_batch == 2
    assert load_config(TrainConfig, overrides={"data": "d", "micro-batch": "auto"}).speed.micro_batch == "auto"
    assert load_config(TrainConfig, base={"data": "d", "speed": {"micro_batch": "4"}}).speed.micro_batch == 4


def test_batches_split_in_order_and_the_probe_starts_from_the_longest():
    assert micro_batch.split_batch([5, 1, 7, 3], 2) == [[5, 1], [7, 3]]
    assert micro_batch.split_batch([5, 1, 7], 2) == [[5, 1], [7]]  # an epoch's short last batch
    ex = [SimpleNamespace(input_ids=(0,) * p, labels=(0,) * a) for p, a in [(3, 3), (9, 2), (3, 8), (3, 5), (4, 4)]]
    data = SimpleNamespace(examples=ex, lengths=[len(e.input_ids) + len(e.labels) for e in ex])
    # the longest prompt and the longest answer first (a batch pads to both), then by length
    assert micro_batch.longest_samples(data, 4) == [1, 2, 3, 4]
    assert micro_batch.longest_samples(data, 1) == [1]
    assert micro_batch.longest_samples(data, 9) == [1, 2, 3, 4, 0]


def test_cut_pieces_keeps_every_sample_in_order():
    batch = {"labels": torch.arange(8).view(4, 2), "pixel_values": torch.arange(4).view(4, 1, 1, 1).float()}
    small = {"labels": torch.zeros(1, 2, dtype=torch.long), "pixel_values": torch.zeros(1, 1, 1, 1)}
    pieces = micro_batch.cut_pieces([batch, small], 2)
    assert [len(p["labels"]) for p in pieces] == [2, 2, 1] and pieces[2] is small
    assert torch.equal(torch.cat([p["labels"] for p in pieces[:2]]), batch["labels"])
    assert memory.smaller_micro_batch(8, 8) == 4 and memory.smaller_micro_batch(6, 6) == 3
    assert memory.smaller_micro_batch(3, 6) == 1 and memory.smaller_micro_batch(1, 6) is None


def out_of_memory_above(monkeypatch, samples: int, *, from_call: int) -> None:
    """From the `from_call`-th pass on, a training pass of more than `samples` runs out of memory."""
    calls, real = [0], recipe.batch_loss

    def loss(model, batch, spec):
        calls[0] += 1
        if model.training and calls[0] >= from_call and len(batch["labels"]) > samples:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(model, batch, spec)

    monkeypatch.setattr(recipe, "batch_loss", loss)


def test_out_of_memory_mid_run_halves_the_micro_batch_and_keeps_the_steps(make_config, monkeypatch, tmp_path):
    """Step 3's pass of 4 runs out of memory: that window is made again in passes of 2 and so is
    every later one; the weights are those of the run that never ran out, and a resume takes 2."""
    common = {**EXACT, "max_steps": 4, "eval_every": 0}
    whole = train(make_config(**common, out=str(tmp_path / "whole")))
    out_of_memory_above(monkeypatch, 2, from_call=3)
    cfg = make_config(**common, out=str(tmp_path / "shrunk"))
    shrunk = train(cfg)
    assert shrunk.state.step == 4
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["speed"]["micro_batch"] == 2
    events = (cfg.out / "metrics.csv").read_text()
    assert "CUDA out of memory with 4 samples a pass: micro-batch 2 from here, the step unchanged" in events
    a, b = adapter_weights(whole.model), adapter_weights(shrunk.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    said = []
    resumed = train(make_config(**{**common, "max_steps": 5}, out=str(cfg.out)), resume=True, log=said.append)
    assert resumed.state.step == 5 and any(line.startswith("micro-batch 2 (recorded by the run)") for line in said)


def test_out_of_memory_with_one_sample_a_pass_says_how_to_go_on(make_config, monkeypatch, tmp_path):
    out_of_memory_above(monkeypatch, 0, from_call=1)
    cfg = make_config(**EXACT, max_steps=2, eval_every=0, micro_batch=1, out=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match=r"with 1 sample\(s\) a pass; nothing was saved yet: start again with "
                                           r"speed.gradient_checkpointing=both"):
        train(cfg)
    monkeypatch.undo()
    out_of_memory_above(monkeypatch, 0, from_call=5)  # step 2 (step 1, saved, made 4 passes of 1)
    cfg = make_config(**EXACT, max_steps=3, eval_every=0, save_every=1, micro_batch=1, out=str(tmp_path / "saved"))
    with pytest.raises(RuntimeError, match=r"the last save is in .*last: resume with `loomlens train --resume "
                                           r".*saved` and speed.gradient_checkpointing=both"):
        train(cfg)


def test_a_resumed_run_may_pass_its_steps_in_smaller_pieces(make_config, tmp_path):
    common = {**EXACT, "max_steps": 2, "eval_every": 0, "out": str(tmp_path / "run")}
    train(make_config(**common))
    train(make_config(**{**common, "max_steps": 3}, micro_batch=2, gradient_checkpointing="both"), resume=True)
    (amended,) = yaml.safe_load((tmp_path / "run" / "amendments.yaml").read_text())
    assert amended["step"] == 2 and set(amended["changes"]) >= {"speed.micro_batch", "speed.gradient_checkpointing"}
