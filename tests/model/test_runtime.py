"""The machine a model runs on: the one device rule, and freed memory kept for reuse (its
effect on page faults is measured by `python -m bench.page_faults`, not asserted here)."""

import sys

import pytest
import torch

from loomlens.model.runtime import keep_freed_memory, resolve_device


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False


def test_auto_is_cuda_when_present_else_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:0:1", ""])
def test_an_unknown_device_name_is_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="unknown device.*auto.*cpu.*cuda:N"):
        resolve_device(name)


def test_a_device_this_torch_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="cuda was asked for, but this torch sees none"):
        resolve_device("cuda")
