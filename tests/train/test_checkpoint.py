"""Checkpoints are swapped in whole: a crash mid-save never leaves a broken last/."""

import os

import pytest
import torch

from loomlens.train import checkpoint as ck
from loomlens.train.checkpoint import TrainerState, recover, save_checkpoint


class FakeAdapter:
    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, folder, **_):
        os.makedirs(folder)
        (folder / "adapter_model.safetensors").write_text(self.tag)
        if self.fail:
            raise OSError("disk full")


def save(path, tag, fail=False):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    save_checkpoint(path, FakeAdapter(tag, fail), optimizer, TrainerState(step=len(tag)), [ck.rng_states()])


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

    monkeypatch.setattr(ck.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save(last, "two")
    monkeypatch.setattr(ck.os, "rename", real)
    assert not last.exists()
    recover(last)
    assert (last / "adapter_model.safetensors").read_text() == "one"
    assert torch.load(last / "trainer_state.pt", weights_only=False)["state"]["step"] == 3
