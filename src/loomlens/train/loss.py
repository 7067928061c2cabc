"""The fine-tuning loss, computed by loomlens from logits and labels.

The model is never given `labels`: transformers would shift them itself (and releases have
disagreed on how), and its mean would count a batch's padding differently from ours. Here the
decoder inputs are built from the labels exactly as the label contract says, padding (-100)
never reaches the loss, and the loss is a *sum* plus a token count, so that gradient
accumulation and several processes can average over the true number of tokens.

Two optional terms help a small model learn *where* (both off by default, both measured on the
tiny model, whose pretraining needed them too; see its model card): Gaussian soft labels over
the location bins (`loc_sigma`: a near miss costs less than a far one), and the pointer loss
(`pointer_weight`: at each location token the last decoder layer's cross-attention is pushed
onto the image cells of that box edge). Without the pointer, the tiny model fine-tuned on loom
frames answers every image with the same boxes: it stops looking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loomlens.data.dataset import IGNORE_INDEX
from loomlens.train.spatial_loss import pointer_loss, pointer_mask

#: Florence-2's location tokens: `<loc_0>`..`<loc_999>`, consecutive ids.
NUM_BINS = 1000


@dataclass(frozen=True)
class LossSpec:
    """What the loss needs besides the batch: the decoder's start and pad ids, and for the
    optional terms the id of `<loc_0>`, the soft-label width in bins and the pointer's weight
    and image grid (cells per side)."""

    decoder_start_token_id: int
    pad_token_id: int
    loc_start: int | None = None
    loc_sigma: float = 0.0
    pointer_weight: float = 0.0
    grid: int = 0

    @property
    def plain(self) -> LossSpec:
        """The same spec with the optional terms off: the true NLL, for validation."""
        return LossSpec(self.decoder_start_token_id, self.pad_token_id)


def decoder_inputs(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Labels shifted right one place, `decoder_start_token_id` first, -100 -> `pad_token_id`."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_token_id)
    return shifted


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, loc_start: int | None = None, loc_sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of cross-entropy over label tokens, number of label tokens)`; -100 is ignored.

    With `loc_sigma` > 0 (and `loc_start`, the id of `<loc_0>`), a location token's target is
    a Gaussian over the 1000 bins centred on the true bin instead of that bin alone. Computed in
    fp32 whatever the logits' dtype (a bf16 log-softmax loses the small probabilities).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if loc_sigma <= 0 or loc_start is None:
        return (nll * valid).sum(), valid.sum()
    is_loc = valid & (labels >= loc_start) & (labels < loc_start + NUM_BINS)
    bins = torch.arange(NUM_BINS, device=logits.device, dtype=torch.float32)
    target = (labels[is_loc] - loc_start).float()
    soft = torch.softmax(-((bins[None, :] - target[:, None]) ** 2) / (2 * loc_sigma**2), dim=-1)
    loc_loss = -(soft * logp[..., loc_start : loc_start + NUM_BINS][is_loc]).sum()
    return (nll * (valid & ~is_loc)).sum() + loc_loss, valid.sum()


def loc_nll(logits: torch.Tensor, labels: torch.Tensor, loc_start: int) -> torch.Tensor:
    """Mean NLL of the exact location bins among `labels` (0 when there are none): how well a
    model places boxes, whatever soft labels it trains with."""
    is_loc = (labels >= loc_start) & (labels < loc_start + NUM_BINS)
    if not is_loc.any():
        return logits.new_zeros((), dtype=torch.float32)
    logp = F.log_softmax(logits[is_loc].float(), dim=-1)
    return -logp.gather(-1, labels[is_loc].unsqueeze(-1)).mean()


def with_image_embeds(batch: dict[str, torch.Tensor], embeddings: torch.nn.Module, image_token_id: int) -> dict:
    """A batch with cached `image_features` -> the same batch with `inputs_embeds`: the token
    embeddings with the image features in place of the image tokens, as Florence-2 builds them."""
    batch = dict(batch)
    input_ids, features = batch.pop("input_ids"), batch.pop("image_features")
    embeds = embeddings(input_ids)
    mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    batch["inputs_embeds"] = embeds.masked_scatter(mask, features.to(embeds.dtype))
    return batch


def batch_loss(model, batch: dict[str, torch.Tensor], spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward `batch` (from `Collator`, or `with_image_embeds`) through a Florence-2 (plain,
    peft- or DDP-wrapped) and return `(loss sum, token count)`. The decoder attends to the start
    token and the labels. The pointer term (a per-location mean) enters the sum weighted by the
    token count, so dividing by the count gives mean cross-entropy + weight x pointer loss; it
    needs the model in eager attention (the weights are not returned otherwise)."""
    labels = batch["labels"]
    decoder_input_ids = decoder_inputs(labels, spec.decoder_start_token_id, spec.pad_token_id)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[:, 1:] = labels[:, :-1] != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "inputs_embeds") if k in batch}
    out = model(
        **inputs,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_mask,
        use_cache=False,
        output_attentions=spec.pointer_weight > 0,
    )
    loss_sum, count = token_cross_entropy(out.logits, labels, spec.loc_start, spec.loc_sigma)
    if spec.pointer_weight > 0:
        cross = out.cross_attentions[-1]
        pointer = pointer_loss(cross, pointer_mask(labels, spec.loc_start, spec.grid, cross.shape[-1]))
        loss_sum = loss_sum + spec.pointer_weight * pointer * count
    return loss_sum, count
