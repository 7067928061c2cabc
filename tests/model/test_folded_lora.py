"""LoRA layers in the folded or dense form compute what peft's form computes, with the same
gradients; under autocast, or over a bf16 base, the update is not rounded away."""

import copy

import pytest
import torch
from torch import nn

from loomlens.model import folded_lora
from loomlens.model.folded_lora import fold_lora, lora_form
from loomlens.model.lora import LoraSettings, apply_lora, lower_frozen


@pytest.fixture(scope="module")
def built():
    from loomlens.model.tiny import build_tiny

    model, processor, _ = build_tiny(seed=0)
    return model, processor


@pytest.fixture(scope="module")
def inputs(built):
    from PIL import Image

    image = Image.new("RGB", (80, 60), (90, 40, 20))
    batch = built[1](text=["<OD>", "<OD>"], images=[image] * 2, return_tensors="pt", padding=True)
    return {**batch, "decoder_input_ids": torch.tensor([[2, 0, 30, 40, 1500], [2, 0, 50, 1600, 1700]])}


def _adapted(model: nn.Module, settings: LoraSettings) -> nn.Module:
    peft = apply_lora(copy.deepcopy(model), settings)
    torch.manual_seed(1)
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # fresh B is zero: make the update count
            nn.init.normal_(param, std=0.05)
    return peft


def _loss_and_grads(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).logits.float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_form_never_folds_where_matmuls_round():
    """Which form is *faster* is measured by `python -m bench.lora_forms`; what must hold
    whatever the costs: under autocast or a bf16 base a layer never folds (the sum W + D would
    round the update away), and in fp32 it never takes the dense form."""
    for shape in ((32768, 32, 128, 32), (112, 192, 1876, 32), (4800, 768, 768, 8)):
        assert lora_form(*shape, rounded=True) in ("dense", "peft")
        assert lora_form(*shape, rounded=False) in ("fold", "peft")


def test_folded_model_matches_peft_forward_and_gradients(built, inputs):
    settings = LoraSettings(targets="seed", r=16, dropout=0.0)
    reference = _adapted(built[0], settings)
    folded = copy.deepcopy(reference)
    assert fold_lora(folded) == sum(1 for n, _ in reference.named_parameters() if "lora_A" in n)
    for a, b in zip(reference.parameters(), folded.parameters(), strict=True):
        assert torch.equal(a, b)
    loss, grads = _loss_and_grads(reference, inputs)
    folded_loss, folded_grads = _loss_and_grads(folded, inputs)
    torch.testing.assert_close(folded_loss, loss, rtol=1e-5, atol=1e-5)
    assert folded_grads.keys() == grads.keys() and any("vision_tower" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    # what peft saves does not change: the same parameter names and tensors
    assert folded.state_dict().keys() == reference.state_dict().keys()


def test_under_autocast_the_model_computes_what_peft_computes(built, inputs):
    """bf16 autocast: the dense and low-rank forms (weights cast, a bf16 input left as it is)
    give the tiny model peft's own loss and gradients, up to bf16 rounding."""
    settings = LoraSettings(targets="seed", r=16, dropout=0.0)
    reference = _adapted(built[0], settings)
    ours = copy.deepcopy(reference)
    fold_lora(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(reference, inputs)
        our_loss, our_grads = _loss_and_grads(ours, inputs)
    torch.testing.assert_close(our_loss, loss, rtol=1e-3, atol=1e-3)
    assert our_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert float((our_grads[name] - grad).norm()) <= 0.02 * float(grad.norm()) + 1e-6, name


def _layer(fan_in: int, fan_out: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=32, target_modules=["0"], lora_dropout=0.0)
    layer = get_peft_model(nn.Sequential(nn.Linear(fan_in, fan_out)), config)
    nn.init.normal_(layer.base_model.model[0].lora_B["default"].weight, std=1e-3)
    return layer


def _grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.dtype == (torch.bfloat16 if autocast or x.dtype == torch.bfloat16 else torch.float32)
    (out.float() * g).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_error(ours: dict, exact: dict) -> dict[str, float]:
    assert ours.keys() == exact.keys() and len(exact) == 2  # A and B, nothing else trains
    return {name: float((ours[name].float() - grad).norm() / grad.norm()) for name, grad in exact.items()}


@pytest.mark.parametrize("fan_in, fan_out, form", [(32, 128, "dense"), (96, 384, "peft")])
def test_rounded_forms_give_peft_bf16_gradients(fan_in, fan_out, form, monkeypatch):
    """Under autocast a layer never folds; over a bf16 base (`lower_frozen`, no autocast) it
    runs the dense or the low-rank form in bf16 with fp32 A and B. Either way A's and B's
    gradients are fp32 and as close to the exact fp32 ones as peft's own bf16 autocast gets."""
    layer = _layer(fan_in, fan_out)
    x, g = torch.randn(4096, fan_in), torch.randn(4096, fan_out)
    monkeypatch.setattr(folded_lora, "lora_form", lambda *_, **__: form)  # each form, whatever it costs
    exact, peft_bf16 = _grads(layer, x, g, False), _grads(layer, x, g, True)
    budget = {name: 2 * error + 1e-3 for name, error in _relative_error(peft_bf16, exact).items()}
    autocast = copy.deepcopy(layer)
    fold_lora(autocast)
    low = copy.deepcopy(layer)
    lower_frozen(low, torch.bfloat16)
    fold_lora(low)
    assert low.base_model.model[0].base_layer.weight.dtype == torch.bfloat16
    for ours in (_grads(autocast, x, g, True), _grads(low, x.bfloat16(), g, False)):
        assert all(grad.dtype == torch.float32 for grad in ours.values())
        for name, error in _relative_error(ours, exact).items():
            assert error <= budget[name], name


def test_layers_that_cannot_fold_exactly_keep_peft_forward(built, inputs):
    for settings in (LoraSettings(targets="seed", r=4, dropout=0.1), LoraSettings(targets=["q_proj", "v_proj"], r=4, dropout=0.0,
                                                                                  dora=True)):
        assert fold_lora(_adapted(built[0], settings)) == 0


def test_a_merged_adapter_falls_back_to_peft(built, inputs):
    peft = _adapted(built[0], LoraSettings(targets="seed", r=16, dropout=0.0))
    peft.eval()
    with torch.no_grad():
        expected = peft(**inputs).logits
        fold_lora(peft)
        peft.merge_adapter()  # the update is in the base weights now: folding again would double it
        torch.testing.assert_close(peft(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        peft.unmerge_adapter()
        with peft.disable_adapter():
            plain = peft(**inputs).logits
        assert not torch.allclose(plain, expected, atol=1e-3)
