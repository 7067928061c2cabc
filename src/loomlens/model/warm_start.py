"""Start a tiny Florence-2 from a trained one of another input size (a warm start).

Pretraining `tiny-hr` (384 px, a 24 x 24 token grid) from scratch would repeat what the
shipped tiny (256 px, 16 x 16) already learned. Every weight but three tables is independent
of the input size (the DaViT tower's convolutions and window attention, the projector's linear
map, the whole text side), so they are copied as they are. The three tables that are not:

- the projector's row and column position embeddings (`vision_config.max_position_embeddings`
  rows, 50 here, of which a 16-cell grid trained only rows 0..15): rows 0..G-1 of the new grid
  are interpolated linearly from the trained rows at the new cells' centres; the rows past the
  new grid, never read at that size, keep their fresh init;
- the text encoder's learned positions. The projector emits the pooled token first and then
  the grid row by row (`Florence2MultiModalProjector.forward` concatenates the mean over the
  grid before the grid), and the processor puts the image tokens before the prompt; BART
  reads row `position + 2`. So rows 0..2 (BART's two offset rows and the pooled token) are
  copied, the grid's rows are resampled bilinearly over the 2D grid at the new cells'
  centres, and the prompt's rows are copied to their new place after the longer image;
- the text decoder's learned positions, which have the encoder's length (BART sizes both
  from `max_position_embeddings`) but count answer tokens: the old rows are copied, the
  added ones (past any answer the old model could write) keep their fresh init.

The grown `max_position_embeddings` comes from `model/tiny.py: tiny_config`, which sizes it
for the new image sequence before the model is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROJECTOR = "model.multi_modal_projector.image_position_embed."
AXES = (PROJECTOR + "row_embeddings.weight", PROJECTOR + "column_embeddings.weight")
ENCODER_POSITIONS = "model.language_model.encoder.embed_positions.weight"
DECODER_POSITIONS = "model.language_model.decoder.embed_positions.weight"
BART_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2


def resample_axis(table: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C) rows of a 1D grid -> (size, C): linear interpolation at the centres of `size`
    cells spanning the same extent (edge rows held past the outer centres)."""
    return F.interpolate(table.T[None], size=size, mode="linear", align_corners=False)[0].T


def resample_grid(tokens: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """(old*old, C) row-major grid tokens -> (new*new, C), bilinear at the new cells' centres."""
    image = tokens.reshape(old, old, -1).permute(2, 0, 1)[None]
    resized = F.interpolate(image, size=(new, new), mode="bilinear", align_corners=False)
    return resized[0].permute(1, 2, 0).reshape(new * new, -1)


def axis_table(old: torch.Tensor, fresh: torch.Tensor, old_grid: int, grid: int) -> torch.Tensor:
    """A projector row/column table for `grid` cells: the trained rows resampled, the rest fresh."""
    out = fresh.clone()
    out[:grid] = resample_axis(old[:old_grid], grid)
    return out


def encoder_positions(old: torch.Tensor, fresh: torch.Tensor, old_grid: int, grid: int) -> torch.Tensor:
    """The encoder's position table for a `grid` x `grid` image: offset rows and pooled token
    copied, grid rows resampled in 2D, prompt rows moved after the image; any rows left keep
    their fresh init."""
    head = BART_OFFSET + 1  # the two offset rows, then position 0: the pooled token
    out = fresh.clone()
    out[:head] = old[:head]
    out[head : head + grid**2] = resample_grid(old[head : head + old_grid**2], old_grid, grid)
    old_prompt, new_prompt = head + old_grid**2, head + grid**2
    rows = min(len(old) - old_prompt, len(out) - new_prompt)
    out[new_prompt : new_prompt + rows] = old[old_prompt : old_prompt + rows]
    return out


def prefix_copy(old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """`fresh` with its first rows replaced by `old`'s (as many as both have)."""
    out = fresh.clone()
    rows = min(len(old), len(out))
    out[:rows] = old[:rows]
    return out


def warm_state(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], old_grid: int,
               grid: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of the new model (`fresh`: its own init) warm-started from `old`.

    Returns the state and the keys left at their fresh init (absent from `old`, or of
    another shape that is not one of the grid-tied tables)."""
    state, left = {}, []
    for key, value in fresh.items():
        before = old.get(key)
        if before is None:
            state[key] = value
            left.append(key)
        elif key in AXES:
            state[key] = axis_table(before.to(value.dtype), value, old_grid, grid)
        elif key == ENCODER_POSITIONS:
            state[key] = encoder_positions(before.to(value.dtype), value, old_grid, grid)
        elif key == DECODER_POSITIONS:
            state[key] = prefix_copy(before.to(value.dtype), value)
        elif before.shape == value.shape:
            state[key] = before.to(value.dtype)
        else:
            state[key] = value
            left.append(key)
    return state, left


def token_grid(processor) -> int:
    """Cells per side of the grid a Florence-2 processor's image tokens hold (one is pooled)."""
    cells = processor.image_processor.image_seq_length - 1
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise ValueError(f"{cells + 1} image tokens are not a pooled token plus a square grid")
    return grid


def warm_start(model, processor, source: str) -> list[str]:
    """Load `source` (anything `load_model` takes: "tiny", a folder) into `model`, a fresh
    tiny Florence-2 whose processor is `processor`, resampling the grid-tied tables.

    Returns the keys left at their fresh init. Raises ValueError when the tokenizers differ
    (the embedding rows would name other tokens)."""
    from loomlens.model.loader import load_model

    old_model, old_processor = load_model(source)
    if old_processor.tokenizer.get_vocab() != processor.tokenizer.get_vocab():
        raise ValueError(f"{source} has another tokenizer: its embedding rows would name other tokens")
    state, left = warm_state(old_model.state_dict(), model.state_dict(), token_grid(old_processor),
                             token_grid(processor))
    model.load_state_dict(state)
    return left
