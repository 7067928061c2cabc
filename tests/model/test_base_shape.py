"""Florence-2-base's real shape (0.23 B parameters) through loomlens's own code paths.

Its weights can't be had here, so the model has random weights: what is checked is that the
real size builds from the native classes, trains one LoRA step with loomlens's loss, and
answers <OD> through loomlens's detection, at 768 x 768 with 577 image tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow


def test_base_shaped_model_trains_a_step_and_generates() -> None:
    from transformers import Florence2ForConditionalGeneration

    from loomlens.config import LoraSettings
    from loomlens.infer import detect
    from loomlens.model.lora import apply_lora
    from loomlens.model.tiny import base_shape_config, build_processor
    from loomlens.model.tokenizer import build_tokenizer
    from loomlens.train.loss import LossSpec, batch_loss

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(base_shape_config(len(tokenizer), tokenizer.image_token_id))
    # 0.23 B with BART's 51 289-token vocabulary; the tiny tokenizer's 1 746 tokens take 38 M
    # fewer embedding weights.
    n = sum(p.numel() for p in model.parameters())
    assert 0.18e9 < n < 0.21e9 and 0.22e9 < n + (51289 - len(tokenizer)) * 768 < 0.24e9
    processor = build_processor(tokenizer, image_size=768, image_seq_length=24 * 24 + 1)
    model = apply_lora(model, LoraSettings(targets="seed", r=8))
    image = Image.fromarray((np.random.default_rng(0).random((432, 768, 3)) * 255).astype("uint8"))
    batch = dict(processor(text=["<OD>"], images=[image], return_tensors="pt"))
    labels = tokenizer(["drop<loc_10><loc_20><loc_30><loc_40>"], return_tensors="pt").input_ids
    batch["labels"] = labels
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss_sum, tokens = batch_loss(model, batch, LossSpec(decoder_start_token_id=2, pad_token_id=tokenizer.pad_token_id))
    (loss_sum / tokens).backward()
    torch.optim.AdamW(trainable, lr=1e-3).step()
    assert torch.isfinite(loss_sum) and tokens == labels.numel()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    model.eval()
    (boxes,) = detect(model, processor, [image], max_boxes=1, batch_size=1)
    assert all(0 <= b.x1 < b.x2 <= 768 and 0 <= b.y1 < b.y2 <= 432 for b in boxes)
