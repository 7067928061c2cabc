"""The tiny Florence-2: same native architecture as Florence-2-base, shrunk to run on a CPU.

`build_tiny(...)` returns a randomly initialised `Florence2ForConditionalGeneration` and its
`Florence2Processor`. The shape is chosen for the readout of locations, the part a tiny
model gets wrong first (see the model card): a stride-16 vision tower (three DaViT stages
instead of four) gives a 16x16 token grid at 256 px instead of 8x8, and the text side is
wider and deeper than a minimal one. `init_spatial_prior` gives the decoder a linear path
from an image token's position to the matching `<loc_N>` logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from loomlens.model.tokenizer import build_tokenizer, loc_token_ids

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: Parsing rules for transformers' own `Florence2PostProcessor`, saved with the processor
#: so that `post_process_generation` works with no loomlens code.
POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


@dataclass
class TinyShape:
    """The knobs of the tiny model's shape; recorded in the model card."""

    image_size: int = 256
    vision_dims: list[int] = field(default_factory=lambda: [32, 96, 192])
    vision_depths: list[int] = field(default_factory=lambda: [1, 1, 2])
    vision_heads: list[int] = field(default_factory=lambda: [2, 6, 12])
    window_size: int = 8
    d_model: int = 192
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 768
    max_target_positions: int = 256

    @property
    def stride(self) -> int:
        return 4 * 2 ** (len(self.vision_dims) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    @property
    def image_seq_length(self) -> int:
        # One pooled token plus one token per grid cell, as Florence2MultiModalProjector emits.
        return self.grid**2 + 1


def base_shape_config(vocab_size: int, image_token_id: int):
    """Florence-2-base's real shape (0.23 B) for a random-weight model, used by the slow test."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(projection_dim=768)  # DaViT 128/256/512/1024, depths 1/1/9/1
    text = BartConfig(
        vocab_size=vocab_size, d_model=768, encoder_layers=6, decoder_layers=6,
        encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=0, forced_eos_token_id=2,
    )
    return Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id
    )


def tiny_config(shape: TinyShape, vocab_size: int, image_token_id: int):
    """The `Florence2Config` of the tiny model for `shape` and a tokenizer of `vocab_size`."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    n = len(shape.vision_dims)
    vision = Florence2VisionConfig(
        depths=shape.vision_depths,
        embed_dim=shape.vision_dims,
        num_heads=shape.vision_heads,
        num_groups=shape.vision_heads,
        patch_size=[7] + [3] * (n - 1),
        patch_stride=[4] + [2] * (n - 1),
        patch_padding=[3] + [1] * (n - 1),
        patch_prenorm=[False] + [True] * (n - 1),
        window_size=shape.window_size,
        drop_path_rate=0.0,
        projection_dim=shape.d_model,
        max_position_embeddings=max(50, shape.grid),
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=shape.d_model,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.attention_heads,
        decoder_attention_heads=shape.attention_heads,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        max_position_embeddings=max(shape.max_target_positions, shape.image_seq_length + 64),
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    )
    return Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id
    )


def build_processor(tokenizer, image_size: int, image_seq_length: int):
    """A native `Florence2Processor` (PIL image processor: no torchvision needed)."""
    from transformers import CLIPImageProcessorPil, Florence2Processor

    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic, as Florence-2
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    image_processor.image_seq_length = image_seq_length
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal codes of positions in [0, 1): shape (len(positions), dim)."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=torch.float32) * (-math.log(200.0) / max(dim // 2 - 1, 1)))
    angles = positions[:, None] * 2 * math.pi * freqs[None, :] * 8
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[:, :dim]


@torch.no_grad()
def init_spatial_prior(model, tokenizer, shape: TinyShape, position_scale: float = 1.0, loc_scale: float = 0.03) -> None:
    """Give locations a shared geometry on both sides of the model.

    The projector's learned row/column embeddings (first half of the channels: x, second
    half: y) start as sinusoidal codes of each grid cell's centre, and each `<loc_N>` embedding
    (tied to `lm_head`) starts as the same code of N/1000 in both halves. A decoder state that
    copies an image token's position then scores the `<loc_N>` of that position highest,
    through the tied `lm_head`, before any training: reading *where* becomes a lookup
    instead of something the tiny text side must discover. `loc_scale` keeps the loc
    embeddings at the magnitude of a normal init (std 0.02): larger ones start the loc
    loss far above chance (docs/training.md, "Pretraining the tiny model").
    """
    projector = model.model.multi_modal_projector
    position = projector.image_position_embed
    half_v = position.column_embeddings.weight.shape[1]
    centres = (torch.arange(position.column_embeddings.weight.shape[0], dtype=torch.float32) + 0.5) / shape.grid
    code = sinusoid(centres, half_v) * position_scale
    position.column_embeddings.weight.copy_(code)
    position.row_embeddings.weight.copy_(code)
    weight = projector.image_projection.weight
    if weight.shape[0] == weight.shape[1]:
        # Identity, so the position codes reach the text side unrotated.
        weight.copy_(torch.eye(weight.shape[0]))
    embeddings = model.get_input_embeddings().weight
    half_t = embeddings.shape[1] // 2
    ids = torch.tensor(loc_token_ids(tokenizer))
    loc_code = sinusoid((torch.arange(1000, dtype=torch.float32) + 0.5) / 1000, half_t) * loc_scale
    embeddings[ids, :half_t] = loc_code
    embeddings[ids, half_t : 2 * half_t] = loc_code


def build_tiny(shape: TinyShape | None = None, seed: int = 0, spatial_prior: bool = True):
    """Build a randomly initialised tiny Florence-2.

    Returns `(model, processor, shape)`: a native `Florence2ForConditionalGeneration` in fp32,
    its `Florence2Processor`, and the `TinyShape` used.
    """
    from transformers import Florence2ForConditionalGeneration

    shape = shape or TinyShape()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(shape, vocab_size=len(tokenizer), image_token_id=tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    if spatial_prior:
        init_spatial_prior(model, tokenizer, shape)
    processor = build_processor(tokenizer, shape.image_size, shape.image_seq_length)
    return model, processor, shape


def shape_dict(shape: TinyShape) -> dict:
    """`shape` as a plain dict for configs and the model card."""
    return asdict(shape)
