"""Warm start at a larger input: every size-free tensor kept, the grid-tied tables resampled
at the new cells' centres, and the new model answers at its own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loomlens.model.tiny import TinyShape, build_tiny
from loomlens.model.warm_start import AXES, DECODER_POSITIONS, ENCODER_POSITIONS, warm_start

SMALL = dict(vision_dims=[16, 32, 64], vision_heads=[1, 2, 4], vision_depths=[1, 1, 1], d_model=64, ffn_dim=128,
             max_target_positions=64)
OLD, NEW = 4, 6  # grid cells per side at 64 px and at 96 px (stride 16)


def linear_at_centres(rows: torch.Tensor, new: int) -> torch.Tensor:
    """The reference: row j of `new` cells sits at old index (j + 0.5) * old / new - 0.5,
    clamped to the outer rows, and is the linear mix of the two rows around it."""
    old = len(rows)
    out = []
    for j in range(new):
        at = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1.0)
        lo = int(at)
        hi = min(lo + 1, old - 1)
        out.append(rows[lo] * (1 - (at - lo)) + rows[hi] * (at - lo))
    return torch.stack(out)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A trained-looking small model at 64 px (random weights, saved as a folder) and a fresh
    one at 96 px warm-started from it."""
    folder = tmp_path_factory.mktemp("old")
    old, old_processor, _ = build_tiny(TinyShape(image_size=64, **SMALL), seed=1)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no table keeps its init: a copy must show
    old.save_pretrained(folder)
    old_processor.save_pretrained(folder)
    new, processor, shape = build_tiny(TinyShape(image_size=96, **SMALL), seed=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    left = warm_start(new, processor, str(folder))
    return old.state_dict(), fresh, new, processor, shape, left


def test_the_config_grows_the_text_positions_for_the_longer_image(warmed) -> None:
    old, _, new, _, shape, _ = warmed
    assert shape.grid == NEW and new.config.text_config.max_position_embeddings == NEW**2 + 1 + 64
    assert old[ENCODER_POSITIONS].shape[0] < new.state_dict()[ENCODER_POSITIONS].shape[0]


def test_every_tensor_of_the_same_shape_is_kept(warmed) -> None:
    old, _, new, _, _, left = warmed
    assert left == []
    state = new.state_dict()
    resampled = {*AXES, ENCODER_POSITIONS, DECODER_POSITIONS}
    kept = [k for k in state if k not in resampled]
    assert len(kept) > 200
    assert all(torch.equal(state[k], old[k]) for k in kept)


def test_projector_axes_are_resampled_at_cell_centres(warmed) -> None:
    old, fresh, new, _, _, _ = warmed
    for key in AXES:
        table = new.state_dict()[key]
        assert torch.allclose(table[:NEW], linear_at_centres(old[key][:OLD], NEW), atol=1e-6)
        assert torch.equal(table[NEW:], fresh[key][NEW:])  # rows never read at this size: fresh
    # Cell 1 of 6 is centred on the middle of old cells 0 and 1, cell 0 past the first centre.
    rows = new.state_dict()[AXES[0]]
    assert torch.allclose(rows[1], (old[AXES[0]][0] + old[AXES[0]][1]) / 2, atol=1e-6)
    assert torch.allclose(rows[0], old[AXES[0]][0], atol=1e-6)


def test_encoder_positions_keep_the_pooled_token_and_prompt_and_resample_the_grid(warmed) -> None:
    old, fresh, new, _, _, _ = warmed
    before, after = old[ENCODER_POSITIONS], new.state_dict()[ENCODER_POSITIONS]
    head = 3  # BART's two offset rows, then position 0: the pooled token (the projector emits it first)
    assert torch.equal(after[:head], before[:head])
    grid = before[head : head + OLD**2].reshape(OLD, OLD, -1)
    # Bilinear = linear along the rows of the grid, then along its columns.
    across = torch.stack([linear_at_centres(grid[r], NEW) for r in range(OLD)])  # (OLD, NEW, C)
    expected = torch.stack([linear_at_centres(across[:, c], NEW) for c in range(NEW)], dim=1)  # (NEW, NEW, C)
    assert torch.allclose(after[head : head + NEW**2], expected.reshape(NEW**2, -1), atol=1e-5)
    prompt = len(before) - head - OLD**2
    assert torch.equal(after[head + NEW**2 : head + NEW**2 + prompt], before[head + OLD**2 :])
    assert torch.equal(after[head + NEW**2 + prompt :], fresh[ENCODER_POSITIONS][head + NEW**2 + prompt :])


def test_decoder_positions_keep_the_old_rows(warmed) -> None:
    old, fresh, new, _, _, _ = warmed
    before, after = old[DECODER_POSITIONS], new.state_dict()[DECODER_POSITIONS]
    assert torch.equal(after[: len(before)], before)
    assert torch.equal(after[len(before) :], fresh[DECODER_POSITIONS][len(before) :])


def test_the_warm_started_model_generates_at_the_new_size(warmed) -> None:
    _, _, new, processor, _, _ = warmed
    image = Image.fromarray((np.random.default_rng(0).random((120, 200, 3)) * 255).astype("uint8"))
    inputs = processor(text=["<OD>"], images=[image], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 96 and (inputs["input_ids"] == processor.tokenizer.image_token_id).sum() == 37
    ids = new.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    assert ids.shape[0] == 1 and ids.shape[1] > 1


def test_a_source_with_another_tokenizer_is_refused(tmp_path) -> None:
    from loomlens.model.tiny import build_processor
    from loomlens.model.tokenizer import build_tokenizer

    old, _, shape = build_tiny(TinyShape(image_size=64, **SMALL), seed=1)
    other = build_tokenizer(class_names=["zebra", "zebras"])
    old.save_pretrained(tmp_path)
    build_processor(other, 64, shape.image_seq_length).save_pretrained(tmp_path)
    new, processor, _ = build_tiny(TinyShape(image_size=96, **SMALL), seed=2)
    with pytest.raises(ValueError, match="another tokenizer"):
        warm_start(new, processor, str(tmp_path))
