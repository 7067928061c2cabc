"""Annotations (VOC, YOLO, COCO) -> Florence-2 JSONL training samples.

`convert` reads every annotation, reports problems instead of stopping at the first, splits
by original image (a flipped copy, and every tile cut from a frame, always lands in its
original's split), makes the samples of each requested task and writes `train.jsonl`,
`val.jsonl` (`test.jsonl`), `classes.txt` and `summary.json` atomically, so a crash never
leaves a half-written file over a good one.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from loomlens.data.atomic import atomic_open, atomic_save_image, atomic_write
from loomlens.data.coco import read_coco
from loomlens.data.florence_text import boxes_to_text
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import iter_files
from loomlens.data.tasks import CONVERTIBLE, REGISTRY
from loomlens.data.tiles import save_tiles, tile_record
from loomlens.data.voc import read_voc
from loomlens.data.yolo import CLASSES_FILE, read_yolo, write_classes

ORDERS = ("grouped", "interleaved")
READERS: dict[str, Callable[[Path, Sequence[Path]], ReadResult]] = {"voc": read_voc, "yolo": read_yolo, "coco": read_coco}
FORMATS = ("auto", *READERS)
SPLITS = ("train", "val", "test")
TILES_DIR = "images/tiles"  # relative to the output folder
MIN_TILE = 32  # pixels; a smaller tile holds too little fabric to tell a defect from weave

ProgressFn = Callable[[str, int, int], None]


class ConvertError(Exception):
    """A fatal conversion error for the user (bad arguments, no data, strict mode): the
    message says what to do; `problems` lists the input problems behind it, if any."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class ConvertReport:
    """What `convert` did: the counts also written to `summary.json` (`to_dict`)."""

    source: str
    out: str
    format: str
    tasks: list[str]
    order: str
    flip: bool
    tile: int | None
    tile_overlap: float
    seed: int
    classes: list[str]
    images: int  # original images converted (flipped copies and tiles not counted)
    negatives: int  # of those, images with no boxes
    boxes_per_class: dict[str, int]
    # split -> {"images": n (flipped copies and tiles included), "samples": n, "tiles": n,
    #           "tile_samples": n, "boxes_per_class": {...}, "samples_per_task": {...}}
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in the report."""
        return asdict(self)


def detect_format(src: Path, skip: Sequence[Path] = ()) -> str:
    """Which annotation format the folder `src` (less the folders in `skip`) holds: "voc"
    (XML files), "coco" (JSON with 'images' and 'annotations') or "yolo" (label txt files and
    a classes.txt). Raises `ConvertError` when it finds none, or more than one (then
    `--format` must say which)."""
    found = []
    if any(iter_files(src, ".xml", skip)):
        found.append("voc")
    if any(_looks_like_coco(p) for p in iter_files(src, ".json", skip)):
        found.append("coco")
    txts = [p.name for p in iter_files(src, ".txt", skip)]
    if CLASSES_FILE in txts and len(txts) > txts.count(CLASSES_FILE):
        found.append("yolo")
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConvertError(
            f"no annotations found in {src}: expected Pascal VOC *.xml, COCO *.json, "
            "or YOLO *.txt with a classes.txt"
        )
    raise ConvertError(f"{src} holds more than one annotation format ({', '.join(found)}); pass --format")


def _looks_like_coco(path: Path) -> bool:
    # A cheap sniff for both keys near the start, without parsing a possibly huge file.
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return b'"images"' in head and b'"annotations"' in head


def caption(labels: Iterable[str]) -> str:
    """A template caption over the defect labels of one image, classes in name order:
    "woven fabric with 2 drop defects and 1 wrinkle." or "defect-free woven fabric."."""
    counts = sorted(Counter(labels).items())
    if not counts:
        return "defect-free woven fabric."
    parts = [f"{n} {label} defects" if n > 1 else f"1 {label}" for label, n in counts]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"woven fabric with {listed}."


def task_samples(record: ImageRecord, image: str, task: str) -> list[dict[str, Any]]:
    """The samples of one convertible `task` for one image (`image` = its path relative to the
    JSONL), as the registry's `Task.samples` says: `boxes` always one (a negative has an empty
    suffix); `boxes_if_any` one if there are boxes (the label is the region's caption);
    `per_class` one per class present; `caption` one."""
    spec = REGISTRY[task]

    def sample(prefix: str, suffix: str) -> dict[str, Any]:
        return {
            "prefix": prefix, "suffix": suffix, "image": image, "width": record.width,
            "height": record.height, "task": task, "source": record.source,
        }

    text = boxes_to_text(record.boxes, record.width, record.height)
    if spec.samples == "boxes":
        return [sample(spec.token, text)]
    if spec.samples == "boxes_if_any":
        return [sample(spec.token, text)] if record.boxes else []
    if spec.samples == "per_class":
        return [
            sample(spec.token + label, boxes_to_text([b for b in record.boxes if b.label == label],
                                                     record.width, record.height))
            for label in sorted({b.label for b in record.boxes})
        ]
    return [sample(spec.token, caption(b.label for b in record.boxes))]


def assign_splits(images: Iterable[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Image key -> "train" | "val" | "test", deterministic for a seed. Fractions are rounded
    to whole images; a non-zero fraction gets at least one image, and train keeps one."""
    keys = sorted(set(images))
    random.Random(seed).shuffle(keys)
    n = len(keys)

    def share(fraction: float, room: int) -> int:
        wanted = max(1, round(n * fraction)) if fraction > 0 else 0
        return max(0, min(wanted, room))

    n_test = share(test_fraction, n - 1)
    n_val = share(val_fraction, n - 1 - n_test)
    return {k: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, k in enumerate(keys)}


def unique_names(images: Sequence[str], prefix: str = "") -> list[str]:
    """One file name per image path, in order: `<prefix><name>`; the folders are folded into
    the name when two images share a name, then a counter, so no two are ever the same (even
    for a path given twice)."""
    used: set[str] = set()
    names = []
    for image in images:
        base = PurePosixPath(image).name
        candidates = itertools.chain(
            [f"{prefix}{base}", prefix + image.replace("/", "_")],
            (f"{prefix}{i}_{base}" for i in itertools.count(2)),
        )
        names.append(next(c for c in candidates if c not in used))
        used.add(names[-1])
    return names


def flipped_names(images: Sequence[str]) -> dict[str, str]:
    """Image path -> file name of its flipped copy, `flipped_<name>` as the seed did, never
    two the same (see `unique_names`)."""
    ordered = sorted(images)
    return dict(zip(ordered, unique_names(ordered, "flipped_"), strict=True))


def flip_image(src: Path, dst: Path) -> None:
    """Save `src` mirrored left-right at `dst`, in `src`'s own format (JPEG at quality 95).
    Skipped when `dst` is already newer than `src` (a re-run)."""
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    with Image.open(src) as im:
        fmt = im.format or "PNG"
        mirrored = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    atomic_save_image(mirrored, dst, fmt)


def write_jsonl(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write one compact JSON object a line, atomically; return the number of lines. If
    `samples` raises part-way, the file at `path` is left as it was."""
    count = 0
    with atomic_open(path) as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


def _check_arguments(
    fmt: str, tasks: Sequence[str], order: str, val_fraction: float, test_fraction: float,
    tile: int | None, tile_overlap: float,
) -> None:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    unknown = [t for t in tasks if t not in CONVERTIBLE]
    if unknown or not tasks:
        raise ConvertError(f"unknown or no tasks {unknown}; use some of {', '.join(CONVERTIBLE)}")
    if order not in ORDERS:
        raise ConvertError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConvertError("val and test fractions must be in 0..1 and leave some images for training")
    if tile is not None and tile < MIN_TILE:
        raise ConvertError(f"tile must be at least {MIN_TILE} px, got {tile}; use the model's input size or more")
    if not 0 <= tile_overlap < 0.9:
        raise ConvertError(f"tile overlap must be in [0, 0.9), got {tile_overlap}; 0.25 is the usual share")


def _fail_if_strict(strict: bool, problems: list[Problem], src: Path) -> None:
    if strict and problems:
        raise ConvertError(f"{len(problems)} problem(s) in {src}; nothing written (--strict)", problems)


def _order(items: list[tuple[ImageRecord, str]], tasks: Sequence[str], order: str) -> Iterable[dict[str, Any]]:
    """Samples of (record, image path) items, already shuffled: `grouped` = every image's
    samples of one task before the next task; `interleaved` = each image's tasks together."""
    tasks = [t for t in CONVERTIBLE if t in tasks]
    if order == "grouped":
        return (s for task in tasks for record, image in items for s in task_samples(record, image, task))
    return (s for record, image in items for task in tasks for s in task_samples(record, image, task))


def _cut_tiles(
    items: dict[str, list[tuple[ImageRecord, str]]], tile: int, overlap: float, seed: int, out: Path,
    progress: ProgressFn | None,
) -> tuple[set[str], list[Problem]]:
    """Cut every frame in `items` (flipped copies included; image paths relative to `out`)
    into tiles (see `tile_record`), write them under `out/images/tiles/` as
    `<frame name>_x<X0>_y<Y0><suffix>` and add them to their frame's split. Returns the tile
    image paths and the problems (a frame that cannot be read gives no tiles)."""
    frames = sorted(((split, record, image) for split, pairs in items.items() for record, image in pairs),
                    key=lambda frame: (frame[1].image, frame[2]))
    # Distinct frame names give distinct tile names: "_x" cannot occur inside "_x<X0>_y<Y0>".
    names = unique_names([record.image for _, record, _ in frames])
    tiles: set[str] = set()
    problems = []
    for i, ((split, record, image), name) in enumerate(zip(frames, names, strict=True)):
        stem, suffix = PurePosixPath(name).stem, PurePosixPath(name).suffix
        cut = {f"{TILES_DIR}/{stem}_x{t.window[0]}_y{t.window[1]}{suffix}": t
               for t in tile_record(record, tile, overlap, seed=seed)}
        # Lexically: `out` is resolved, and it may not exist yet for "../src/..." to pass through.
        frame = Path(os.path.normpath(out / image))
        try:
            save_tiles(frame, {out / path: t.window for path, t in cut.items()})
        except OSError as err:
            problems.append(Problem(file=record.source, message=f"cannot cut tiles from {record.image}: {err}",
                                    fix="replace the damaged image"))
        else:
            items[split].extend((ImageRecord(path, t.width, t.height, list(t.boxes), record.source), path)
                                for path, t in cut.items())
            tiles.update(cut)
        if progress:
            progress("tile", i + 1, len(frames))
    return tiles, problems


def _split_stats(
    items: list[tuple[ImageRecord, str]], samples: list[dict[str, Any]], tiles: set[str]
) -> dict[str, Any]:
    return {
        "images": len(items),
        "samples": len(samples),
        "tiles": sum(image in tiles for _, image in items),
        "tile_samples": sum(s["image"] in tiles for s in samples),
        "boxes_per_class": dict(sorted(Counter(b.label for r, _ in items for b in r.boxes).items())),
        "samples_per_task": dict(Counter(s["task"] for s in samples)),
    }


def _add_flipped(
    records: Sequence[ImageRecord], items: dict[str, list[tuple[ImageRecord, str]]], split_of: dict[str, str],
    src_abs: Path, out: Path, progress: ProgressFn | None,
) -> list[Problem]:
    """Write a mirrored copy of every record's image under `out/images/` and add it to its
    original's split in `items`; returns the images that could not be flipped, as problems."""
    problems = []
    names = flipped_names([r.image for r in records])
    for i, record in enumerate(records):
        name = names[record.image]
        try:
            flip_image(src_abs / record.image, out / "images" / name)
        except OSError as err:
            problems.append(Problem(file=record.source, message=f"cannot flip {record.image}: {err}",
                                    fix="replace the damaged image"))
        else:
            mirrored = ImageRecord(f"images/{name}", record.width, record.height,
                                   [b.hflip(record.width) for b in record.boxes], record.source)
            items[split_of[record.image]].append((mirrored, mirrored.image))
        if progress:
            progress("flip", i + 1, len(records))
    return problems


def _write_splits(
    items: dict[str, list[tuple[ImageRecord, str]]], out: Path, tasks: Sequence[str], order: str, seed: int,
    no_test: bool, tiles: set[str],
) -> dict[str, dict[str, Any]]:
    """Shuffle each split's items (deterministic for `seed`), write its samples as
    `out/<split>.jsonl` and return each split's counts; with `no_test`, a stale `test.jsonl`
    is removed instead."""
    rng = random.Random(seed)
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if split == "test" and no_test:
            (out / "test.jsonl").unlink(missing_ok=True)  # a stale one would be read as current
            continue
        chosen = sorted(items[split], key=lambda item: item[1])
        rng.shuffle(chosen)
        samples = list(_order(chosen, tasks, order))
        write_jsonl(out / f"{split}.jsonl", samples)
        splits[split] = _split_stats(chosen, samples, tiles)
    return splits


def convert(
    src: str | Path,
    out: str | Path,
    format: str = "auto",
    tasks: Sequence[str] = ("od",),
    order: str = "grouped",
    flip: bool = False,
    val_fraction: float = 0.17,
    test_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    progress: ProgressFn | None = None,
    tile: int | None = None,
    tile_overlap: float = 0.25,
) -> ConvertReport:
    """Convert the annotated dataset in folder `src` to Florence-2 JSONL in folder `out`.

    `format`: auto | voc | yolo | coco. `tasks`: any of `loomlens.data.tasks.CONVERTIBLE` (od,
    dense_region_caption, phrase_grounding, caption). `order`: grouped | interleaved (see `_order`). `flip` adds a
    mirrored copy of every image (written to `out/images/flipped_<name>`) in its original's
    split. `tile` (px, at least 32) also cuts every frame, flipped copies included, into
    windows of that size overlapping by `tile_overlap` (in [0, 0.9)), the windows tiled
    prediction uses, and adds each kept tile (see `loomlens.data.tiles.tile_record`) as an
    image of its own under `out/images/tiles/` in its frame's split; the whole frames stay too.
    Splits are by image, deterministic for `seed`. Problems in the input are reported
    in the returned `ConvertReport` (and `summary.json`) and the rest is converted; with
    `strict` any problem raises `ConvertError` before anything is written. `progress(stage,
    done, total)` is called while flipping ("flip") and tiling ("tile"). Raises `ConvertError`
    for user errors.
    """
    src, out = Path(src), Path(out)
    _check_arguments(format, tasks, order, val_fraction, test_fraction, tile, tile_overlap)
    if not src.is_dir():
        raise ConvertError(f"source folder {src} does not exist")
    skip = [out] if out.resolve() != src.resolve() else []  # a previous run's output is not input
    fmt = detect_format(src, skip) if format == "auto" else format
    read = READERS[fmt](src, skip)
    problems = list(read.problems)
    _fail_if_strict(strict, problems, src)
    if not read.records:
        raise ConvertError(f"no usable annotated images in {src} ({len(problems)} problem(s))", problems)

    records = read.records
    split_of = assign_splits((r.image for r in records), val_fraction, test_fraction, seed)
    items: dict[str, list[tuple[ImageRecord, str]]] = {s: [] for s in SPLITS}
    out_abs, src_abs = out.resolve(), src.resolve()
    for record in records:
        image = Path(os.path.relpath(src_abs / record.image, out_abs)).as_posix()
        items[split_of[record.image]].append((record, image))

    if flip:
        problems += _add_flipped(records, items, split_of, src_abs, out, progress)
        _fail_if_strict(strict, problems, src)

    tiles: set[str] = set()
    if tile is not None:
        tiles, unreadable = _cut_tiles(items, tile, tile_overlap, seed, out_abs, progress)
        problems += unreadable
        _fail_if_strict(strict, problems, src)

    splits = _write_splits(items, out, tasks, order, seed, test_fraction == 0, tiles)

    seen = sorted({b.label for r in records for b in r.boxes} - set(read.classes))
    report = ConvertReport(
        source=str(src), out=str(out), format=fmt, tasks=[t for t in CONVERTIBLE if t in tasks], order=order,
        flip=flip, tile=tile, tile_overlap=tile_overlap, seed=seed, classes=[*read.classes, *seen],
        images=len(records),
        negatives=sum(not r.boxes for r in records),
        boxes_per_class=dict(sorted(Counter(b.label for r in records for b in r.boxes).items())),
        splits=splits, problems=problems,
    )
    write_classes(out / CLASSES_FILE, report.classes)
    atomic_write(out / "summary.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report
