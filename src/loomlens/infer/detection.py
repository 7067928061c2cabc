"""Scored detection: images in, boxes in pixels with confidence scores out, in batches.

The one path from pixels to scored boxes: prompt -> `generate` (optionally through the class
grammar) -> `scored_boxes`. `loomlens.evaluate` and `loomlens.predict` both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from PIL import Image
from transformers import LogitsProcessorList

from loomlens.config import INFER_BATCH_SIZE
from loomlens.data.records import Box
from loomlens.infer.generation import (
    DEFAULT_LABEL_TOKENS,
    Generation,
    NoEmptyAnswer,
    box_token_budget,
    generate,
    label_token_count,
)
from loomlens.infer.grammar import BoxGrammar
from loomlens.infer.scoring import ScoreMethod, class_spellings, scored_boxes
from loomlens.infer.streams import in_streams, stream_count
from loomlens.infer.tta import check_views, fuse_boxes, mirrored, unmirrored, worth_mirrors

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
    batch_size: int = INFER_BATCH_SIZE,
    constrained: bool = False,
    classes: Sequence[str] = (),
    num_beams: int = 1,
    score_method: ScoreMethod = "product",
    streams: int | None = None,
    views: Sequence[str] = ("",),
    other_labels: bool = False,
    after_batch: Callable[[], None] | None = None,
    reread_upto: int | None = None,
) -> list[Detection]:
    """Run a box task (`<OD>`, `<DENSE_REGION_CAPTION>`, `<CAPTION_TO_PHRASE_GROUNDING>`, ...)
    on `images`, `batch_size` at a time, and return one `Detection` per image.

    `text` follows the task token in the prompt (the phrase, for grounding) and names boxes
    that come without a label. `classes` bound the label length of the token budget and, with
    `constrained=True` (`<OD>` only), are the only labels the model may write. Each batch runs
    as `streams` parts at once (None: `stream_count(model)`, two on a CPU; `infer/streams.py`).
    `views` (`infer/tta.py`): the mirrors each image is also looked at through where its first
    view finds it `worth_mirrors`, their boxes fused into one `Detection` per image (its
    generation, text and entropies are the first view's); the default looks once, as the image
    is. `other_labels` (`<OD>` with `classes`): each box is also given under the other classes
    the model nearly wrote for it (`scoring.other_labels`), as evaluation counts a detector's
    boxes; off, a place has the one label written. An empty `<OD>` answer given in doubt is
    read again with an answer forced (`worth_rereading`) on images at most `reread_upto` px
    on their longer side (None: any; a tiled frame's tiles, not its coarser views).
    `after_batch()` is called after each batch of looks, mirrored and re-read ones too (a
    caller's deadline check, a server's small requests). Raises ValueError for views not in
    `ALL_VIEWS`.
    """
    tokenizer = processor.tokenizer
    # `<OD>` labels are class names; other tasks write captions or phrases, which are longer.
    label_tokens = label_token_count(tokenizer, classes) if task == "<OD>" else 2 * DEFAULT_LABEL_TOKENS
    max_new_tokens = box_token_budget(max_boxes, label_tokens)
    if constrained and task != "<OD>":
        raise ValueError(f"constrained decoding is defined for <OD> only, not {task}")
    prompt = task + (text or "")
    spellings = class_spellings(tokenizer, classes) if other_labels and task == "<OD>" and classes else None

    def detect_part(part: list[Image.Image], answer: bool = False) -> list[Detection]:
        # A fresh grammar per call: its memo of prefixes only grows within one generate call.
        processors = LogitsProcessorList(
            ([BoxGrammar(tokenizer, classes, max_boxes, max_new_tokens)] if constrained else [])
            + ([NoEmptyAnswer(tokenizer.eos_token_id)] if answer else []))
        generations = generate(model, processor, part, [prompt] * len(part), max_new_tokens, num_beams, processors)
        scored = [scored_boxes(tokenizer, gen, image.width, image.height, text or None, score_method, spellings)
                  for image, gen in zip(part, generations)]
        return [Detection(boxes[:max_boxes], dropped, gen) for (boxes, dropped), gen in zip(scored, generations)]

    parts = stream_count(model) if streams is None else streams
    views, images = check_views(views), list(images)

    def looked(copies: Iterable[Image.Image], answer: bool = False) -> list[Detection]:
        found = []
        for chunk in batched(copies, batch_size):
            found.extend(in_streams(lambda c: detect_part(c, answer), chunk, streams=parts))
            if after_batch is not None:
                after_batch()
        return found

    first = looked(mirrored(image, views[0]) for image in images)
    doubtful = [i for i, d in enumerate(first) if task == "<OD>" and worth_rereading(d, images[i], reread_upto)]
    for i, d in zip(doubtful, looked((mirrored(images[i], views[0]) for i in doubtful), answer=True)):
        first[i] = d
    again = {i for i, d in enumerate(first) if len(views) > 1 and worth_mirrors(d.generation.answer_probability)}
    rest = iter(looked(mirrored(images[i], view) for i in sorted(again) for view in views[1:]))
    found = []
    for i, (image, d) in enumerate(zip(images, first)):
        seen = [d, *(next(rest) for _ in views[1:])] if i in again else [d]
        found.append(d if len(seen) == 1 and not views[0] else _fused(seen, views[:len(seen)], image, max_boxes))
    return found


def worth_rereading(detection: Detection, image: Image.Image, upto: int | None = None) -> bool:
    """Whether `detection`, a first `<OD>` look at `image`, answered nothing though the model
    gave a defect as much as a picture worth mirrors (`tta.worth_mirrors`), on an image at most
    `upto` px on its longer side (None: any; a coarse view's forced guess would stand in for
    the tiles' finer boxes, `tiling.seen_whole`). Read again with the empty answer forbidden
    (`NoEmptyAnswer`), it gives the boxes the model half believed in, at their low scores, as a
    detector gives its low-scored candidates: a faint thread's stretch a tile thought "likely
    nothing" then joins its pieces in the tiles beside it (docs/evaluate-and-predict.md, "Tiling")."""
    probability = detection.generation.answer_probability
    return (not detection.generation.text.strip() and probability is not None and worth_mirrors(probability)
            and (upto is None or max(image.size) <= upto))


def _fused(seen: Sequence[Detection], views: Sequence[str], image: Image.Image, max_boxes: int) -> Detection:
    """One image's detections through each of `views` as one: the `max_boxes` best fused boxes
    (`tta.fuse_boxes`), dropped parts summed, the first view's generation with the mean answer
    probability of all."""
    boxes = fuse_boxes([[unmirrored(b, view, image.width, image.height) for b in d.boxes]
                        for d, view in zip(seen, views)])
    measured = [d.generation.answer_probability for d in seen if d.generation.answer_probability is not None]
    generation = replace(seen[0].generation,
                         answer_probability=sum(measured) / len(measured) if measured else None)
    return Detection(boxes[:max_boxes], sum(d.dropped for d in seen), generation)


def answer_probability(detections: Iterable[Detection]) -> float | None:
    """The highest `Generation.answer_probability` of the detections made on one image (its
    tiles, the middle view's windows and the whole frame, or the image alone): for `<OD>`, the model's probability that the
    image holds a defect anywhere. None when none was measured."""
    measured = [d.generation.answer_probability for d in detections if d.generation.answer_probability is not None]
    return max(measured, default=None)


def detect(model, processor, images: Sequence[Image.Image], **options) -> list[list[Box]]:
    """Boxes in pixels, each with a `score` in [0, 1], for each of `images`: `detect_with_details`
    without the details; `options` are its keyword arguments (task, text, max_boxes, ...)."""
    return [d.boxes for d in detect_with_details(model, processor, images, **options)]
