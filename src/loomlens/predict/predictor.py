"""`Predictor`: one loaded model answering every offered Florence-2 task on batches of images.

In: images (PIL or paths), a task name and its text. Out: one `Prediction` per image. Box tasks
(od, dense_region_caption, phrase_grounding) give scored boxes (`loomlens.infer.detection`),
tiled on frames larger than its tiles (`loomlens.infer.tiling`), thresholded and filtered by the region rules;
segmentation gives polygons; OCR with region gives quadrilaterals (as 4-point polygons, with
their bounding boxes); the rest give text. A task the model was never trained on still runs and
answers what it says, with `trained=False` on the prediction. Everything model-side is
`loomlens.infer`'s; this module adds tasks, thresholds and rules, and the bounds a server
needs: a cap on the tiles one image may cost (`max_tiles`: a larger frame is downscaled until
it fits, boxes still in its own pixels), a compute deadline, and a `between` call between
tile batches so a caller can run other work while a large frame is being tiled.
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from loomlens.config import INFER_BATCH_SIZE
from loomlens.data.florence_text import parse_polygons
from loomlens.data.records import Box
from loomlens.data.sanitize import read_rgb, to_rgb
from loomlens.data.tasks import TASKS, Task, get_task, prompt
from loomlens.data.tiles import tile_windows
from loomlens.infer.detection import Detection, answer_probability, batched, detect_with_details
from loomlens.infer.generation import encoder_limit, encoder_positions, generate
from loomlens.infer.loading import load_for_inference
from loomlens.infer.onnx_runtime import load_onnx_export
from loomlens.infer.tiling import mid_windows, should_tile, tiled_detect
from loomlens.infer.tta import check_tta, choose_views
from loomlens.predict.regions import RegionRules, load_rules

_LOC = re.compile(r"<loc_\d+>")
#: Phrases whose encoder positions a predictor keeps (`check_text`): a line asks a few again and
#: again, and a server's users could send any number.
PHRASES_KEPT = 256

PolygonOut = tuple[str, list[list[float]]]

#: Where the model runs: torch, or onnxruntime over a `loomlens export` folder.
BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """The answer for one image: boxes in pixels (with scores for box tasks), polygons as
    (label, [[x, y], ...]) in pixels, the answer text, whether the model was `trained` for
    this task, whether the frame was `tiled`, and how many malformed answer parts were
    `dropped` by the parser (a tiled frame: those of all its tiles; its `text` is empty, each
    tile answered its own). `entropy`: the mean entropy (nats) of the model's next-token
    distribution over the answer, how unsure it was (`Generation.mean_entropy`; None for a
    tiled frame, beam search or the onnx backend). `answer_probability`: the model's
    probability that its answer is not empty, for `od` that the image holds a defect (the
    highest over a tiled frame's pieces; `infer.detection.answer_probability`): the score to
    sort frames OK/NG by. It is the model's, before region rules and the score threshold."""

    task: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    polygons: list[PolygonOut] = field(default_factory=list)
    text: str = ""
    trained: bool = True
    tiled: bool = False
    dropped: int = 0
    scale: float = 1.0
    entropy: float | None = None
    answer_probability: float | None = None

    def scaled_to(self, width: int, height: int) -> Prediction:
        """This prediction made on a resized copy, in the pixels of the `width` x `height`
        original: boxes and polygons mapped, `scale` = the copy's size over the original's."""
        sx, sy = width / self.width, height / self.height
        boxes = [b.scaled(sx, sy) for b in self.boxes]
        polygons = [(label, [[x * sx, y * sy] for x, y in points]) for label, points in self.polygons]
        return replace(self, width=width, height=height, boxes=boxes, polygons=polygons,
                       scale=self.scale * min(self.width / width, self.height / height))


class DeadlineExceeded(TimeoutError):
    """The prediction ran past the deadline its caller gave (`Predictor.predict(deadline=)`)."""


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc `malloc_trim`; nothing elsewhere): the
    CPU setting that keeps freed memory for speed would otherwise hold a large frame's peak."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the prediction ran past its compute deadline")


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return read_rgb(image)


class Predictor:
    """A model ready to predict.

    `model`: base model name or folder (None: the adapter's base, else "tiny"). `adapter`: a
    run folder, a checkpoint inside one or an adapter folder; `checkpoint`: best | last.
    `batch_size`: images per generation call (a larger batch shares the per-step cost of
    decoding among more images, see docs/benchmarks.md; serve batches its own).
    `regions`: a rules YAML or `RegionRules` (default: the run's `regions.yaml` if any).
    `tile_size`: tile edge in pixels (default: the run's, `Run.tile`: the tile size its data was
    cut to by `convert --tile` or its defect crop's window; else the model's input size);
    `tile="auto"` tiles frames longer than the tile only for a run trained on tiles or crops, or with a
    `tile_size` given (`auto_tiles`); `overlap`: shared
    fraction between tiles. `max_tiles`: the most crops (tiles, the middle view's windows, the whole
    frame) one frame may be cut into (None: no cap), each looked at once per view of `tta`; a frame that would need more
    is downscaled until it fits. `constrained`: `<OD>`
    through the class grammar, so only the run's classes in well-formed boxes come out (None:
    on when the run has classes; False keeps the free form). `text_tokens`: answer budget of the tasks no box count bounds (captions, OCR;
    twice that for polygons), capped by the decoder's length. `precision`: the weights' dtype,
    fp32 or bf16; `auto` is bf16 where the device computes it natively (a recent GPU, a CPU
    with AMX or AVX512-BF16), else fp32 (`loomlens.infer.loading`). The adapter is merged
    into the weights once, here. `backend`: torch, or onnx: `model` is then a folder `loomlens
    export` wrote, run by onnxruntime (`precision` fp32 or int8). `tta`: test-time
    augmentation of `od` (`infer/tta.py`): auto looks at each picture also through the mirrors
    the run was trained on (none for a bare model) and fuses the boxes, on through all four,
    off once. `other_labels`: each `od` box is also given under the other classes the model
    nearly wrote for it, as `loomlens eval` counts them (`detect_with_details`), for scoring the
    predictions with another mAP tool; off (the default), a place has one label, as drawings,
    labelling tools and the line want. Raises FileNotFoundError for an adapter folder with no
    adapter and ValueError for a bad precision or tta, a base the adapter does not fit, or
    `constrained` without class names.
    """

    def __init__(
        self,
        *,
        model: str | None = None,
        adapter: str | Path | None = None,
        device: str = "cpu",
        max_boxes: int | None = None,
        batch_size: int = INFER_BATCH_SIZE,
        checkpoint: str = "best",
        regions: str | Path | RegionRules | None = None,
        tile_size: int | None = None,
        overlap: float = 0.25,
        constrained: bool | None = None,
        text_tokens: int = 256,
        precision: str = "auto",
        max_tiles: int | None = None,
        backend: str = "torch",
        tta: str = "auto",
        other_labels: bool = False,
    ):
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be at least 1 (or None: no cap), got {max_tiles}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_tta(tta)  # before the model loads
        if backend == "onnx":
            if not (model or adapter):
                raise ValueError("the onnx backend needs the folder `loomlens export` wrote: pass it as --model")
            self.loaded = load_onnx_export(model or adapter, device=device, precision=precision)
        else:
            self.loaded = load_for_inference(
                model=model, adapter=adapter, checkpoint=checkpoint, device=device, precision=precision
            )
        self.backend = backend
        self.precision = self.loaded.precision
        self.device = device
        self.max_boxes = max_boxes or self.loaded.max_boxes
        self.batch_size = batch_size
        self.overlap = overlap
        self.max_tiles = max_tiles
        self.constrained = bool(self.loaded.classes) if constrained is None else constrained
        if self.constrained and not self.loaded.classes:  # said once, not as every picture's problem
            raise ValueError("--constrained needs the class names the grammar spells (a run's classes.txt): give "
                             "--run, or leave --constrained out")
        self.views = choose_views(tta, self.loaded.views)
        self.other_labels = other_labels
        self.text_tokens = text_tokens
        # A run trained on tiles (or on the defect crop's windows) predicts best on tiles of the
        # same size. Only such a run, or a tile size given here, tiles by itself (`tile="auto"`):
        # a whole-frame run has never seen a tile, and answers best on the whole frame.
        self.input_edge = int(self.loaded.processor.image_processor.size["height"])
        self._positions = functools.lru_cache(maxsize=PHRASES_KEPT)(self._count_positions)
        self.tile_size = tile_size or self.loaded.tile_size or self.input_edge
        self.auto_tiles = bool(tile_size or self.loaded.tile_size)
        if regions is None:
            regions = self.loaded.rules
        self.rules = load_rules(regions) if isinstance(regions, (str, Path)) else regions
        if self.rules is not None:
            self.rules.check_classes(self.loaded.classes, f"region rules {regions}" if isinstance(
                regions, (str, Path)) else "the region rules")

    def info(self) -> dict:
        """What is loaded: base, adapter, run, classes, tasks (and which were trained), settings
        and library versions."""
        import peft
        import torch
        import transformers

        import loomlens

        return {
            "base": self.loaded.base,
            "adapter": str(self.loaded.adapter) if self.loaded.adapter else None,
            "run": str(self.loaded.run) if self.loaded.run else None,
            "classes": list(self.loaded.classes),
            "tasks": list(TASKS),
            "trained_tasks": sorted(self.loaded.trained_tasks),
            "device": self.device,
            "backend": self.backend,
            "precision": self.precision,
            "max_boxes": self.max_boxes,
            "batch_size": self.batch_size,
            "tile_size": self.tile_size,
            "max_tiles": self.max_tiles,
            "views": list(self.views),
            "regions": self.rules is not None,
            "versions": {"loomlens": loomlens.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
        }

    def predict(
        self,
        images: list[Image.Image | str | Path],
        task: str = "od",
        text: str | None = None,
        tile: str = "auto",
        score_threshold: float = 0.0,
        deadline: float | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[Prediction]:
        """One `Prediction` per image (PIL images or paths), in order.

        `text` is the phrase (phrase_grounding, referring_expression_segmentation) or the
        region (`x1,y1,x2,y2` pixels or four `<loc_N>`) a task needs. `tile` (auto | on | off)
        applies to box tasks; `score_threshold` drops boxes scoring lower. `deadline` (a
        `time.monotonic()` value): past it, DeadlineExceeded is raised between model calls.
        `between()` is called after each batch of looks at a tiled frame's crops (a server runs
        small requests there).

        A 48- or 64-bit colour PNG or TIFF (16 bits a channel) is read whole only from its path
        or from `Image.open`'s result not yet decoded: PIL decodes such a file to each sample's
        top byte (`load`, `copy`, `convert`, `ImageOps.exif_transpose`) and the low bytes are
        gone, so a 12-bit camera frame in 16-bit samples would reach the model nearly black (15
        of 255 at most). Pass those files as paths. Deep grey images (modes I;16, I, F) keep
        their depth when decoded and are scaled either way (`to_rgb`).

        Raises ValueError for an unknown task or a missing/unreadable `text`, or a phrase too long
        for the model (`check_text`).
        """
        spec = get_task(task)
        self.check_text(spec.name, text)
        pictures = [_open(im) for im in images]
        for im in pictures:
            prompt(spec, text, im.width, im.height)  # refuse bad input before any work
        if spec.answer == "boxes":
            results = self._boxes(spec, pictures, text, tile, score_threshold, deadline, between)
        else:
            results = self._generated(spec, pictures, text, deadline)
        trained = spec.name in self.loaded.trained_tasks
        for r in results:
            r.trained = trained
        return results

    def check_text(self, task: str, text: str | None) -> None:
        """Refuse, before any picture, a phrase (`text` of a task that takes one) whose prompt
        and the picture's tokens take more encoder positions than the model has: ValueError
        saying both counts and by how much to shorten it, where the model would fail on the
        first picture with an IndexError."""
        spec = get_task(task)
        if spec.needs != "text" or not (text or "").strip():
            return
        used = self._positions(prompt(spec, text, self.input_edge, self.input_edge))
        limit = encoder_limit(self.loaded.model)
        if used > limit:
            over = used - limit
            shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "..."
            raise ValueError(f"the text {shown!r} is too long for this model: with the picture it takes {used} "
                             f"positions of the {limit} this model's encoder has: shorten it by at least {over} "
                             f"token{'s' if over > 1 else ''}")

    def _count_positions(self, question: str) -> int:
        """The encoder positions the worded prompt `question` takes with a picture; `_positions`
        keeps each count, since the processor resizes a picture to the model's input to give it."""
        return encoder_positions(self.loaded.processor, question)

    def _detect(self, spec: Task, images: list[Image.Image], text: str | None,
                after_batch: Callable[[], None] | None = None, reread_upto: int | None = None):
        return detect_with_details(
            self.loaded.model, self.loaded.processor, images, task=spec.token, text=text and text.strip(),
            max_boxes=self.max_boxes, batch_size=self.batch_size,
            constrained=self.constrained and spec.name == "od", classes=self.loaded.classes,
            views=self._views(spec), other_labels=self.other_labels and spec.name == "od", after_batch=after_batch,
            reread_upto=reread_upto,
        )

    def _views(self, spec: Task) -> tuple[str, ...]:
        """The views `spec` looks through: `views` for `od`, once for other tasks (a phrase
        saying "left" would be read mirrored)."""
        return self.views if spec.name == "od" else ("",)

    def _tile_count(self, width: int, height: int) -> int:
        """Model inputs a tiled `width` x `height` frame costs: its tiles, plus the middle view's
        windows and the whole frame."""
        windows = len(tile_windows(width, height, self.tile_size, self.overlap))
        return windows + len(mid_windows(width, height, self.tile_size, self.overlap)) + (windows > 1)

    def _fit(self, width: int, height: int, tile: str) -> tuple[int, int, bool]:
        """The size a frame is predicted at and whether it is tiled: downscaled (aspect kept)
        until its tiles fit `max_tiles`. `tile` "auto" tiles only when `auto_tiles`."""
        if tile == "auto" and not self.auto_tiles:
            tile = "off"
        if not should_tile(width, height, tile, self.tile_size):
            return width, height, False
        if self.max_tiles is None:
            return width, height, True
        w, h = width, height
        while self._tile_count(w, h) > self.max_tiles:
            scale = max(0.5, min(0.95, (self.max_tiles / self._tile_count(w, h)) ** 0.5))
            w, h = max(1, int(w * scale)), max(1, int(h * scale))
        return w, h, should_tile(w, h, tile, self.tile_size)

    def model_inputs(self, width: int, height: int, tile: str = "auto", task: str = "od") -> int:
        """The most model inputs (tiles, middle view and whole frame, or 1; for `od` each through every one
        of `views`, which only inputs `worth_mirrors` take) predicting `task` on a `width` x
        `height` image costs, with the `max_tiles` cap: what a server weighs a request by. The
        second reading of a doubtful empty answer (`detection.worth_rereading`), which few
        inputs take, is left out: counted, it would double the weight of every request."""
        if get_task(task).answer != "boxes":
            return 1
        w, h, tiled = self._fit(width, height, tile)
        return (self._tile_count(w, h) if tiled else 1) * len(self._views(get_task(task)))

    def _boxes(self, spec: Task, images: list[Image.Image], text, tile: str, threshold: float,
               deadline: float | None, between: Callable[[], None] | None) -> list[Prediction]:
        fits = [self._fit(im.width, im.height, tile) for im in images]
        whole = [im for im, (_, _, t) in zip(images, fits) if not t]
        _check(deadline)
        found = iter(self._detect(spec, whole, text))
        made: list[Detection] = []  # the tiled frame's detections, for its answer probability

        def after_batch() -> None:
            _check(deadline)
            if between is not None:
                between()

        def tiles(crops: list[Image.Image]) -> list[list[Box]]:
            # All of a frame's crops in one call: full batches of first looks, then of mirrored
            # looks where a crop may hold a defect; the deadline and `between` come after each.
            # Only the tiles are read again when they answer nothing in doubt (`reread_upto`).
            made.extend(self._detect(spec, crops, text, after_batch, reread_upto=self.tile_size))
            return [d.boxes for d in made[-len(crops):]]

        results = []
        for im, (w, h, is_tiled) in zip(images, fits):
            if is_tiled:
                small = im if (w, h) == im.size else im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
                made.clear()
                boxes = tiled_detect(tiles, small, self.tile_size, self.input_edge, self.overlap)
                if small is not im:  # a frame over the tile cap: give its memory back
                    del small
                    release_freed_memory()
                # No one answer text: each tile had its own. Their malformed parts all count.
                answer, dropped, entropy = "", sum(d.dropped for d in made), None
                probability = answer_probability(made)
            else:
                d = next(found)
                boxes, answer, dropped, entropy = d.boxes, d.generation.text, d.dropped, d.generation.mean_entropy()
                probability = d.generation.answer_probability
            found_at = Prediction(spec.name, w if is_tiled else im.width, h if is_tiled else im.height, boxes,
                                  text=answer, tiled=is_tiled, dropped=dropped, entropy=entropy,
                                  answer_probability=probability).scaled_to(im.width, im.height)
            kept = [b for b in found_at.boxes if b.score is None or b.score >= threshold]
            if self.rules is not None:
                kept = self.rules.apply(kept, im.width, im.height)
            results.append(replace(found_at, boxes=kept))
        return results

    def _generated(self, spec: Task, images: list[Image.Image], text: str | None,
                   deadline: float | None = None) -> list[Prediction]:
        budget = self.text_tokens if spec.answer == "text" else 2 * self.text_tokens
        results = []
        for chunk in batched(images, self.batch_size):
            _check(deadline)
            prompts = [prompt(spec, text, im.width, im.height) for im in chunk]
            for im, gen in zip(chunk, generate(self.loaded.model, self.loaded.processor, chunk, prompts, budget)):
                results.append(replace(self._read(spec, im, gen.text, text), entropy=gen.mean_entropy(),
                                       answer_probability=gen.answer_probability))
        return results

    def _read(self, spec: Task, image: Image.Image, answer: str, text: str | None) -> Prediction:
        """A non-box answer as a Prediction: polygons, quads (+ their bounds) or clean text."""
        w, h = image.width, image.height
        if spec.answer == "text":
            return Prediction(spec.name, w, h, text=" ".join(_LOC.sub(" ", answer).split()))
        label = text.strip() if spec.needs == "text" and text else ("region" if spec.needs else None)
        polygons, dropped = parse_polygons(answer, w, h, default_label=label)
        if spec.answer == "quads":
            # OCR quads have 4 corners; anything else is a malformed read.
            dropped += sum(len(p.points) != 4 for p in polygons)
            polygons = [p for p in polygons if len(p.points) == 4]
        out = [(p.label, [[x, y] for x, y in p.points]) for p in polygons]
        boxes = []
        if spec.answer == "quads":
            for p in polygons:
                xs, ys = [x for x, _ in p.points], [y for _, y in p.points]
                if min(xs) < max(xs) and min(ys) < max(ys):
                    boxes.append(Box(p.label, min(xs), min(ys), max(xs), max(ys)))
        return Prediction(spec.name, w, h, boxes, out, answer, dropped=dropped)
