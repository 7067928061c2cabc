"""LoRA / DoRA on a native Florence-2: target presets, freezing, the lm_head tie, adapters.

Targets are resolved by loomlens to explicit module names before peft sees them, so that a
name matching nothing fails here with a clear message (the seed's "linear" and "Conv2d" match
no module of Florence-2) instead of silently training less than asked.

The lm_head tie: Florence-2's `lm_head.weight` *is* the token embedding
(`model.model.language_model.shared.weight`). LoRA on `lm_head` adds its update only to the
output projection, and merging would add it into the shared tensor, changing the input
embeddings too. So when `lm_head` is a target, `untie_lm_head` first gives `lm_head` its own
copy of the weight (the top-level `config.tie_word_embeddings = False`; the encoder/decoder
embeddings stay tied to `shared`). A merged model then stores both tensors.

DoRA divides by each output row's norm. The embedding's pad row may be all zeros (norm 0 ->
0/0 = NaN), so every DoRA target row with zero norm is given a tiny constant value first
(`lift_zero_rows`). Both steps are deterministic functions of the base weights and of the
adapter's config, so `load_adapter` replays them exactly before attaching an adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from loomlens.config import LoraSettings
from loomlens.model.vision import stage_count, stage_of

__all__ = [  # LoraSettings lives with the other configs (torch-free); it is re-exported here
    "PRESETS", "LoraSettings", "LoraTargetError", "apply_lora", "freeze_tower", "lift_zero_rows", "load_adapter",
    "QloraUnavailable", "load_quantized_base", "lower_frozen", "qlora_missing", "quantized_device_map",
    "resolve_targets", "tower_of", "trainable_by_tower", "untie_lm_head",
]

#: Layer types peft's LoRA can wrap.
_WRAPPABLE = (nn.Linear, nn.Conv2d, nn.Embedding)
#: Module-name prefixes of the vision side (DaViT + the projector into the text space).
VISION_PREFIXES = ("model.vision_tower", "model.multi_modal_projector")
#: Value given to each element of an all-zero DoRA row: a norm far below any real row's,
#: yet representable in fp16 (smallest normal 6e-5).
_ZERO_ROW_FILL = 1e-4

#: Target presets, as module-name suffixes (peft's own matching: name == t or endswith "." + t).
#: `seed` is the write-up's choice; its fc1/fc2 also match the DaViT MLPs (`ffn.fc1`), as they
#: did in the original remote-code Florence-2, so the seed trained both towers.
PRESETS: dict[str, tuple[str, ...]] = {
    "seed": ("q_proj", "k_proj", "v_proj", "fc1", "fc2", "lm_head"),
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


class LoraTargetError(ValueError):
    """A LoRA target (preset or module name) that matches no layer of the model."""


def tower_of(name: str) -> str:
    """`vision` or `language` for a module or parameter name of a (possibly peft-wrapped) model."""
    name = name.removeprefix("base_model.model.")
    return "vision" if name.startswith(VISION_PREFIXES) else "language"


def _preset(layers: dict[str, nn.Module], name: str) -> list[str] | None:
    """The module names of preset `name`, or None if `name` is not a preset."""
    linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    if name == "all-linear":
        return [n for n in linear if n != "lm_head"]
    if name == "language":
        return [n for n in linear if n.startswith("model.language_model")]
    if name in PRESETS:
        return [n for n in layers if any(n == t or n.endswith("." + t) for t in PRESETS[name])]
    return None


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Explicit module names for `targets`: a preset, a module name (a suffix such as `q_proj`,
    or a full dotted name), or a list mixing both (`[language, lm_head]`). Raises
    `LoraTargetError` for an entry that matches no wrappable layer, naming it and the names
    that do exist."""
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, _WRAPPABLE)}
    chosen: list[str] = []
    for target in [targets] if isinstance(targets, str) else targets:
        found = _preset(layers, target)
        if found is None:
            found = [n for n in layers if n == target or n.endswith("." + target)]
        if not found:
            known = sorted({n.rsplit(".", 1)[-1] for n, m in layers.items() if isinstance(m, nn.Linear)})
            raise LoraTargetError(
                f"LoRA target {target!r} matches no layer of this model. Presets: "
                f"{', '.join([*PRESETS, 'language', 'all-linear'])}; linear layer names: {', '.join(known)}"
            )
        chosen += [n for n in found if n not in chosen]
    return chosen


def untie_lm_head(model: nn.Module) -> None:
    """Give `lm_head` its own copy of the tied embedding weight (no-op when already untied)."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    # Only the top-level flag: text_config's flag ties encoder/decoder embeddings to `shared`.
    model.config.tie_word_embeddings = False


@torch.no_grad()
def lift_zero_rows(model: nn.Module, names: list[str]) -> None:
    """Give every all-zero output row of the named layers a tiny constant, so that DoRA's
    per-row weight norm is never 0 (0 / 0 = NaN)."""
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        if not weight.is_floating_point():
            raise QloraUnavailable(
                f"DoRA cannot train {name}: its weight is stored as packed {weight.dtype} (a 4-bit base). "
                "Use plain LoRA with qlora (lora.dora=false), or DoRA without qlora"
            )
        rows = weight.reshape(weight.shape[0], -1).norm(dim=1) == 0
        if rows.any():
            weight[rows] = _ZERO_ROW_FILL


def _prepare_base(model: nn.Module, targets: list[str], dora: bool) -> None:
    """The base-weight changes an adapter needs before it is attached: untie, lift zero rows."""
    if "lm_head" in targets:
        untie_lm_head(model)
    if dora:
        lift_zero_rows(model, targets)


def freeze_tower(model: nn.Module, freeze: str) -> None:
    """Stop training the adapters of one tower: `vision` (vision tower + projector),
    `language` (BART + lm_head) or `none`."""
    if freeze == "none":
        return
    for name, param in model.named_parameters():
        if tower_of(name) == freeze:
            param.requires_grad_(False)


@torch.no_grad()
def lower_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter and buffer of `model` in `dtype` (bf16 or
    fp16); trainable parameters (the adapter) stay as they are, fp32, so the optimizer updates
    full-precision weights. Returns how many tensors were cast. Training then runs without
    autocast: activations are in `dtype`, and plain LoRA layers cast their small A and B per
    call (`model/folded_lora.py`) instead of autocast casting every input."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[key] = buffer.to(dtype)
                cast += 1
    return cast


def trainable_by_tower(model: nn.Module) -> dict[str, int]:
    """Number of trainable parameters in each tower: `{"vision": n, "language": m}`."""
    counts = {"vision": 0, "language": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[tower_of(name)] += param.numel()
    return counts


def _outside_frozen_stages(model: nn.Module, targets: list[str], frozen: int) -> list[str]:
    """`targets` less the layers of the first `frozen` DaViT stages. Raises LoraTargetError
    when `frozen` exceeds the stage count or nothing is left to train."""
    if not frozen:
        return targets
    stages = stage_count(model)
    if frozen > stages:
        raise LoraTargetError(f"vision_frozen_stages is {frozen}, but the vision tower has {stages} stages")
    kept = [n for n in targets if (stage_of(n) is None or stage_of(n) >= frozen)]
    if not kept:
        raise LoraTargetError(f"every LoRA target lies in the first {frozen} vision stages; nothing would train")
    return kept


def apply_lora(model: nn.Module, settings: LoraSettings, *, vision_frozen_stages: int = 0):
    """Wrap `model` with a fresh LoRA/DoRA adapter per `settings`; returns the `PeftModel`.

    Only the adapters of the towers not frozen are trainable; the base model is frozen. The
    first `vision_frozen_stages` DaViT stages get no adapters (`speed.vision_frozen_stages`).
    """
    from peft import LoraConfig, get_peft_model

    targets = _outside_frozen_stages(model, resolve_targets(model, settings.targets), vision_frozen_stages)
    _prepare_base(model, targets, settings.dora)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        target_modules=targets,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    freeze_tower(peft_model, settings.freeze)
    return peft_model


def load_adapter(model: nn.Module, path: str | Path, trainable: bool = False):
    """Attach the adapter saved in `path` to the base `model` (inference unless `trainable`).

    Replays the base-weight preparation the adapter was trained with (lm_head untie, DoRA
    zero rows), so base + adapter here computes exactly what it computed in training.
    """
    from peft import PeftModel

    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a LoRA adapter folder: it has no adapter_config.json")
    _check_safetensors_adapter(path)
    config = json.loads(config_file.read_text())
    targets = config["target_modules"]  # peft stores suffixes (or a regex): back to full names
    if isinstance(targets, str):
        names = [name for name, _ in model.named_modules() if re.fullmatch(targets, name)]
    else:
        names = resolve_targets(model, targets)
    _prepare_base(model, names, bool(config.get("use_dora")))
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    return peft_model if trainable else peft_model.eval()


def _check_safetensors_adapter(path: Path) -> None:
    """Refuse an adapter folder without a whole `adapter_model.safetensors`: peft would fall
    back to `adapter_model.bin`, a pickle, and a pickle from someone else's folder can run
    code; a file cut short (a copy to the line PC that broke off) is named, not a traceback."""
    from safetensors import SafetensorError, safe_open

    weights = path / "adapter_model.safetensors"
    if weights.exists():
        try:
            with safe_open(str(weights), "pt"):  # reads the header, which must cover the whole file
                return
        except (SafetensorError, OSError) as err:
            raise ValueError(f"the adapter weights {weights} are damaged ({err}); copy the run folder again, or "
                             "load another checkpoint (--checkpoint last)") from None
    pickles = sorted(p.name for p in path.glob("adapter_model*.bin"))
    if not pickles:
        raise ValueError(f"cannot load the adapter in {path}: it has adapter_config.json but no "
                         "adapter_model.safetensors (a copy cut short?); copy the run folder again")
    raise ValueError(
        f"cannot load the adapter in {path}: it has {pickles[0]}, a pickle. loomlens reads only safetensors "
        "adapters; re-save it where it was made with `model.save_pretrained(folder, safe_serialization=True)`."
    )


class QloraUnavailable(RuntimeError):
    """QLoRA was asked for where it cannot run; the message says what is missing and the fix."""


def qlora_missing() -> list[str]:
    """What this machine lacks for QLoRA, each with its fix (empty when it can run)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none is visible to torch; on a CPU train plain LoRA: drop --qlora)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    return missing


def quantized_device_map(local_rank: int | None = None) -> dict[str, int]:
    """`device_map` for a 4-bit base: the whole model on this process's own GPU, so that each
    process of a multi-GPU run loads onto its device rather than all onto GPU 0.

    Args:
        local_rank: the process's GPU index; None reads it from accelerate's `PartialState`.

    Returns:
        `{"": local_rank}`.
    """
    if local_rank is None:
        from accelerate import PartialState

        local_rank = PartialState().local_process_index
    return {"": int(local_rank)}


def load_quantized_base(name_or_path: str, *, dora: bool = False, local_rank: int | None = None):
    """Florence-2 in 4-bit NF4 for QLoRA; returns `(model, processor)`.

    Args:
        name_or_path: the base model (as `load_model` takes it).
        dora: whether the adapter will be DoRA: refused before anything loads, since DoRA's
            per-row norms need the float weights a 4-bit base no longer holds.
        local_rank: the GPU to load onto (default: this process's, see `quantized_device_map`).

    Raises:
        QloraUnavailable: DoRA asked for, or no CUDA GPU / no bitsandbytes (naming each missing
            piece and how to get it).
    """
    if dora:
        raise QloraUnavailable(
            "DoRA cannot train on a 4-bit base: it needs each weight row's norm, and the 4-bit base stores packed "
            "integers. Use plain LoRA with qlora (lora.dora=false), or DoRA without qlora"
        )
    missing = qlora_missing()
    if missing:
        raise QloraUnavailable(f"QLoRA (4-bit base) needs {' and '.join(missing)}")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Florence2ForConditionalGeneration

    from loomlens.model.loader import load_processor, resolve_model_path

    source = resolve_model_path(name_or_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = Florence2ForConditionalGeneration.from_pretrained(
        source, quantization_config=quant, device_map=quantized_device_map(local_rank), use_safetensors=True
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, load_processor(source)
