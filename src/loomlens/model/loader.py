"""Load a Florence-2 and its processor: a hub id, a local folder, or an embedded model
(`tiny`, and the 384 px `tiny-hr`).

All go through the native `transformers` classes (`Florence2ForConditionalGeneration`,
`AutoProcessor`), safetensors only, never `trust_remote_code`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Embedded:
    """A model shipped inside the package: its folder and the maintainer command that makes it."""

    folder: Path
    made_by: str


#: The embedded models by name: `tiny` (256 px, the default) and `tiny-hr` (384 px, pretrained
#: further on fabric-like scenes: its model card says what it is worth).
EMBEDDED = {
    "tiny": Embedded(ASSETS / "tiny-florence2",
                     "python -m loomlens.train.pretrain --out src/loomlens/assets/tiny-florence2"),
    "tiny-hr": Embedded(ASSETS / "tiny-hr-florence2",
                        "scripts/pretrain-fabric.sh 384 INIT SECONDS ASSET on a GPU, or the CPU route in "
                        "docs/training.md, then copy the asset it writes to src/loomlens/assets/tiny-hr-florence2"),
}
#: The embedded default, shipped inside the package.
TINY_DIR = EMBEDDED["tiny"].folder
#: Friendly names for the real checkpoints (native-format conversions on the hub).
ALIASES = {
    "base": "florence-community/Florence-2-base",
    "large": "florence-community/Florence-2-large",
    "base-ft": "florence-community/Florence-2-base-ft",
    "large-ft": "florence-community/Florence-2-large-ft",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded name (`tiny`, `tiny-hr`), an alias, a folder or a hub id to what
    `from_pretrained` takes. An embedded model whose folder is absent raises ModelLoadError
    naming the folder and the command that makes it."""
    embedded = EMBEDDED.get(name_or_path)
    if embedded is not None:
        if not (embedded.folder / "config.json").exists():
            raise ModelLoadError(
                f"the embedded {name_or_path} model is missing from {embedded.folder}; make it with `{embedded.made_by}`"
            )
        return str(embedded.folder)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
        return str(path)
    return ALIASES.get(name_or_path, name_or_path)


def _another_base(given: str, recorded: str) -> bool:
    """Whether `given` is another model than `recorded`, the base the adapter was trained on,
    where that can be told here: `recorded` is an embedded name or a folder on this machine
    (the same folder?), or both are hub ids (the same id, aliases resolved?). A recorded
    folder that is not here is what `given` stands in for."""
    here = recorded in EMBEDDED or Path(recorded).expanduser().exists()
    if here:
        return Path(resolve_model_path(given)).resolve() != Path(resolve_model_path(recorded)).resolve()
    hub_ids = not any(Path(name).expanduser().exists() or Path(name).is_absolute() for name in (given, recorded))
    return hub_ids and resolve_model_path(given) != resolve_model_path(recorded)


def adapter_base(recorded: str, given: str | None, adapter: Path) -> str:
    """The base to load the adapter at `adapter` on, which was trained on `recorded`: `given`
    (`--model`) where it can stand for that base (`_another_base`: the same model, or the one
    a recorded folder not on this machine was), else `recorded`. Raises ValueError for another
    base (the adapter's weights would be wrong on it) and FileNotFoundError for a recorded
    folder not on this machine with none given (a run copied from where it trained), each
    naming the fix; merge, eval, predict and the rest all load an adapter's base through it."""
    if given is not None:
        if _another_base(given, recorded):
            raise ValueError(f"adapter {adapter} was trained on base {recorded!r}, not {given!r}: on another base its "
                             "weights would be wrong. Drop --model (it is for a base recorded as a folder that is not "
                             "on this machine)")
        return given
    if Path(recorded).expanduser().is_absolute() and not Path(recorded).expanduser().exists():
        raise FileNotFoundError(f"adapter {adapter} was trained on the base model folder {recorded}, which is not on "
                                "this machine: give where that base is here with --model (the same model's files)")
    return recorded


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(
        key in text
        for key in ("connection", "offline", "resolve", "network", "timed out", "couldn't connect",
                    "local_files_only", "cannot find the requested files", "max retries")
    )


def load_processor(source: str, **kwargs):
    """The checkpoint's processor at `source` (a folder or hub id; `kwargs` go to `from_pretrained`)
    with a PIL-backed image processor, whether or not torchvision is installed.

    transformers picks its torchvision image processor whenever torchvision imports, and that
    resizes differently from the PIL one: a model trained where torchvision is missing would see
    other pixels where it is present, and `infer.pixels`'s fast path (a PIL resize) would not
    apply. PIL everywhere gives every machine the same pixels.
    """
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.image_processing_backends import PilBackend

    processor = AutoProcessor.from_pretrained(source, **kwargs)
    if not isinstance(processor.image_processor, PilBackend):
        processor.image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
    return processor


def load_model(
    name_or_path: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load `(model, processor)` for `name_or_path` ("tiny", "tiny-hr", "base", a hub id or a folder).

    The model comes back in eval mode on `device` (fp32 unless `dtype` says otherwise).
    A hub id that cannot be reached raises `ModelLoadError` with the offline fix, not a trace.
    """
    from transformers import Florence2ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    source = resolve_model_path(name_or_path)
    local = Path(source).exists()
    kwargs = {"local_files_only": True} if local or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loaders' chatter is not for line users
    hf_logging.disable_progress_bar()
    try:
        model = Florence2ForConditionalGeneration.from_pretrained(
            source, dtype=dtype or torch.float32, use_safetensors=True, **kwargs
        )
        processor = load_processor(source, **kwargs)
    except (OSError, ValueError) as exc:
        if not local and _is_offline_error(exc):
            raise ModelLoadError(
                f"cannot download {source!r}: no network or no such model on the hub. "
                "Use --model tiny (embedded, offline) or a local folder with the model files."
            ) from exc
        raise ModelLoadError(f"cannot load model from {source!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.to(device).eval(), processor
