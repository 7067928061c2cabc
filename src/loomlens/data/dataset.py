"""The torch side of the data: a Dataset over a converted JSONL split, its collate, batch order.

Built for CPU training, where the processor is the bottleneck: prompts are tokenised once per
distinct prefix, labels once per sample, and each image goes through the image processor once
and is kept, exactly as the processor made it, since every epoch and every task of an image
reuses the same pixels. With online augmentation (`augment`) every item is a new picture: the
decoded image is kept instead, and pixels and (for moved boxes) labels are made per item. What
is kept stays within a memory budget (`default_cache_bytes`). The only module of
`loomlens.data` that imports torch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from loomlens.data.augment import Augment, augment, sample_rng
from loomlens.data.florence_text import boxes_to_text, parse_text
from loomlens.data.jsonl import read_lines, validate_split
from loomlens.data.paste import by_class, cut_patch, draw_donor, paste
from loomlens.data.records import Box
from loomlens.data.sampling import Balance, Labels, balanced_batches
from loomlens.data.sanitize import read_rgb, to_rgb
from loomlens.data.tasks import CONVERTIBLE, REGISTRY
from loomlens.data.tiles import exceeds, hidden_by_squeeze, is_large

#: Label padding, ignored by the loss.
IGNORE_INDEX = -100
#: What an item carries of its image: processed pixels, or the vision side's cached output.
IMAGE_KEYS = ("pixel_values", "image_features")
ORDERS = ("grouped", "interleaved")
#: Batches are formed from pools of this many batches sorted by length: similar lengths
#: share a batch (little padding) while the order stays random.
_POOL_BATCHES = 16
#: Share of physical memory one dataset may fill with kept images (`default_cache_bytes`).
CACHE_SHARE = 0.25
#: A run that never crops augments a large frame reduced to at most this many times the model's
#: input edge a side: the model sees it squeezed to the edge anyway, and flips, jitter and
#: photometry on every pixel of a camera frame cost as much as the step (docs/training.md).
WORK_SCALE = 2
#: The cache where the OS does not report its memory (Windows, macOS without sysconf).
FALLBACK_CACHE_BYTES = 4 << 30


def read_jsonl(path: str | Path) -> list[dict]:
    """The samples of a JSONL file, one per non-empty line, unchecked (`validate_split`
    checks them); a line that is not JSON raises `SplitError` naming it."""
    return [sample for _, sample in read_lines(path)]


@dataclass(frozen=True)
class Example:
    """One tokenised sample: prompt ids (image tokens included), label ids, its image path, and
    for tasks that answer boxes the boxes in pixels (None for text answers)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image: Path
    task: str
    boxes: tuple[Box, ...] | None = None

    @property
    def classes(self) -> Labels:
        """The classes it shows (`frozenset()`: defect-free), None for a text answer."""
        return None if self.boxes is None else frozenset(b.label for b in self.boxes)


def _pil_filter(image_processor) -> Image.Resampling:
    """The PIL filter `image_processor` resizes with (BICUBIC where it names none PIL knows)."""
    try:
        return Image.Resampling(int(image_processor.resample))
    except (AttributeError, TypeError, ValueError):
        return Image.Resampling.BICUBIC


def default_cache_bytes() -> int:
    """What one dataset may keep of its images: a quarter of the machine's physical memory
    (`CACHE_SHARE`), or `FALLBACK_CACHE_BYTES` where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CACHE_SHARE)
    except (AttributeError, ValueError, OSError):
        return FALLBACK_CACHE_BYTES


def _answer_boxes(row: dict) -> tuple[Box, ...] | None:
    """The boxes of a sample whose task answers boxes; None for other tasks."""
    task = REGISTRY.get(row.get("task", ""))
    if task is None or task.answer != "boxes":
        return None
    return tuple(parse_text(row["suffix"], row["width"], row["height"])[0])


def _paste_plan(examples: Sequence[Example]) -> tuple[set[int], dict[str, list[tuple[int, Box]]]]:
    """The samples a defect may be pasted onto, those whose answer lists every box of the frame,
    and the defects to paste (`paste.by_class`): their boxes, each frame's once however many
    tasks it trains."""
    onto = {i for i, ex in enumerate(examples) if ex.task in REGISTRY and REGISTRY[ex.task].lists_every_box}
    first = {ex.image: i for i, ex in reversed(list(enumerate(examples))) if i in onto}
    return onto, by_class([ex.boxes if first.get(ex.image) == i else None for i, ex in enumerate(examples)])


class FlorenceDataset(torch.utils.data.Dataset):
    """Samples of a converted split (`train.jsonl`, ...) ready for Florence-2.

    Items are dicts with `input_ids` and `labels` (1-D long tensors, labels `<s> suffix </s>`
    per the label contract) and `pixel_values` (3-D float). `tasks` keeps only samples whose
    `task` is listed (empty: all). Labels longer than `max_label_tokens` are cut (counted in
    `truncated`); the decoder has no positions beyond it. What is kept of each image (processed
    pixels, or the decoded picture when augmenting) stays within `cache_bytes` (None:
    `default_cache_bytes()`; 0: nothing kept): past it, an image is decoded again each time it
    is used, the same pixels more slowly, rather than a large set of camera frames (a 5 MP frame
    is 15 MB decoded; a run that never crops keeps it reduced, see `picture`) filling the
    machine's memory; `cache_full` says when that happened. `augment` (training
    only) draws a new variant of each picture per (seed, epoch, index), its boxes moved with it;
    `set_epoch` says which epoch the loop is in. `edge`: the model's input edge (the
    processor's), for the defect crop; `crop_window`: that edge when the crop may show some frame
    a window at a time (`augment.crop` on, a box sample's frame longer than it), else None: what
    a run records so that prediction tiles as training cropped. `boxes` and `vanishing`: the
    box samples' boxes, and how many of them, in frames large for the input (`tiles.is_large`), the squeeze to the
    input leaves under `tiles.VANISHING_PX` on their shorter side (what `loomlens train` warns about).
    The whole split is checked first (see `validate_split`): a bad line, a missing or damaged
    image, or an image path leading outside the data raises `SplitError` (a ValueError) naming
    every line.
    """

    def __init__(
        self,
        jsonl: str | Path,
        processor,
        tasks: Sequence[str] = (),
        max_label_tokens: int | None = None,
        cache_bytes: int | None = None,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.jsonl = Path(jsonl)
        self.processor = processor
        self.cache_bytes = default_cache_bytes() if cache_bytes is None else cache_bytes
        self.cached_bytes, self.cache_full = 0, False
        self.augment = augment if augment is not None and augment.active else None
        self.seed, self.epoch, self.max_label_tokens = seed, 0, max_label_tokens
        rows = validate_split(self.jsonl)  # first: a bad split is reported before anything else is read
        size = processor.image_processor.size
        self.edge = int(size["height"])
        self.input_size = (int(size["width"]), self.edge)  # what augmentation hands the processor
        held = sorted({str(r.get("task")) for r in rows})
        self.absent_tasks = [t for t in tasks if t not in held]  # asked for, and no sample of them here
        if tasks:
            rows = [r for r in rows if r.get("task") in tasks]
        if not rows:
            raise ValueError(f"{self.jsonl} has no samples" + (f" of tasks {list(tasks)} (it holds {', '.join(held)})"
                                                               if tasks else ""))
        prompts: dict[str, tuple[int, ...]] = {}
        self.truncated, self.boxes, self.vanishing, cropped = 0, 0, 0, False
        self.examples: list[Example] = []
        for row in rows:
            prefix = row["prefix"]
            if prefix not in prompts:
                prompts[prefix] = self._prompt_ids(prefix)
            labels = processor.tokenizer(row["suffix"], add_special_tokens=True).input_ids
            if max_label_tokens is not None and len(labels) > max_label_tokens:
                labels, self.truncated = labels[:max_label_tokens], self.truncated + 1
            boxes = _answer_boxes(row)
            if boxes is not None:
                cropped = cropped or exceeds(row["width"], row["height"], self.edge)
                self.boxes += len(boxes)
                if is_large(row["width"], row["height"], self.edge):
                    self.vanishing += sum(hidden_by_squeeze(b, row["width"], row["height"], self.edge) for b in boxes)
            self.examples.append(Example(prompts[prefix], tuple(labels), self.jsonl.parent / row["image"],
                                         row.get("task", prefix), boxes))
        self.crop_window = self.edge if self.augment is not None and self.augment.crop and cropped else None
        pasting = self.augment is not None and self.augment.paste > 0
        self._pasted_onto, self._donors = _paste_plan(self.examples) if pasting else (set(), {})
        self._pixels: dict[Path, torch.Tensor] = {}
        self._pictures: dict[Path, tuple[Image.Image, float, float]] = {}
        self._resample = _pil_filter(processor.image_processor)
        self._features: dict[Path, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws the items (the loop sets it before each epoch)."""
        self.epoch = epoch

    def _prompt_ids(self, prefix: str) -> tuple[int, ...]:
        # The processor expands task tokens into prompts and prepends the image tokens; the
        # ids do not depend on the image, so a blank one stands in.
        blank = Image.new("RGB", (8, 8))
        return tuple(self.processor(text=[prefix], images=[blank], return_tensors="pt").input_ids[0].tolist())

    def _keep(self, size: int) -> bool:
        """Whether `size` more bytes fit the cache (and count them if so)."""
        if self.cached_bytes + size > self.cache_bytes:
            self.cache_full = self.cache_full or self.cache_bytes > 0
            return False
        self.cached_bytes += size
        return True

    def pixels(self, image: Path) -> torch.Tensor:
        """The processed pixels of `image`, computed on first use and kept while the cache has room."""
        if image in self._pixels:
            return self._pixels[image]
        with Image.open(image) as im:
            values = self.processor.image_processor(images=[to_rgb(im)], return_tensors="pt").pixel_values[0]
        if self._keep(values.numel() * values.element_size()):
            self._pixels[image] = values
        return values

    @torch.no_grad()
    def encode_images(self, encoder: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 16) -> None:
        """Run every image through `encoder` (pixels (B, 3, H, W) -> image features (B, N, D))
        once and serve `image_features` instead of `pixel_values` from then on: for training
        with a frozen vision side, where the image half of every step would repeat itself."""
        images = sorted({ex.image for ex in self.examples})
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            features = encoder(torch.stack([self.pixels(image) for image in chunk]))
            self._features.update(zip(chunk, features.cpu()))
        self.cached_bytes -= sum(v.numel() * v.element_size() for v in self._pixels.values())
        self._pixels.clear()  # no longer needed

    def __len__(self) -> int:
        return len(self.examples)

    def picture(self, image: Path) -> tuple[Image.Image, float, float]:
        """The decoded RGB picture of `image` as augmentation takes it, and the factors from the
        stored image's pixels to its own (x, y): in a run that never crops (`crop_window` None),
        a frame larger than `WORK_SCALE` x the input's edge is reduced to that. Kept after first
        use while the cache has room."""
        if image in self._pictures:
            return self._pictures[image]
        picture = read_rgb(image)
        width, height = picture.size
        limit = WORK_SCALE * self.edge
        if self.crop_window is None and max(width, height) > limit:
            # the processor's own filter, so the two-step squeeze looks like its one step
            picture = picture.resize((min(width, limit), min(height, limit)), self._resample, reducing_gap=3.0)
        kept = (picture, picture.width / width, picture.height / height)
        if self._keep(picture.width * picture.height * len(picture.getbands())):
            self._pictures[image] = kept
        return kept

    def _pasted(self, index: int, picture: Image.Image, boxes: list[Box],
                scale: tuple[float, float]) -> tuple[Image.Image, list[Box]]:
        """`picture` (of sample `index`, its stored pixels times `scale`) with one more defect
        from a training frame when this epoch's draw says so (`loomlens.data.paste`); frames
        without defects, and text answers, as they are."""
        if not boxes or index not in self._pasted_onto or not self._donors:
            return picture, boxes
        rng = sample_rng(self.seed, self.epoch, index, stream="paste")
        if rng.random() >= self.augment.paste:
            return picture, boxes
        donor, box = draw_donor(self._donors, rng)
        source, dx, dy = self.picture(self.examples[donor].image)
        patch, inside = cut_patch(source, box.scaled(dx, dy))
        fx, fy = scale[0] / dx, scale[1] / dy  # the donor's picture may be reduced otherwise
        if (fx, fy) != (1.0, 1.0):
            size = (max(1, round(patch.width * fx)), max(1, round(patch.height * fy)))
            patch = patch.resize(size, Image.Resampling.BILINEAR)
            inside = inside.scaled(fx, fy)
        return paste(picture, boxes, patch, inside, rng)

    def _augmented(self, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Pixels and label ids of this epoch's variant of sample `index`."""
        ex = self.examples[index]
        rng = sample_rng(self.seed, self.epoch, index)
        picture, sx, sy = self.picture(ex.image)
        reduced = (sx, sy) != (1.0, 1.0)
        boxes = [b.scaled(sx, sy) for b in ex.boxes or ()]
        picture, boxes = self._pasted(index, picture, boxes, (sx, sy))
        varied, moved = augment(picture, boxes, aug=self.augment, rng=rng, edge=self.edge,
                                geometric=ex.boxes is not None, size=self.input_size, resample=self._resample)
        labels = ex.labels
        pasted = len(boxes) != len(ex.boxes or ())
        if ex.boxes is not None and (reduced or pasted or moved != boxes or varied.size != picture.size):
            ids = self.processor.tokenizer(boxes_to_text(moved, *varied.size), add_special_tokens=True).input_ids
            labels = tuple(ids[: self.max_label_tokens] if self.max_label_tokens else ids)
        pixels = self.processor.image_processor(images=[varied], return_tensors="pt").pixel_values[0]
        return pixels, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.examples[index]
        labels = ex.labels
        if self._features:
            image = {"image_features": self._features[ex.image]}
        elif self.augment is not None:
            pixels, labels = self._augmented(index)
            image = {"pixel_values": pixels}
        else:
            image = {"pixel_values": self.pixels(ex.image)}
        return {"input_ids": torch.tensor(ex.input_ids), "labels": torch.tensor(labels), **image}

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample (prompt + label): what padding-aware batching sorts by."""
        return [len(ex.input_ids) + len(ex.labels) for ex in self.examples]

    @property
    def tasks(self) -> list[str]:
        return [ex.task for ex in self.examples]

    @property
    def most_boxes(self) -> int:
        """The most boxes one sample's answer holds (0 without box answers)."""
        return max((len(ex.boxes) for ex in self.examples if ex.boxes), default=0)

    @property
    def classes(self) -> list[Labels]:
        """Each sample's classes (`frozenset()`: defect-free; None: a text answer), for balancing."""
        return [ex.classes for ex in self.examples]


@dataclass(frozen=True)
class Collator:
    """Stack items into a batch: pad `input_ids` with `pad_token_id` (+ `attention_mask`) and
    `labels` with -100, on the right; stack `pixel_values` (or cached `image_features`)."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = _pad([it["input_ids"] for it in items], self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([torch.ones_like(it["input_ids"]) for it in items], 0),
            "labels": _pad([it["labels"] for it in items], IGNORE_INDEX),
            **{key: torch.stack([it[key] for it in items]) for key in IMAGE_KEYS if key in items[0]},
        }


def _pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _task_rank(task: str) -> int:
    """A task's place in the `grouped` order (`CONVERTIBLE`); unknown tasks go last."""
    return CONVERTIBLE.index(task) if task in CONVERTIBLE else len(CONVERTIBLE)


def plan_batches(
    tasks: Sequence[str],
    lengths: Sequence[int],
    batch_size: int,
    order: str = "grouped",
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    by_length: bool = True,
    *,
    labels: Sequence[Labels] | None = None,
    balance: Balance | None = None,
) -> list[list[int]]:
    """The batches of one epoch, as lists of sample indices; a pure function of its arguments,
    so a resumed run rebuilds exactly the same order.

    `grouped`: all batches of one task before the next, in the seed's order (od, dense region
    captions, grounding, then the rest); `interleaved`: tasks mixed. With `shuffle`, samples
    are shuffled (within each task for `grouped`) and batch order is random within the group;
    without it pools follow the file order. `by_length` cuts batches from pools of consecutive
    samples sorted by length, so a batch holds samples of similar length (little padding); the
    price is less mixed batches (all the empty answers of a pool land together). `balance`
    (with `labels`, each sample's classes, and `shuffle`) composes each batch instead: a fixed
    share of defect-free samples, rare classes repeated (`loomlens.data.sampling`); lengths are
    then not sorted.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    rng = random.Random(seed * 100_003 + epoch)
    if order == "grouped":
        names = sorted(set(tasks), key=lambda t: (_task_rank(t), t))
        groups = [[i for i, t in enumerate(tasks) if t == name] for name in names]
    else:
        groups = [list(range(len(tasks)))]
    batches: list[list[int]] = []
    for group in groups:
        if shuffle and balance is not None and labels is not None:
            group_batches = balanced_batches(group, labels, batch_size=batch_size, balance=balance, rng=rng)
            rng.shuffle(group_batches)
            batches += group_batches
            continue
        if shuffle:
            rng.shuffle(group)
        pool = _POOL_BATCHES * batch_size if by_length else batch_size
        group_batches = []
        for start in range(0, len(group), pool):
            chunk = sorted(group[start : start + pool], key=lambda i: lengths[i], reverse=True)
            group_batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        if shuffle:
            rng.shuffle(group_batches)
        batches += group_batches
    return batches
