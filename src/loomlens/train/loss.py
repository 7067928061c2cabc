"""The fine-tuning loss, computed by loomlens from logits and labels.

The model is never given `labels`: transformers would shift them itself (and releases have
disagreed on how), and its mean would count a batch's padding differently from ours. Here the
decoder inputs are built from the labels exactly as the label contract says, padding (-100)
never reaches the loss, and the loss is a *sum* plus a token count, so that gradient
accumulation and several processes can average over the true number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loomlens.data.dataset import IGNORE_INDEX


def decoder_inputs(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Labels shifted right one place, `decoder_start_token_id` first, -100 -> `pad_token_id`."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_token_id)
    return shifted


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of cross-entropy over label tokens, number of label tokens)`; -100 is ignored.

    Computed in fp32 whatever the logits' dtype (a bf16 log-softmax over the vocabulary loses
    the small probabilities that matter late in training).
    """
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def with_image_embeds(batch: dict[str, torch.Tensor], embeddings: torch.nn.Module, image_token_id: int) -> dict:
    """A batch with cached `image_features` -> the same batch with `inputs_embeds`: the token
    embeddings with the image features in place of the image tokens, as Florence-2 builds them."""
    batch = dict(batch)
    input_ids, features = batch.pop("input_ids"), batch.pop("image_features")
    embeds = embeddings(input_ids)
    mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    batch["inputs_embeds"] = embeds.masked_scatter(mask, features.to(embeds.dtype))
    return batch


def batch_loss(
    model, batch: dict[str, torch.Tensor], decoder_start_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward `batch` (from `Collator`, or `with_image_embeds`) through a Florence-2 (plain,
    peft- or DDP-wrapped) and return `(loss sum, token count)`. The decoder attends to the start
    token and the labels."""
    labels = batch["labels"]
    decoder_input_ids = decoder_inputs(labels, decoder_start_token_id, pad_token_id)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[:, 1:] = labels[:, :-1] != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "inputs_embeds") if k in batch}
    out = model(
        **inputs,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_mask,
        use_cache=False,
    )
    return token_cross_entropy(out.logits, labels)
