"""Scored detection: images in, boxes in pixels with confidence scores out, in batches.

The one path from pixels to scored boxes: prompt -> `generate` (optionally through the class
grammar) -> `scored_boxes`. `loomlens.evaluate` and `loomlens.predict` both call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from transformers import LogitsProcessorList

from loomlens.data.records import Box
from loomlens.infer.generation import (
    DEFAULT_LABEL_TOKENS,
    Generation,
    box_token_budget,
    generate,
    label_token_count,
)
from loomlens.infer.grammar import BoxGrammar
from loomlens.infer.scoring import ScoreMethod, scored_boxes

T = TypeVar("T")


@dataclass
class Detection:
    """The boxes found in one image, the count of malformed parts the parser dropped, and the
    generation they were read from."""

    boxes: list[Box]
    dropped: int
    generation: Generation


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most `size` items; reads `items` lazily (a video stream too)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def detect_with_details(
    model,
    processor,
    images: Sequence[Image.Image],
    *,
    task: str = "<OD>",
    text: str | None = None,
    max_boxes: int = 20,
    batch_size: int = 8,
    constrained: bool = False,
    classes: Sequence[str] = (),
    num_beams: int = 1,
    score_method: ScoreMethod = "product",
) -> list[Detection]:
    """Run a box task (`<OD>`, `<DENSE_REGION_CAPTION>`, `<CAPTION_TO_PHRASE_GROUNDING>`, ...)
    on `images`, `batch_size` at a time, and return one `Detection` per image.

    `text` follows the task token in the prompt (the phrase, for grounding) and names boxes
    that come without a label. `classes` bound the label length of the token budget and, with
    `constrained=True` (`<OD>` only), are the only labels the model may write.
    """
    tokenizer = processor.tokenizer
    # `<OD>` labels are class names; other tasks write captions or phrases, which are longer.
    label_tokens = label_token_count(tokenizer, classes) if task == "<OD>" else 2 * DEFAULT_LABEL_TOKENS
    max_new_tokens = box_token_budget(max_boxes, label_tokens)
    if constrained and task != "<OD>":
        raise ValueError(f"constrained decoding is defined for <OD> only, not {task}")
    prompt = task + (text or "")
    results: list[Detection] = []
    for chunk in batched(images, batch_size):
        # A fresh grammar per batch: its memo of prefixes only grows within one generate call.
        processors = (
            LogitsProcessorList([BoxGrammar(tokenizer, classes, max_boxes, max_new_tokens)]) if constrained else None
        )
        generations = generate(
            model, processor, chunk, [prompt] * len(chunk), max_new_tokens, num_beams, processors
        )
        for image, gen in zip(chunk, generations):
            boxes, dropped = scored_boxes(tokenizer, gen, image.width, image.height, text or None, score_method)
            results.append(Detection(boxes[:max_boxes], dropped, gen))
    return results


def answer_probability(detections: Iterable[Detection]) -> float | None:
    """The highest `Generation.answer_probability` of the detections made on one image (its
    tiles and the whole frame, or the image alone): for `<OD>`, the model's probability that the
    image holds a defect anywhere. None when none was measured."""
    measured = [d.generation.answer_probability for d in detections if d.generation.answer_probability is not None]
    return max(measured, default=None)


def detect(model, processor, images: Sequence[Image.Image], **options) -> list[list[Box]]:
    """Boxes in pixels, each with a `score` in [0, 1], for each of `images`: `detect_with_details`
    without the details; `options` are its keyword arguments (task, text, max_boxes, ...)."""
    return [d.boxes for d in detect_with_details(model, processor, images, **options)]
