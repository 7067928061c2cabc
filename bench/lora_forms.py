"""Which LoRA form is fastest for a layer's shapes, and does `lora_form` pick it?

    python -m bench.lora_forms [--repeats 5]

Times forward+backward of one peft LoRA layer in each exact form `model/folded_lora.py` can
run (fp32: folded or peft's; bf16 autocast: dense or low-rank), for the shapes the cost model
(`ELEMENT_COST`) was fitted on: the tiny model's DaViT stage 0 MLP at batch 8, its encoder
layers, its lm_head over a short answer, and Florence-2-base's 768-wide layers at r=8. Prints
one row per shape: seconds per form, the fastest, and `lora_form`'s pick. Figures and the
fit: docs/training.md ("What makes a step fast on a CPU").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from loomlens.model import folded_lora
from loomlens.model.folded_lora import fold_lora, lora_form

#: (tokens, fan_in, fan_out, rank) of the layers the cost model was fitted on.
SHAPES = [(32768, 32, 128, 32), (2152, 192, 192, 32), (112, 192, 1876, 32), (4800, 768, 768, 8),
          (4800, 768, 3072, 8), (8192, 96, 384, 32)]


def layer(fan_in: int, fan_out: int, rank: int) -> nn.Module:
    """A peft LoRA layer over one `nn.Linear`, computed by `fold_lora`'s forward."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(nn.Sequential(nn.Linear(fan_in, fan_out)),
                         LoraConfig(r=rank, target_modules=["0"], lora_dropout=0.0))
    fold_lora(net)
    return net


def seconds(net: nn.Module, x: torch.Tensor, form: str, rounded: bool, repeats: int) -> float:
    """Best forward+backward time of `net` on `x` with every call forced to `form`."""
    real = folded_lora.lora_form
    folded_lora.lora_form = lambda *_, **__: form
    try:
        best = float("inf")
        for _ in range(repeats + 1):  # the first round warms up
            net.zero_grad(set_to_none=True)
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rounded):
                out = net(x)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        folded_lora.lora_form = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for tokens, fan_in, fan_out, rank in SHAPES:
        net, x = layer(fan_in, fan_out, rank), torch.randn(tokens, fan_in)
        for rounded, forms in ((False, ("fold", "peft")), (True, ("dense", "peft"))):
            times = {form: seconds(net, x, form, rounded, args.repeats) for form in forms}
            rows.append({"shape": [tokens, fan_in, fan_out, rank], "bf16": rounded, "seconds": times,
                         "fastest": min(times, key=times.get),
                         "picked": lora_form(tokens, fan_in, fan_out, rank, rounded=rounded)})
    print(json.dumps(rows, indent=1))
    print(f"lora_form picks the fastest form in {sum(r['fastest'] == r['picked'] for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
