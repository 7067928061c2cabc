"""QLoRA refusals say what is missing and how to fix it; each process loads onto its own GPU."""

from __future__ import annotations

import sys

import pytest
import torch

from loomlens.model import lora
from loomlens.model.lora import QloraUnavailable, lift_zero_rows, load_quantized_base, quantized_device_map


def test_dora_on_a_4bit_base_is_refused_before_anything_loads(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("nothing may load before the refusal")

    monkeypatch.setattr(lora, "qlora_missing", no_load)  # the refusal comes before any check or load
    with pytest.raises(QloraUnavailable, match="DoRA cannot train on a 4-bit base.*lora.dora=false"):
        load_quantized_base("no-such-model", dora=True)


def test_dora_on_packed_weights_names_the_layer_instead_of_crashing():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    model.proj.weight = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(QloraUnavailable, match="DoRA cannot train proj.*packed torch.uint8"):
        lift_zero_rows(model, ["proj"])


def test_without_cuda_the_message_names_cuda_and_the_cpu_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QloraUnavailable, match="CUDA GPU.*drop --qlora"):
        load_quantized_base("tiny")


def test_without_bitsandbytes_the_message_names_only_it_and_the_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(QloraUnavailable) as err:
        load_quantized_base("tiny")
    assert "pip install bitsandbytes" in str(err.value) and "CUDA" not in str(err.value)


def test_each_process_loads_onto_its_own_device():
    assert quantized_device_map(3) == {"": 3}
    assert quantized_device_map() == {"": 0}  # a single process: its own device is GPU 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_4bit_base_loads_and_takes_a_plain_lora():
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    from loomlens.config import LoraSettings
    from loomlens.model.lora import apply_lora

    model, _ = load_quantized_base("tiny")
    assert next(model.parameters()).device == torch.device("cuda", 0)
    peft_model = apply_lora(model, LoraSettings(targets="attention", r=4))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
