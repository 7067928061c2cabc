"""Batched Florence-2 generation that keeps what a score needs: token ids and their log-probs.

In: a model, its processor, images and task prompts. Out: one `Generation` (text, token ids,
log-probs) per image; `infer/scoring.py` turns those into box scores.

`model.generate` runs the search; the log-probability of each chosen token is read from the
model's *raw* logits (`output_logits=True`), renormalised over the whole vocabulary. Reading
the processed scores instead would report the probability under any constraint in force
(`infer/grammar.py`), which is 1.0 for a forced token and says nothing about the model's belief.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from loomlens.infer.pixels import model_inputs

#: Tokens a box label is assumed to take when the class names are unknown.
DEFAULT_LABEL_TOKENS = 4


@dataclass
class Generation:
    """One generated answer: `token_ids` from the first generated token up to and including
    the first `</s>` (no decoder-start, no padding), `token_logprobs[i]` the natural-log
    probability the model gave `token_ids[i]`, and `text` the decoded answer without `<s>`,
    `</s>` and padding (`<loc_N>` and other markers kept)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]


def label_token_count(tokenizer, classes: Sequence[str]) -> int:
    """The most tokens any name in `classes` takes (`DEFAULT_LABEL_TOKENS` if none given)."""
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in classes]
    return max(lengths, default=DEFAULT_LABEL_TOKENS)


def box_token_budget(max_boxes: int, label_tokens: int = DEFAULT_LABEL_TOKENS) -> int:
    """`max_new_tokens` for an answer of up to `max_boxes` boxes: each box is its label plus
    four `<loc_N>`, and the answer is wrapped in `<s>` ... `</s>`."""
    return 2 + max_boxes * (label_tokens + 4)


def decoder_limit(model) -> int:
    """The longest answer the decoder's position table allows (`max_new_tokens` cap)."""
    return int(model.config.text_config.max_position_embeddings) - 2


def _trim(ids: list[int], logprobs: list[float], eos_id: int, pad_id: int) -> tuple[list[int], list[float]]:
    """Cut a generated row after its first `</s>`; a row that hit the limit loses its padding."""
    end = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
    while end and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end], logprobs[:end]


@torch.no_grad()
def generate(
    model,
    processor,
    images: list[Image.Image],
    prompts: list[str],
    max_new_tokens: int,
    num_beams: int = 1,
    logits_processor=None,
    fast_pixels: bool = True,
) -> list[Generation]:
    """Generate one answer per (image, prompt) pair in a single batch.

    `prompts` are Florence-2 task prompts (`"<OD>"`, `"<CAPTION_TO_PHRASE_GROUNDING>drop"`);
    the processor turns them into its natural-language questions. Greedy by default,
    beam search with `num_beams > 1` (the best beam is returned). `logits_processor` is an
    optional `transformers.LogitsProcessorList` (e.g. the `<OD>` grammar). `fast_pixels`:
    pixels through `loomlens.infer.pixels` (False: the processor's own image path, as the
    seed's code ran it). A `model` that is no torch module (an ONNX export,
    `infer/onnx_runtime.py`) runs its own greedy search. Returns one `Generation` per input,
    in order.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        return []
    budget = min(max_new_tokens, decoder_limit(model))
    if not isinstance(model, torch.nn.Module):  # an exported model (infer/onnx_runtime.py) searches itself
        return model.generate(processor, images, prompts, budget, num_beams, logits_processor, fast_pixels)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype  # the base's: an fp32 adapter may sit on a bf16 base
    inputs = model_inputs(processor, images, prompts, fast_pixels)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    out = model.generate(
        **inputs,
        max_new_tokens=budget,
        num_beams=num_beams,
        do_sample=False,
        early_stopping=num_beams > 1,
        output_logits=True,
        return_dict_in_generate=True,
        logits_processor=logits_processor,
    )
    # Log-probs of the chosen tokens under the raw logits; beam_indices maps each step to
    # the beam that produced it (None for greedy).
    logprobs = model.compute_transition_scores(
        out.sequences, out.logits, getattr(out, "beam_indices", None), normalize_logits=True
    )
    generated = out.sequences[:, -logprobs.shape[1] :]  # drop the decoder-start token
    return [decode_generation(tokenizer, ids_row, lp_row)
            for ids_row, lp_row in zip(generated.tolist(), logprobs.tolist())]


def decode_generation(tokenizer, ids_row: list[int], logprobs_row: list[float]) -> Generation:
    """One generated row (without the decoder-start token) and its log-probs as a `Generation`:
    cut after the first `</s>`, decoded without the frame tokens."""
    ids, lps = _trim(ids_row, logprobs_row, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Only the frame tokens are dropped from the text: a tokenizer may register `<loc_N>` as
    # special (Microsoft's does), and skip_special_tokens would then drop the answer itself.
    frame = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    text = tokenizer.decode([i for i in ids if i not in frame], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    return Generation(text=text, token_ids=ids, token_logprobs=lps)
