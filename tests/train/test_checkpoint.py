"""Checkpoints are swapped in whole: a crash mid-save never leaves a broken last/."""

import json
import os
import random

import numpy as np

import pytest
import torch

from loomlens.train import checkpoint as ck
from loomlens.data import atomic
from loomlens.data.atomic import recover_folder
from loomlens.train.checkpoint import TrainerState, save_checkpoint


class FakeAdapter:
    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, folder, **_):
        os.makedirs(folder, exist_ok=True)  # as peft does
        (folder / "adapter_model.safetensors").write_text(self.tag)
        if self.fail:
            raise OSError("disk full")


def save(path, tag, fail=False):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    save_checkpoint(path, model=FakeAdapter(tag, fail), optimizer=optimizer, state=TrainerState(step=len(tag)),
                    rng=[ck.rng_states()])


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last"
    save(last, "one")
    with pytest.raises(OSError):
        save(last, "two", fail=True)
    assert (last / "adapter_model.safetensors").read_text() == "one"
    save(last, "three")  # the leftover temporary folder does not get in the way
    assert (last / "adapter_model.safetensors").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_kill_between_the_renames_is_recovered(tmp_path, monkeypatch):
    last = tmp_path / "last"
    save(last, "one")
    real, calls = os.rename, []

    def killed(src, dst):
        calls.append(1)
        if len(calls) == 2:  # last -> .last.old done, .last.tmp -> last not yet
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save(last, "two")
    monkeypatch.setattr(atomic.os, "rename", real)
    assert not last.exists()
    recover_folder(last)
    assert (last / "adapter_model.safetensors").read_text() == "one"
    assert ck.read_trainer_state(last)["state"]["step"] == 3


class WritesAMarker:
    """A pickle that, when unpickled, would write a file: what a crafted run folder could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("pwned")


def _adamw_after_a_step():
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    return optimizer


def test_the_trainer_state_round_trips_without_pickle(tmp_path):
    optimizer = _adamw_after_a_step()
    torch.manual_seed(7)
    save_checkpoint(tmp_path / "last", model=FakeAdapter("x"), optimizer=optimizer, state=TrainerState(step=4),
                    rng=[ck.rng_states()])
    expected = torch.rand(3), np.random.rand(), random.random()
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == [
        "adapter_model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    saved = ck.read_trainer_state(tmp_path / "last")
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    ck.load_optimizer(fresh, saved["optimizer"])
    for name, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][name], value)
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    ck.set_rng_states(saved["rng"][0])
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(), random.random()) == expected[1:]


def test_a_legacy_trainer_state_loads_through_the_safe_loader(tmp_path):
    optimizer = _adamw_after_a_step()
    legacy_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    (tmp_path / "last").mkdir()
    torch.save({"state": {"step": 5}, "optimizer": optimizer.state_dict(), "scaler": None, "rng": [legacy_rng]},
               tmp_path / "last" / "trainer_state.pt")
    expected = np.random.rand(), random.random()
    saved = ck.read_trainer_state(tmp_path / "last")
    assert saved["state"]["step"] == 5
    ck.set_rng_states(saved["rng"][0])
    assert (np.random.rand(), random.random()) == expected


def test_a_trainer_state_with_a_retired_key_still_loads(tmp_path, monkeypatch):
    """A checkpoint written while `TrainerState` had `evals_since_best` resumes (the key is
    dropped); a key this version does not know at all is still refused."""
    import peft
    from safetensors.torch import save_file

    last = tmp_path / "last"
    save(last, "old")
    save_file({"w": torch.zeros(1)}, last / "adapter_model.safetensors")  # stands for peft's file
    monkeypatch.setattr(peft, "set_peft_model_state_dict", lambda model, weights: None)
    path = last / "trainer_state.json"
    saved = json.loads(path.read_text())
    saved["state"]["evals_since_best"] = 2
    path.write_text(json.dumps(saved))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert ck.load_checkpoint(last, model=None, optimizer=optimizer) == TrainerState(step=3)
    saved["state"]["from_a_newer_version"] = 1
    path.write_text(json.dumps(saved))
    with pytest.raises(TypeError, match="from_a_newer_version"):
        ck.load_checkpoint(last, model=None, optimizer=optimizer)


def test_a_malicious_trainer_state_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    last = tmp_path / "their-run" / "checkpoints" / "last"
    last.mkdir(parents=True)
    torch.save({"state": WritesAMarker(marker)}, last / "trainer_state.pt")
    with pytest.raises(ck.UnsafeCheckpointError, match=r"refusing to read .*trainer_state\.pt.*never unpickles"):
        ck.read_trainer_state(last)
    assert not marker.exists()
