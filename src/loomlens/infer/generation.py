"""Batched Florence-2 generation that keeps what a score needs: token ids and their log-probs.

In: a model, its processor, images and task prompts. Out: one `Generation` (text, token ids,
log-probs) per image; `infer/scoring.py` turns those into box scores.

`model.generate` runs the search; the log-probability of each chosen token is read from the
model's *raw* logits (`output_logits=True`), renormalised over the whole vocabulary. Reading
the processed scores instead would report the probability under any constraint in force
(`infer/grammar.py`), which is 1.0 for a forced token and says nothing about the model's belief.

Every call sets each generation setting loomlens relies on (`generation_settings`), so a
checkpoint's `generation_config.json` never changes an answer: the real Florence-2's
(`num_beams 3`, `no_repeat_ngram_size 3`) would otherwise ban the second `broken-weft` of an
answer, and a re-saved one may carry swapped bos/eos/pad ids. Rows of the output layer past
the tokenizer's length (the native conversion pads the vocabulary to a multiple of 64) are no
tokens at all: `VocabMask` keeps them out of every answer and out of the log-probs.

Each answer also carries how likely the model thought any answer was: one minus the raw
probability of `</s>` at the first answer position (`Generation.answer_probability`). For
`<OD>` that is the model's own probability that the image holds a defect, which ranks frames
for an OK/NG decision better than their best box's score (docs/evaluate-and-predict.md).

And each `<loc_N>` the search chose carries the mean bin of the model's distribution near it
(`expected_bins`, `Generation.loc_bins`): the search still writes the most likely bin, but a
box edge is placed where the model's belief centres, between bins when it is spread over them;
and the probability of the bins within `LOC_SURE` of it (`Generation.loc_near`), how sure the
model is of the edge to a few bins, which `infer/scoring.py` scores the box's place by.

Each other token the search chose (a label's words) carries the `RUNNERS_UP` tokens it could
have chosen instead, the likeliest the rules (the class grammar) allowed, with their raw
log-probs (`Generation.runners_up`), so a box can also be read under the class the model ranked
second (`scoring.scored_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from loomlens.infer.pixels import model_inputs
from loomlens.model.tokenizer import loc_token_ids

#: The step of the first answer token: step 0 is the `<s>` every answer is forced to begin with.
ANSWER_START = 1
#: Bins each side of a chosen `<loc_N>` whose probabilities place its coordinate
#: (`expected_bins`): wide enough for the spread of a thin defect's edge, narrow enough to leave
#: out another edge the model also believes in (docs/benchmarks.md, "Box edges at the mean bin").
LOC_WINDOW = 30
#: Bins each side of a chosen `<loc_N>` whose probability says how sure the model is of that
#: edge (`Generation.loc_near`): 0.5 % of a side, a pixel or two on a camera frame at the
#: model's input (docs/benchmarks.md, "Box scores from the mass near each edge").
LOC_SURE = 5
#: Tokens kept beside each chosen token that is no `<loc_N>` (`Generation.runners_up`): enough
#: for the second and third class a label could have been.
RUNNERS_UP = 3
#: Tokens a box label is assumed to take when the class names are unknown.
DEFAULT_LABEL_TOKENS = 4
#: Generation settings that have no neutral value to pass: a checkpoint that sets one of them
#: in its generation_config is refused (`generation_settings`), since it would change answers.
UNSETTABLE = (
    "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "exponential_decay_length_penalty", "stop_strings", "max_time", "guidance_scale",
    "watermarking_config", "force_words_ids", "constraints", "penalty_alpha", "dola_layers",
    "prompt_lookup_num_tokens",
)


class VocabMask(LogitsProcessor):
    """Forbids the output rows at or past `size` (the tokenizer's length): the padding rows a
    native Florence-2's `lm_head` has beyond the real vocabulary, which decode to nothing."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.size:
            return scores
        masked = scores.clone()
        masked[:, self.size :] = float("-inf")
        return masked


class NoEmptyAnswer(LogitsProcessor):
    """Forbids `</s>` as an answer's first token, so that the search writes the answer it ranked
    after "nothing" (`detection.worth_rereading`). The log-probs `generate` reports stay the raw
    ones, so the boxes of such an answer score as low as the model believed in them."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != ANSWER_START + 1:  # the decoder-start token, then `<s>`
            return scores
        masked = scores.clone()
        masked[:, self.eos] = float("-inf")
        return masked


def generation_settings(model, tokenizer, *, max_new_tokens: int, num_beams: int) -> dict:
    """Every `generate` setting that can change an answer, set to what loomlens wants.

    Args:
        model: the Florence-2 whose `generation_config` is checked for settings with no
            neutral value (`UNSETTABLE`).
        tokenizer: gives the bos/eos/pad ids (a re-saved checkpoint may carry swapped ones).
        max_new_tokens: the answer's token budget (capped by the decoder's position table).
        num_beams: 1 for greedy, more for beam search.

    Returns:
        Keyword arguments for `model.generate`: greedy or plain beam search, no n-gram ban,
        no penalties, `<s>` forced first and `</s>` forced at the budget's end (the label
        format `</s><s>answer</s>`), ids from the tokenizer.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be 1 or more, got {num_beams}")
    inherited = getattr(model, "generation_config", None)
    found = [k for k in UNSETTABLE if inherited is not None and getattr(inherited, k, None) not in (None, 0, [], {})]
    if found:
        raise ValueError(
            f"the model's generation_config sets {', '.join(found)}, which would change loomlens's answers; "
            "remove those entries from the checkpoint's generation_config.json"
        )
    return {
        "max_new_tokens": min(max_new_tokens, decoder_limit(model)),
        "min_new_tokens": 0,
        "num_beams": num_beams,
        "num_beam_groups": 1,
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": num_beams > 1,
        "length_penalty": 1.0,
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "num_return_sequences": 1,
        "renormalize_logits": False,
        "remove_invalid_values": False,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,
        "forced_bos_token_id": tokenizer.bos_token_id,
        "forced_eos_token_id": tokenizer.eos_token_id,
    }


@dataclass
class Generation:
    """One generated answer: `token_ids` from the first generated token up to and including
    the first `</s>` (no decoder-start, no padding), `token_logprobs[i]` the natural-log
    probability the model gave `token_ids[i]`, and `text` the decoded answer without `<s>`,
    `</s>` and padding (`<loc_N>` and other markers kept). `token_entropies[i]` is the entropy
    (nats) of the model's raw next-token distribution at step i, how unsure it was whatever it
    chose; empty where it was not measured (beam search, the onnx backend). `loc_bins[i]`,
    for each `<loc_N>` among `token_ids` at index i, is the mean bin near it (`expected_bins`),
    fractional, and `loc_near[i]` the probability of the bins within `LOC_SURE` of the chosen
    one; both empty under beam search, whose boxes sit at the chosen bins' centres and score by
    their tokens' own probabilities. `runners_up[i]`, for each other token at index i, holds
    up to `RUNNERS_UP` tokens the search could have chosen there instead (allowed by its rules)
    as (id, natural-log probability under the raw distribution), most likely first; empty under
    beam search.
    `answer_probability` is 1 - P(`</s>`) at the first answer step under the raw
    distribution: how likely the model thought an answer other than an empty one was, whatever
    it wrote (None when the budget ended before that step)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    token_entropies: list[float] = field(default_factory=list)
    answer_probability: float | None = None
    loc_bins: dict[int, float] = field(default_factory=dict)
    loc_near: dict[int, float] = field(default_factory=dict)
    runners_up: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def mean_entropy(self) -> float | None:
        """The mean of `token_entropies` over the answer (nats), None when not measured."""
        return sum(self.token_entropies) / len(self.token_entropies) if self.token_entropies else None


def label_token_count(tokenizer, classes: Sequence[str]) -> int:
    """The most tokens any name in `classes` takes (`DEFAULT_LABEL_TOKENS` if none given)."""
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in classes]
    return max(lengths, default=DEFAULT_LABEL_TOKENS)


#: The boxes an answer is read for when neither the caller nor the run says more.
MAX_BOXES = 20


def box_token_budget(max_boxes: int, label_tokens: int = DEFAULT_LABEL_TOKENS) -> int:
    """`max_new_tokens` for an answer of up to `max_boxes` boxes: each box is its label plus
    four `<loc_N>`, and the answer is wrapped in `<s>` ... `</s>`."""
    return 2 + max_boxes * (label_tokens + 4)


def decoder_limit(model) -> int:
    """The longest answer the decoder's position table allows (`max_new_tokens` cap)."""
    return int(model.config.text_config.max_position_embeddings) - 2


def encoder_limit(model) -> int:
    """The most positions (the prompt's tokens and the picture's) the encoder's table holds:
    past it, the model fails deep in its embeddings ("IndexError: index out of range")."""
    return int(model.config.text_config.max_position_embeddings)


def encoder_positions(processor, prompt: str) -> int:
    """The encoder positions `prompt` takes with a picture: the question the processor words it
    as, in tokens, and the picture's tokens (any picture: their count is fixed)."""
    return len(processor(text=[prompt], images=[Image.new("RGB", (8, 8))])["input_ids"][0])


def _trim(ids: list[int], logprobs: list[float], eos_id: int, pad_id: int) -> tuple[list[int], list[float]]:
    """Cut a generated row after its first `</s>`; a row that hit the limit loses its padding."""
    end = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
    while end and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end], logprobs[:end]


def _entropies(logprobs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(batch, steps) entropy in nats of each step's distribution (`_real_logprobs`: padding
    rows at -inf hold no mass)."""
    steps = []
    for lp in logprobs:
        p = lp.exp()
        steps.append(-torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(-1))
    return torch.stack(steps, dim=1)


def _real_logprobs(logits: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """Per-step log-softmax over the first `size` rows (the tokenizer's tokens), the padding
    rows at -inf, so the tensors keep the model's width for `compute_transition_scores`."""
    out = []
    for step in logits:
        lp = torch.full_like(step, float("-inf"), dtype=torch.float32)
        lp[:, :size] = torch.log_softmax(step[:, :size].float(), dim=-1)
        out.append(lp)
    return tuple(out)


def expected_bins(loc_logits: torch.Tensor, chosen: torch.Tensor, window: int = LOC_WINDOW) -> torch.Tensor:
    """The mean bin within `window` bins of each chosen one, under the model's distribution
    there: a box edge as the expectation of a distribution over discrete positions rather
    than its mode (Li et al. 2020, "Generalized Focal Loss", section 3.3). The window keeps
    a second peak (the edge of another defect) out of the mean.

    Args:
        loc_logits: (rows, bins) raw logits (or log-probs) of `<loc_0>`..`<loc_{bins-1}>`.
        chosen: (rows,) integer bin each row chose.
        window: bins each side of the chosen one; 0 gives the chosen bins back.

    Returns:
        (rows,) float32 bins, each within `window` of its chosen bin.
    """
    bins = torch.arange(loc_logits.shape[-1], device=loc_logits.device)
    near = (bins[None, :] - chosen[:, None]).abs() <= window
    weights = torch.softmax(loc_logits.float().masked_fill(~near, float("-inf")), dim=-1)
    return (weights * bins).sum(-1)


def loc_lookup(tokenizer, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per search, for `chosen_loc_bins`: the ids of `<loc_0>`..`<loc_999>` in order,
    and for each of the `vocab` output rows its bin (-1 for a token that is no `<loc_N>`)."""
    ids = torch.tensor(loc_token_ids(tokenizer), device=device)
    bin_of = torch.full((vocab,), -1, dtype=torch.long, device=device)
    bin_of[ids] = torch.arange(len(ids), device=device)
    return ids, bin_of


def chosen_loc_bins(step_logprobs: torch.Tensor, chosen: torch.Tensor, lookup: tuple[torch.Tensor, torch.Tensor]
                    ) -> dict[int, tuple[float, float]]:
    """At one search step: `{row: (mean bin, probability near)}` for the rows of `chosen`
    ((rows,) token ids) that chose a `<loc_N>`: the `expected_bins` within `LOC_WINDOW`, and the
    probability of the bins within `LOC_SURE` of N. `step_logprobs` ((rows, vocab)) are the
    step's log-probs over the tokenizer's tokens; `lookup` is `loc_lookup`'s."""
    ids, bin_of = lookup
    bins = bin_of[chosen.to(bin_of.device)]
    rows = (bins >= 0).nonzero().flatten()
    if not len(rows):
        return {}
    locs, picked = step_logprobs[rows][:, ids].float(), bins[rows]
    means = expected_bins(locs, picked, window=LOC_WINDOW)
    near = (torch.arange(len(ids), device=ids.device)[None, :] - picked[:, None]).abs() <= LOC_SURE
    sure = locs.masked_fill(~near, float("-inf")).logsumexp(-1).exp()
    return dict(zip(rows.tolist(), zip(means.tolist(), sure.tolist())))


def allowed_top(scores: torch.Tensor) -> torch.Tensor:
    """(rows, `RUNNERS_UP` + 1) ids of the tokens the search could choose at one step, best
    first, from its processed `scores` ((rows, vocab), -inf where a rule forbids a token); -1
    where fewer tokens are allowed."""
    top = scores.topk(RUNNERS_UP + 1, dim=-1)
    return top.indices.masked_fill(top.values == float("-inf"), -1)


class AllowedTop(LogitsProcessor):
    """Last in a greedy search's processors: keeps each step's `allowed_top` for
    `chosen_runners_up` (so a runner-up is a token the class grammar would have let through);
    the scores pass unchanged."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(allowed_top(scores))
        return scores


def chosen_runners_up(step_logprobs: torch.Tensor, candidates: torch.Tensor, chosen: torch.Tensor,
                      lookup: tuple[torch.Tensor, torch.Tensor]) -> dict[int, list[tuple[int, float]]]:
    """At one search step: `{row: [(token id, log-prob), ...]}` for the rows of `chosen`
    ((rows,) token ids) that chose no `<loc_N>`: up to `RUNNERS_UP` of the tokens the search
    could have chosen instead (`candidates`, `allowed_top`'s), with their log-probs under
    `step_logprobs` ((rows, vocab)), most likely first. `lookup` is `loc_lookup`'s."""
    rows = (lookup[1][chosen.to(lookup[1].device)] < 0).nonzero().flatten().tolist()
    found = {}
    for row, options, token in zip(rows, candidates[rows].tolist(), chosen[rows].tolist()):
        others = [t for t in options if t >= 0 and t != token][:RUNNERS_UP]
        found[row] = [(t, lp) for t, lp in zip(others, step_logprobs[row, others].tolist())]
    return found


@dataclass
class StepReadings:
    """What one row's search steps said beside the chosen tokens, by step: the
    `Generation.loc_bins`, `loc_near` and `runners_up` it is decoded with."""

    loc_bins: dict[int, float] = field(default_factory=dict)
    loc_near: dict[int, float] = field(default_factory=dict)
    runners_up: dict[int, list[tuple[int, float]]] = field(default_factory=dict)


def step_readings(step: int, step_logprobs: torch.Tensor, candidates: torch.Tensor, chosen: torch.Tensor,
                  lookup: tuple[torch.Tensor, torch.Tensor], rows: list[StepReadings]) -> None:
    """Add search step `step`'s readings to `rows` (one `StepReadings` per row of `chosen`, its
    (rows,) token ids; `step_logprobs` (rows, vocab) over the tokenizer's tokens; `candidates`
    the step's `allowed_top`): the `chosen_loc_bins` of the rows that chose a `<loc_N>`, the
    `chosen_runners_up` of the rest."""
    for row, (mean, sure) in chosen_loc_bins(step_logprobs, chosen, lookup).items():
        rows[row].loc_bins[step], rows[row].loc_near[step] = mean, sure
    for row, others in chosen_runners_up(step_logprobs, candidates, chosen, lookup).items():
        rows[row].runners_up[step] = others


def _readings(logprobs: tuple[torch.Tensor, ...], candidates: list[torch.Tensor], generated: torch.Tensor,
              tokenizer) -> list[StepReadings]:
    """For each row of `generated` ((batch, steps), greedy: `logprobs[t]` and `candidates[t]`,
    `AllowedTop`'s, are row-aligned), the `step_readings` of all its steps."""
    lookup = loc_lookup(tokenizer, logprobs[0].shape[-1], generated.device) if logprobs else None
    found = [StepReadings() for _ in range(generated.shape[0])]
    for t, (step, options) in enumerate(zip(logprobs, candidates)):
        step_readings(t, step, options, generated[:, t], lookup, found)
    return found


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
    size = len(tokenizer)
    allowed = AllowedTop()  # last: what the rules left the search to choose from
    processors = LogitsProcessorList([VocabMask(size), *(logits_processor or []), allowed])
    out = model.generate(
        **inputs,
        **generation_settings(model, tokenizer, max_new_tokens=budget, num_beams=num_beams),
        output_logits=True,
        return_dict_in_generate=True,
        logits_processor=processors,
    )
    # Log-probs of the chosen tokens under the raw logits over the real vocabulary (padding
    # rows are no tokens); beam_indices maps each step to the beam that produced it.
    real = _real_logprobs(out.logits, size)
    logprobs = model.compute_transition_scores(
        out.sequences, real, getattr(out, "beam_indices", None), normalize_logits=False
    )
    generated = out.sequences[:, -logprobs.shape[1] :]  # drop the decoder-start token
    # A greedy step's distribution belongs to its row; a beam step's to whichever beam it was.
    entropies = _entropies(real).tolist() if num_beams == 1 else [None] * len(images)
    # At the first answer step every beam of an image holds the same `<s>`: its first beam speaks for all.
    ends = (real[ANSWER_START][::num_beams, tokenizer.eos_token_id].tolist() if len(real) > ANSWER_START
            else [None] * len(images))
    readings = (_readings(real, allowed.steps, generated, tokenizer) if num_beams == 1
                else [StepReadings()] * len(images))
    return [decode_generation(tokenizer, ids_row, lp_row, ent_row, end, read)
            for ids_row, lp_row, ent_row, end, read in zip(generated.tolist(), logprobs.tolist(), entropies, ends,
                                                           readings)]


def decode_generation(tokenizer, ids_row: list[int], logprobs_row: list[float],
                      entropies_row: list[float] | None = None, end_logprob: float | None = None,
                      readings: StepReadings | None = None) -> Generation:
    """One generated row (without the decoder-start token), its log-probs, (optionally) the
    entropy of each step, the log-probability of `</s>` at the first answer step
    (`ANSWER_START`) and what its steps said beside the chosen tokens (`StepReadings`: the
    `Generation.loc_bins`, `loc_near` and `runners_up`) as a `Generation`: cut after the first
    `</s>`, decoded without the frame tokens."""
    ids, lps = _trim(ids_row, logprobs_row, tokenizer.eos_token_id, tokenizer.pad_token_id)
    entropies = list(entropies_row[: len(ids)]) if entropies_row is not None else []
    # Only the frame tokens are dropped from the text: a tokenizer may register `<loc_N>` as
    # special (Microsoft's does), and skip_special_tokens would then drop the answer itself.
    frame = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    size = len(tokenizer)  # ids past it are the padded rows of the lm_head: no tokens
    text = tokenizer.decode([i for i in ids if i not in frame and i < size], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    answer = None if end_logprob is None else 1.0 - math.exp(end_logprob)
    read = readings or StepReadings()

    def kept(by_step: dict) -> dict:
        return {i: v for i, v in by_step.items() if i < len(ids)}

    return Generation(text=text, token_ids=ids, token_logprobs=lps, token_entropies=entropies,
                      answer_probability=answer, loc_bins=kept(read.loc_bins), loc_near=kept(read.loc_near),
                      runners_up=kept(read.runners_up))
