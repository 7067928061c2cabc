"""A faithful random-weight stand-in for the real Florence-2-base, built from its own small files.

In: the folder of the real checkpoint's configuration and tokenizer files (`../shared/florence2`
next to the repository: see its README.md and PROVENANCE.md). Out: a native
(`Florence2ForConditionalGeneration`, florence-community layout) model folder that
`loomlens.model.load_model(folder)` and plain `from_pretrained` load, with random weights.

What is real: the BART BPE tokenizer with its 1,024 added tokens (`<loc_N>`, task markers,
vocabulary 51,289) plus the `<image>` token the native conversion adds; the embeddings and
`lm_head` padded to a multiple of 64 as the conversion pads them (so `lm_head` has rows past
the tokenizer's length); the preprocessor (768 px, bicubic, ImageNet mean/std); the generation
settings (`num_beams 3`, `no_repeat_ngram_size 3`, ...), written to `generation_config.json`
where a native checkpoint keeps them. The config mapping follows transformers'
`convert_florence2_original_pytorch_to_hf.py`. Three shapes: `shrunk` (tiny widths, depths and
image size; tokenizer and every other setting real) for the default test run, `base`, and
`large` (Florence-2-large's config; it shares base's tokenizer and preprocessor) for memory and
speed on a GPU.

Maintainers: `python -m loomlens.model.standin OUT [--shape shrunk|base|large] [--shared DIR]`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

#: Sub-folders of the shared files (see their PROVENANCE.md).
ORIGINAL_CONFIG_DIR = "microsoft-Florence-2-base__VinZh22"
SAVED_FINETUNE_DIR = "florence2-base-ft-finetune-saved__zhanglei-web"
#: Florence-2-large's config with a user's two edits undone (its PROVENANCE.md).
LARGE_CONFIG = "microsoft-Florence-2-large-modified__thomas-roth/config.reconstructed-unmodified.json"
SHAPES = ("shrunk", "base", "large")
IMAGE_TOKEN = "<image>"
#: The native conversion pads the vocabulary (after adding `<image>`) to a multiple of this.
VOCAB_PAD = 64
#: text_config entries of the original layout that are generation settings, not model shape:
#: a native checkpoint keeps them in generation_config.json.
GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "forced_bos_token_id", "forced_eos_token_id")
#: Token ids of the original layout (the re-saved fine-tune's swapped 2/1/0 are a save artefact).
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2}


@dataclass(frozen=True)
class Shrink:
    """The shrunk shape: real tokenizer and settings, tiny widths and depths, small images."""

    image_size: int = 128
    vision_dims: tuple[int, ...] = (16, 32, 48, 64)
    vision_heads: tuple[int, ...] = (1, 2, 3, 4)
    vision_depths: tuple[int, ...] = (1, 1, 1, 1)
    d_model: int = 64
    layers: int = 1
    heads: int = 4
    ffn_dim: int = 128


def shared_folder(start: Path) -> Path:
    """`../shared/florence2` beside the repository root `start` (where the shared files live)."""
    return (start / ".." / "shared" / "florence2").resolve()


def _require(folder: Path, *, large: bool = False) -> tuple[Path, Path]:
    """The two source folders inside `folder` (and large's config when `large`);
    FileNotFoundError naming what is missing."""
    original, saved = folder / ORIGINAL_CONFIG_DIR, folder / SAVED_FINETUNE_DIR
    needed = [original / "config.json", original / "preprocessor_config.json", saved / "tokenizer.json",
              saved / "tokenizer_config.json", saved / "generation_config.json", *([folder / LARGE_CONFIG] if large else [])]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"the real Florence-2 files are missing: {', '.join(missing)}. Put the shared folder "
            "(configs + tokenizer, no weights) at ../shared/florence2 beside the repository or pass its path"
        )
    return original, saved


def native_config(original: dict, image_token_id: int, shrink: Shrink | None = None):
    """The native `Florence2Config` for an original (remote-code layout) `config.json` dict.

    Vision: `dim_embed` -> `embed_dim`, the nested temporal/position dicts -> their sizes, as
    transformers' conversion maps them. Text: the original `text_config` less its generation
    settings (see `generation_config`). `shrink` replaces widths, depths and head counts.
    """
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    v = original["vision_config"]
    vision = {
        "embed_dim": list(v["dim_embed"]), "depths": list(v["depths"]), "num_heads": list(v["num_heads"]),
        "num_groups": list(v["num_groups"]), "patch_size": list(v["patch_size"]),
        "patch_stride": list(v["patch_stride"]), "patch_padding": list(v["patch_padding"]),
        "patch_prenorm": list(v["patch_prenorm"]), "window_size": v["window_size"],
        "drop_path_rate": v["drop_path_rate"], "projection_dim": v["projection_dim"],
        "max_temporal_embeddings": v["visual_temporal_embedding"]["max_temporal_embeddings"],
        "max_position_embeddings": v["image_pos_embed"]["max_pos_embeddings"],
    }
    text = {k: val for k, val in original["text_config"].items() if k not in GENERATION_KEYS}
    if shrink is not None:
        vision.update(embed_dim=list(shrink.vision_dims), depths=list(shrink.vision_depths),
                      num_heads=list(shrink.vision_heads), num_groups=list(shrink.vision_heads),
                      projection_dim=shrink.d_model)
        text.update(d_model=shrink.d_model, encoder_layers=shrink.layers, decoder_layers=shrink.layers,
                    num_hidden_layers=shrink.layers, encoder_attention_heads=shrink.heads,
                    decoder_attention_heads=shrink.heads, encoder_ffn_dim=shrink.ffn_dim,
                    decoder_ffn_dim=shrink.ffn_dim)
    return Florence2Config(
        vision_config=Florence2VisionConfig(**vision).to_dict(),
        text_config=BartConfig(**text).to_dict(),
        image_token_id=image_token_id,
    )


def generation_config(original: dict):
    """The real generation settings (`text_config`'s beams, n-gram ban, forced ids) with the
    original token ids, as a `GenerationConfig`."""
    from transformers import GenerationConfig

    text = original["text_config"]
    return GenerationConfig(**{k: text[k] for k in GENERATION_KEYS if k in text}, **TOKEN_IDS)


def real_processor(saved: Path, original: Path, image_size: int | None = None, backend: str = "pil"):
    """The native `Florence2Processor`: the real tokenizer plus `<image>`, and the real
    preprocessor settings (`image_size` overrides the 768 px, with the matching token count).

    `backend`: `pil` (`CLIPImageProcessorPil`, no torchvision) or `torchvision`
    (`CLIPImageProcessor`, transformers' fast path; needs torchvision installed)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPImageProcessorPil, Florence2Processor

    from loomlens.model.tiny import POST_PROCESSOR_CONFIG

    tokenizer = AutoTokenizer.from_pretrained(saved, extra_special_tokens={"image_token": IMAGE_TOKEN})
    pre = json.loads((original / "preprocessor_config.json").read_text())
    size = image_size or pre["size"]["height"]
    seq = pre["image_seq_length"] if image_size is None else (size // 32) ** 2 + 1
    kinds = {"pil": CLIPImageProcessorPil, "torchvision": CLIPImageProcessor}
    if backend not in kinds:
        raise ValueError(f"unknown image-processor backend {backend!r}; use pil or torchvision")
    image_processor = kinds[backend](
        do_resize=pre["do_resize"], size={"height": size, "width": size}, resample=pre["resample"],
        do_center_crop=pre["do_center_crop"], crop_size={"height": size, "width": size},
        do_rescale=pre["do_rescale"], rescale_factor=1 / 255, do_normalize=pre["do_normalize"],
        image_mean=pre["image_mean"], image_std=pre["image_std"], do_convert_rgb=True,
    )
    image_processor.image_seq_length = seq
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              post_processor_config=POST_PROCESSOR_CONFIG)


def build_standin(folder: Path, *, shape: Literal["shrunk", "base", "large"] = "shrunk", seed: int = 0):
    """Build the stand-in in memory.

    Args:
        folder: the shared real-file folder (`shared_folder(repo_root)`).
        shape: `shrunk` (tiny widths/depths, 128 px images), `base` or `large` (the real
            shapes, 768 px).
        seed: the random-weight seed.

    Returns:
        `(model, processor)`: a native Florence-2 in fp32 (eval mode) whose embeddings and
        `lm_head` are padded past the tokenizer's length, and its processor.
    """
    from transformers import Florence2ForConditionalGeneration

    if shape not in SHAPES:
        raise ValueError(f"unknown stand-in shape {shape!r}; use one of {', '.join(SHAPES)}")
    original_dir, saved_dir = _require(folder, large=shape == "large")
    original = json.loads(((folder / LARGE_CONFIG) if shape == "large" else original_dir / "config.json").read_text())
    small = Shrink() if shape == "shrunk" else None
    processor = real_processor(saved_dir, original_dir, small.image_size if small else None)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(native_config(original, tokenizer.image_token_id, small))
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_PAD, mean_resizing=False)
    model.generation_config = generation_config(original)
    return model.eval(), processor


def save_standin(folder: Path, out: Path, *, shape: Literal["shrunk", "base", "large"] = "shrunk",
                 seed: int = 0) -> Path:
    """Build the stand-in (`build_standin`) and save it as a checkpoint folder at `out`
    (config, generation_config, model.safetensors, processor and tokenizer files). Returns `out`."""
    model, processor = build_standin(folder, shape=shape, seed=seed)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m loomlens.model.standin OUT [--shape shrunk|base|large] [--shared DIR] [--seed N]`."""
    parser = argparse.ArgumentParser(description="Save a random-weight stand-in of Florence-2.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="shrunk",
                        help="shrunk (tiny widths, 128 px; the default), or the real base or large shape at 768 px")
    parser.add_argument("--shared", type=Path, default=shared_folder(Path(__file__).resolve().parents[3]))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_standin(args.shared, args.out, shape=args.shape, seed=args.seed)
    print(f"stand-in saved to {path}")


if __name__ == "__main__":
    main()
