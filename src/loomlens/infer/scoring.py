"""A confidence score for each generated box, from the log-probs of its own tokens.

In: a `Generation` and the image size. Out: its boxes in pixels, each with a score in [0, 1].

Florence-2 writes boxes as text and gives no score; the seed therefore computed mAP with every
score = 1, which lets the ranking of detections (the whole point of AP) fall to file order.
The generation's token log-probs carry the model's belief, and each box owns a span of tokens
(`parsing.align_boxes`). Two formulas, with `lp` the natural-log probabilities:

- `"product"` (default): `exp(sum(lp[label])) * exp(mean(lp[locs]))`, the probability of the
  label times the geometric-mean probability of the four coordinates. The label term holds the
  decision "there is another defect, and it is a drop" (its first token competes with `</s>`),
  which is what separates a real defect from a hallucinated one; the geometric mean keeps the
  four coordinates, whose mass is spread over neighbouring bins, from swamping it.
- `"mean"`: `exp(mean(lp[label + locs]))`, the geometric-mean probability of all the box's
  tokens; it weighs a two-token label like four coordinates, so it is less sensitive to the
  existence decision.
- `"label"`: `exp(sum(lp[label]))`, the existence decision alone; it ignores how sure the
  model is of the box's place, which is what separates a box that fits from one that merely
  overlaps (mAP50-95 weighs that).

All lie in [0, 1]. Each box's edges sit at the mean bins of its loc tokens
(`Generation.loc_bins`, `generation.expected_bins`) where the generation measured them, else at
the chosen bins' centres; and a coordinate's probability is then that of the bins within
`generation.LOC_SURE` of the chosen one (`Generation.loc_near`), not of the chosen bin alone: a
model sure of an edge to within a pixel but spread over three bins is sure of the box, and
a box's place is judged at IoU thresholds, not to the bin.

A box whose label the model nearly wrote as another class is also given under that class, at
the score that class's probability gives (`other_labels`), as a detector scores every class for
each box (COCO's evaluation counts such a box once per class): a defect boxed in the right
place under a near-miss name then still counts, below the boxes the model was sure of. Such a
box scores 0.5 at most (where its name parts from the written one, the search took the likelier
token, so the other had half the mass at most): above a threshold of 0.5 a place still has one
label. `bench/decoding.py` measures the
mAP each gives on a split, beside every score 1 (the seed's), and
docs/evaluate-and-predict.md says why `product` is the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

from loomlens.data.florence_text import dequantize
from loomlens.data.records import Box
from loomlens.infer.generation import Generation
from loomlens.infer.parsing import TokenBox, align_boxes, token_pieces

ScoreMethod = Literal["product", "mean", "label"]
SCORE_METHODS: tuple[str, ...] = ("product", "mean", "label")
#: Pixels: a box narrower or lower than this marks nothing a person could see or label (on an
#: image under 1000 px one location bin is under a pixel); it is dropped and counted.
MIN_BOX_PX = 1.0
#: A box is also given under another class (`other_labels`) when the model put at least this
#: probability on its label being that class: at most three other names a place, and most of
#: the gain of a lower floor for about half its extra boxes (docs/benchmarks.md, "A box under
#: the classes the model nearly wrote").
OTHER_LABEL_FLOOR = 0.25


def class_spellings(tokenizer, classes: Sequence[str]) -> dict[tuple[int, ...], str]:
    """Each class name of `classes` by the token ids the tokenizer spells it with (no special
    tokens), as the class grammar (`infer/grammar.py`) lets the model write it."""
    return {tuple(tokenizer(name, add_special_tokens=False).input_ids): name for name in classes}


def other_labels(generation: Generation, label_tokens: list[int], spellings: Mapping[tuple[int, ...], str]
                 ) -> dict[str, list[float]]:
    """The other classes the model nearly wrote for one box's label, with the log-probs its
    label tokens would have had.

    Args:
        generation: the answer, with `Generation.runners_up` measured (greedy search).
        label_tokens: indices of the box's label tokens in `generation.token_ids`.
        spellings: `class_spellings` of the classes the label may name.

    Returns:
        `{class: log-probs}`, one per class other than the written one whose spelling starts
        with the written label's first j tokens and a runner-up of its (j+1)th: the written
        tokens' log-probs up to j, then the runner-up's (the tokens after it were never read,
        so a class's probability is that of its spelling's start). Classes under
        `OTHER_LABEL_FLOOR` are left out; the likeliest reading of each class is kept.
    """
    written = [generation.token_ids[i] for i in label_tokens]
    found: dict[str, list[float]] = {}
    for j, index in enumerate(label_tokens):
        before = [generation.token_logprobs[i] for i in label_tokens[:j]]
        for token, logprob in generation.runners_up.get(index, []):
            lps = [*before, logprob]
            if math.exp(sum(lps)) < OTHER_LABEL_FLOOR:
                continue
            start = (*written[:j], token)
            for spelling, name in spellings.items():
                if spelling[: j + 1] == start and sum(lps) > sum(found.get(name, [-math.inf])):
                    found[name] = lps
    return found


def box_score(
    logprobs: list[float], label_tokens: list[int], loc_tokens: list[int], method: ScoreMethod = "product"
) -> float:
    """Score of one box from the log-probs of all tokens and the indices of its own.

    Args:
        logprobs: natural-log probability of every generated token.
        label_tokens: indices of the box's label tokens; may be empty (a label given by the
            prompt), and the score is then the coordinates' term alone (for `"label"`: 1).
        loc_tokens: indices of its four `<loc_N>` tokens.
        method: `"product"`, `"mean"` or `"label"` (the module docstring gives the formulas).

    Returns:
        The score in [0, 1]. Raises ValueError for an unknown `method`.
    """
    label = [logprobs[i] for i in label_tokens]
    locs = [logprobs[i] for i in loc_tokens]
    if method == "product":
        return math.exp(sum(label) + sum(locs) / len(locs))
    if method == "mean":
        span = label + locs
        return math.exp(sum(span) / len(span))
    if method == "label":
        return math.exp(sum(label))
    raise ValueError(f"unknown score method {method!r}; use one of {SCORE_METHODS}")


def scored_boxes(
    tokenizer,
    generation: Generation,
    width: int,
    height: int,
    default_label: str | None = None,
    method: ScoreMethod = "product",
    spellings: Mapping[tuple[int, ...], str] | None = None,
) -> tuple[list[Box], int]:
    """The boxes of `generation` in pixels of a `width` x `height` image, each with its score,
    and the count of dropped parts: malformed ones, and boxes under `MIN_BOX_PX` in width or
    height (the one place every scored box passes, so no command returns such a box).
    `default_label` names boxes with no label of their own (the phrase, for grounding). Edges
    are placed by `placed`; a coordinate's probability is its `Generation.loc_near` where
    measured, else its token's. With `spellings` (`class_spellings`), each box is also given
    under the other classes the model nearly wrote for it (`other_labels`), after every box
    as written."""
    pieces = token_pieces(tokenizer, generation.token_ids)
    aligned, dropped = align_boxes(pieces, width, height, default_label)
    visible = [t for t in aligned if t.box.width >= MIN_BOX_PX and t.box.height >= MIN_BOX_PX]
    logprobs = list(generation.token_logprobs)
    for i, near in generation.loc_near.items():
        logprobs[i] = math.log(near) if near > 0 else float("-inf")
    boxes = [
        replace(placed(t, generation.loc_bins, width, height),
                score=box_score(logprobs, t.label_tokens, t.loc_tokens, method))
        for t in visible
    ]
    others = [
        _relabelled(box, name, label_lps, [logprobs[i] for i in t.loc_tokens], method)
        for t, box in zip(visible, boxes) if spellings
        for name, label_lps in other_labels(generation, t.label_tokens, spellings).items()
    ]
    return boxes + others, dropped + len(aligned) - len(visible)


def _relabelled(box: Box, label: str, label_lps: list[float], loc_lps: list[float], method: ScoreMethod) -> Box:
    """`box` under `label`, scored as if its label tokens had had the log-probs `label_lps`."""
    k = len(label_lps)
    lps = [*label_lps, *loc_lps]
    return replace(box, label=label, score=box_score(lps, list(range(k)), list(range(k, len(lps))), method))


def placed(token_box: TokenBox, loc_bins: dict[int, float], width: int, height: int) -> Box:
    """`token_box`'s box with its edges at the mean bins of its four loc tokens (`loc_bins`,
    by token index; `Generation.loc_bins`); as parsed (the chosen bins' centres) when any of
    them is missing or the edges would come closer than `MIN_BOX_PX`."""
    means = [loc_bins.get(i) for i in token_box.loc_tokens]
    if None in means:
        return token_box.box
    x1, y1, x2, y2 = (dequantize(b, size) for b, size in zip(means, (width, height, width, height)))
    if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
        return token_box.box
    return replace(token_box.box, x1=x1, y1=y1, x2=x2, y2=y2)
