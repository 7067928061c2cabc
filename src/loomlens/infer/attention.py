"""Attention kernels chosen per call shape, for inference on a CPU.

In: a Florence-2 model. Out: the same model with every attention layer routed through
`shape_aware`. Florence-2 runs three kinds of attention and no one CPU kernel is fastest for all,
nor is the fastest one the same on every CPU: DaViT's channel attention, whose "head dim" is the
number of image tokens over a small score matrix, always runs fastest on the plain
matmul-softmax-matmul ("math") path, since SDPA's CPU kernel tiles along that long axis; for
DaViT's windows, BART's encoder and the decoder's one-query steps it depends on the CPU and
the dtype (on an AVX512 CPU without AMX, SDPA's bf16 kernel took 2-7x the math path's time on
the one-query cross-attention, where on a CPU with AMX SDPA was the faster: docs/benchmarks.md).

`shape_aware` sends heads wider than `WIDE_HEAD` to the math path, and times both kernels on
the first call of every other shape class (`_math_is_faster`), keeping SDPA unless the math
path wins by `MARGIN`. The choice is kept for the machine (`CACHE_FILE` under
`model.runtime.cache_dir()`, per `machine_signature()`), so later processes reuse it instead of
timing anew: in bf16 the two kernels round differently, and a shape whose timings sit near the
margin would otherwise take one kernel in one run and the other in the next, and move answers.

`shape_aware` is registered with transformers' `AttentionInterface`, so the native
Florence-2 classes call it, and with its `AttentionMaskInterface` as SDPA's masks: transformers
builds no mask at all for an attention name it has no mask function for, and a batch whose
prompts pad differently then attended to its padding.
Training keeps its own choice (`train.recipe.attention_implementation`): eager on a CPU,
where SDPA's bf16 backward on the windows is slow.
"""

from __future__ import annotations

import json
import math
import threading
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loomlens.data.atomic import atomic_write
from loomlens.model.runtime import cache_dir, machine_signature

__all__ = ["NAME", "WIDE_HEAD", "shape_aware", "use_shape_aware_attention"]

#: The name the kernel is registered under (`model.config._attn_implementation`).
NAME = "loomlens_shape_aware"
#: Head dims above this take the math path: DaViT's channel attention in every Florence-2 size.
WIDE_HEAD = 128
#: A shape class takes the math path only when it ran at least this many times faster than
#: SDPA when it was timed: a near tie stays on transformers' own kernel (a lower margin, which
#: moved more shapes to the math path on an AMD EPYC, made prediction no faster there:
#: docs/benchmarks.md).
MARGIN = 2.5
#: The file in `cache_dir()` that keeps each machine's timed choices between processes.
CACHE_FILE = "attention.json"
#: Shape class (`_shape_class`) -> whether it runs on the math path, for this process.
_ON_MATH: dict[tuple, bool] = {}
_DECIDING = threading.Lock()


def _math_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=None,
                    **_):
    """softmax(q k^T * scale + mask) v, returned as (batch, tokens, heads, dim) like SDPA's. A
    causal layer given no mask (a decoder's teacher-forced pass) is masked causally, as
    transformers' SDPA path has SDPA's kernel do it (`is_causal`, upper-left aligned)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if causal and attention_mask is None and query.shape[2] > 1:
        future = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA's kind: True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _shape_class(query: torch.Tensor, key: torch.Tensor, attention_mask) -> tuple:
    """What decides a kernel's speed: dtype, head dim, heads, masked or not, and queries and
    keys, each rounded up to a power of two (a decoder's keys grow by one a step). Not the
    batch: an image must get the same answer whatever it was batched with (in bf16 the two
    kernels round differently), so the first batch's timing decides for every batch size."""
    def up(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()
    return (query.dtype, query.shape[-1], query.shape[1], attention_mask is not None,
            up(query.shape[2]), up(key.shape[2]))


def _seconds(kernel, *args, **kwargs) -> float:
    """The best of three timed calls of `kernel`, after one untimed (first-call set-up)."""
    kernel(*args, **kwargs)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        kernel(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def _stored() -> dict:
    """The cache file's content, {signature: {shape key: timing}}; {} when it is missing or
    unreadable (a damaged file is then simply rewritten)."""
    try:
        stored = json.loads((cache_dir() / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _cached_choice(key: str) -> bool | None:
    """The choice an earlier process on this machine made for the shape `key`, if any."""
    timing = _stored().get(machine_signature())
    timing = timing.get(key) if isinstance(timing, dict) else None
    return timing["math"] if isinstance(timing, dict) and isinstance(timing.get("math"), bool) else None


def _keep(key: str, sdpa: float, plain: float, on_math: bool) -> None:
    """Add one timed choice to the cache file (read, merge, replaced atomically). A folder that
    cannot be written leaves the choice to this process alone."""
    stored, machine = _stored(), machine_signature()
    mine = stored.get(machine)
    stored[machine] = {**(mine if isinstance(mine, dict) else {}),
                       key: {"math": on_math, "sdpa_s": sdpa, "math_s": plain}}
    try:
        atomic_write(cache_dir() / CACHE_FILE, json.dumps(stored, indent=1, sort_keys=True), durable=False)
    except OSError:
        pass


def _math_is_faster(module, query, key, value, attention_mask, kwargs) -> bool:
    """Whether this call's shape class runs on the math path: as an earlier process on this
    machine chose, else timed on this call's own tensors (both kernels) and kept."""
    shape = _shape_class(query, key, attention_mask)
    if shape not in _ON_MATH:
        with _DECIDING:  # two streams (`infer/streams.py`) meeting a new shape: one decides
            if shape not in _ON_MATH:
                _ON_MATH[shape] = _decide(shape, module, query, key, value, attention_mask, kwargs)
    return _ON_MATH[shape]


def _decide(shape: tuple, module, query, key, value, attention_mask, kwargs) -> bool:
    """The kernel of `shape`'s class: an earlier process's choice, else timed and kept."""
    name = "|".join(str(part) for part in shape)
    on_math = _cached_choice(name)
    if on_math is None:
        sdpa = _seconds(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)
        plain = _seconds(_math_attention, module, query, key, value, attention_mask, **kwargs)
        on_math = sdpa >= MARGIN * plain
        _keep(name, sdpa, plain, on_math)
    return on_math


def shape_aware(module, query, key, value, attention_mask=None, **kwargs):
    """transformers' attention signature: math for heads wider than `WIDE_HEAD`, else the
    kernel timed fastest for the call's shape class on this machine (SDPA on a near tie)."""
    if query.shape[-1] > WIDE_HEAD or _math_is_faster(module, query, key, value, attention_mask, kwargs):
        return _math_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_shape_aware_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make every attention layer of `model` (vision and text) run through `shape_aware`, with
    the masks transformers builds for SDPA."""
    AttentionInterface.register(NAME, shape_aware)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model
