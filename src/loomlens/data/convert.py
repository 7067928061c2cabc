"""Annotations (VOC, CVAT, YOLO / ultralytics / Roboflow, COCO, Label Studio) -> Florence-2
JSONL training samples.

`convert` reads every annotation, reports problems instead of stopping at the first, keeps
the dataset's own split or splits by group of original images (a flipped copy, and every tile
cut from a frame, always lands in its original's split; see `data.splits`), makes the samples of each requested task and writes `train.jsonl`,
`val.jsonl` (`test.jsonl`), `classes.txt` and `summary.json` atomically, so a crash never
leaves a half-written file over a good one.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from loomlens.data.atomic import (
    atomic_copy, atomic_group, atomic_open, atomic_save_image, atomic_write, holds_files, same_stamp, stamp,
)
from loomlens.data.coco import read_coco
from loomlens.data.cvat import read_cvat, xml_root_tag
from loomlens.data.florence_text import boxes_to_text
from loomlens.data.labelstudio import looks_like_labelstudio, read_labelstudio
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import (
    IMAGE_SUFFIXES,
    BadImage,
    is_deep,
    image_size,
    iter_files,
    misnamed_files,
    open_image,
    orientation_problem,
    relative,
    to_rgb,
)
from loomlens.data.splits import SPLITS, assign_splits, group_keys, own_split, split_sources
from loomlens.data.tasks import CONVERTIBLE, REGISTRY
from loomlens.data.tiles import (
    AUTO_TILE_INPUT, PLACED_PX, TILES_DIR, auto_tile, exceeds, hidden_when_tiled, save_tiles, tile_record,
)
from loomlens.data.ultralytics import find_data_yaml, nested_data_yamls, read_yolo_dataset
from loomlens.data.voc import read_voc
from loomlens.data.yolo import CLASSES_FILE, write_classes

ORDERS = ("grouped", "interleaved")
READERS: dict[str, Callable[[Path, Sequence[Path]], ReadResult]] = {
    "voc": read_voc, "cvat": read_cvat, "yolo": read_yolo_dataset, "coco": read_coco, "labelstudio": read_labelstudio,
}
FORMATS = ("auto", *READERS)
#: How the JSONL reaches the source images: where they are, or copies / hard links in the output.
IMAGE_MODES = ("refer", "copy", "link")
ORIGINALS_DIR = "images/originals"  # relative to the output folder: copied or linked source images
SUMMARY = "summary.json"  # what a finished conversion did, the source it was made from included
STARTED = ".loomlens-convert.json"  # the source of a conversion under way: from its first image to its summary
MIN_TILE = 32  # pixels; a smaller tile holds too little fabric to tell a defect from weave
#: A class with fewer boxes than this in the train split's own frames (mirrors and tiles not
#: counted) is named in the report: with 3 a run missed the class on one draw and ranked it under
#: false boxes of its name on another, with 7 it found one of two test boxes and named the other
#: as a look-alike (docs/training.md, "A plant's uneven classes").
MIN_TRAIN_BOXES = 10

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
    source_root: str  # the source folder relative to `out`: where the samples' image paths may lead
    format: str
    tasks: list[str]
    order: str
    flip: bool
    tile: int | None  # the tile edge the frames were cut to (also when `--tile auto` chose it)
    tile_overlap: float
    seed: int
    classes: list[str]
    images: int  # original images converted (flipped copies and tiles not counted)
    negatives: int  # of those, images with no boxes
    keep_empty: bool  # images whose every box was dropped kept as negatives (else left out)
    unlabelled_clean: bool  # images no annotation names kept as negatives (else left out, each a problem)
    boxes_per_class: dict[str, int]
    # split -> {"images": n (flipped copies and tiles included), "samples": n, "tiles": n,
    #           "tile_samples": n, "boxes_per_class": {...}, "most_boxes": n (one image's or tile's),
    #           "samples_per_task": {...}}
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how the split was made: {"resplit", "group_by", "kept": the dataset's own split kept (images
    # per split), "from": where the dataset's own split was read (`split_sources`: VOC's
    # ImageSets/Main folders, the data.yaml, "CVAT subsets", "split folders train/, valid/"),
    # "drawn": images split at random, "groups": group -> {"split", "images"}}
    split: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    images_mode: str = "refer"  # refer | copy | link: whether the samples point at the source or at copies in `out`
    tile_reason: str = ""  # why `--tile auto` cut tiles or not; untiled, the tiles auto would have cut
    # class -> its boxes in the train split's own frames, for each class with some but fewer than
    # `MIN_TRAIN_BOXES` (`thin_classes`): too few for a run to learn it well
    thin_classes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in the report."""
        return asdict(self)


def detect_format(src: Path, skip: Sequence[Path] = ()) -> str:
    """Which annotation format the folder `src` (less the folders in `skip`) holds: "voc"
    (XML with an <annotation> root), "cvat" (XML with an <annotations> root), "coco" (a JSON
    object with 'images' and 'annotations', Roboflow's `_annotations.coco.json` too),
    "labelstudio" (a JSON list of tasks with 'data') or "yolo" (a data.yaml at the top, or
    label txt files and a classes.txt). Raises `ConvertError` when it finds none, or more
    than one (then `--format` must say which)."""
    roots: set[str | None] = set()
    xmls = list(iter_files(src, ".xml", skip))
    for path in xmls:
        roots.add(xml_root_tag(path))
        if {"annotation", "annotations"} <= roots:
            break
    found = [fmt for fmt, tag in (("voc", "annotation"), ("cvat", "annotations")) if tag in roots]
    jsons = list(iter_files(src, ".json", skip))
    found += [fmt for fmt, sniff in (("coco", _looks_like_coco), ("labelstudio", looks_like_labelstudio))
              if any(sniff(p) for p in jsons)]
    txts = [p.name for p in iter_files(src, ".txt", skip)]
    if find_data_yaml(src) is not None or (CLASSES_FILE in txts and len(txts) > txts.count(CLASSES_FILE)):
        found.append("yolo")
    elif not found and nested_data_yamls(src, skip):
        found.append("yolo")  # the reader names the folder to convert
    if len(found) == 1:
        return found[0]
    if not found:
        # Files that failed the sniff (a truncated export, labels without classes.txt) say why
        # only when read as their format: point there rather than at the folder.
        seen = [f"{n} {kind}" for kind, n in (("*.xml", len(xmls)), ("*.json", len(jsons)), ("*.txt", len(txts))) if n]
        hint = (f"; it holds {', '.join(seen)}: pass --format voc, cvat, coco, labelstudio or yolo to have "
                "each file's problem named") if seen else ""
        raise ConvertError(
            f"no annotations found in {src}: expected Pascal VOC *.xml (LabelImg), CVAT for images *.xml, "
            "COCO *.json (Roboflow's _annotations.coco.json too), a Label Studio JSON export, or YOLO: a "
            f"data.yaml (ultralytics, Roboflow) or *.txt labels with a classes.txt{hint}"
        )
    raise ConvertError(f"{src} holds more than one annotation format ({', '.join(found)}); pass --format")


def _looks_like_coco(path: Path) -> bool:
    # A cheap sniff for an object with both keys near the start, without parsing a possibly huge file.
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"images"' in head and b'"annotations"' in head


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


def unique_names(images: Sequence[str], prefix: str = "") -> list[str]:
    """One file name per image path, in order: `<prefix><name>`, with the folders folded into
    the name of every image whose name another image has too, then a counter, so no two are
    ever the same (even for a path given twice). A name depends on its own path and whether
    its name is shared, not on the order: a re-run that finds an output of `cam2/x.jpg` where a
    new `cam1/x.jpg` would now be named never takes it for cam1's (`atomic.same_stamp` reuses
    an output by time, and unpacked archives give many files one)."""
    shared = {base for base, n in Counter(PurePosixPath(i).name for i in images).items() if n > 1}
    used: set[str] = set()
    names = []
    for image in images:
        base = PurePosixPath(image).name
        candidates = itertools.chain(
            [f"{prefix}{base}"] if base not in shared else [],
            [prefix + image.replace("/", "_")],
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


def flip_image(src: Path, dst: Path, image: Image.Image | None = None) -> Image.Image:
    """Save `src` mirrored left-right at `dst`, in `src`'s own format (JPEG at quality 95),
    and return the mirrored image, in that format too. Not saved again while `dst` carries
    `src`'s modification time (`atomic.stamp`: a re-run over an unchanged `src`). `image`: `src`
    already open and decoded, to mirror instead of reading the file again."""
    if image is None:
        with open_image(src, decode=True) as im:
            return flip_image(src, dst, im)
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mirrored.format = image.format  # its tiles are cut in it too: a PNG named .jpg stays a PNG
    if not same_stamp(dst, src):
        atomic_save_image(mirrored, dst, image.format or "PNG")
        stamp(dst, src)
    return mirrored


def place_image(src: Path, dst: Path, mode: str) -> None:
    """Put the source image `src` at `dst` in the output: a hard link with `mode` "link" (a
    copy where the file system cannot link), else a copy; atomically (a half-copied image never
    sits at `dst`), and not again while `dst` has `src`'s size and modification time (a re-run)."""
    if not (same_stamp(dst, src) and dst.stat().st_size == src.stat().st_size):
        atomic_copy(src, dst, link=mode == "link")


def write_jsonl(path: Path, samples: Iterable[dict[str, Any]], opener: Callable[..., Any] = atomic_open) -> int:
    """Write one compact JSON object a line, atomically (through `opener`, `atomic_open` or an
    `atomic_group`'s); return the number of lines. If `samples` raises part-way, the file at
    `path` is left as it was."""
    count = 0
    with opener(path) as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


def _check_arguments(
    fmt: str, tasks: Sequence[str], order: str, val_fraction: float, test_fraction: float,
    tile: int | str | None, tile_overlap: float, images: str, group_by: str | None,
) -> None:
    """Refuse every option convert cannot use, before anything is read or written."""
    try:
        group_keys([], Path("."), group_by)  # the spec alone
    except ValueError as err:
        raise ConvertError(str(err)) from None
    if images not in IMAGE_MODES:
        raise ConvertError(f"unknown images mode {images!r}; use one of {', '.join(IMAGE_MODES)}")
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    unknown = [t for t in tasks if t not in CONVERTIBLE]
    if unknown or not tasks:
        raise ConvertError(f"unknown or no tasks {unknown}; use some of {', '.join(CONVERTIBLE)}")
    if order not in ORDERS:
        raise ConvertError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConvertError("val and test fractions must be in 0..1 and leave some images for training")
    if tile is not None and tile != "auto" and (not isinstance(tile, int) or tile < MIN_TILE):
        raise ConvertError(f"tile must be at least {MIN_TILE} px, got {tile}; use the model's input size or more "
                           "(or no tiles: --tile off)")
    if not 0 <= tile_overlap < 0.9:
        raise ConvertError(f"tile overlap must be in [0, 0.9), got {tile_overlap}; 0.25 is the usual share")


def _resolve_tile(tile: int | str | None, records: Sequence[ImageRecord]) -> tuple[int | None, str]:
    """The tile edge to cut `records` to and why: for `tile="auto"` its choice (`tiles.auto_tile`),
    for no tiles the tile auto would have cut, if any, so that `--tile off` is a choice made
    knowingly; a tile given in pixels needs no reason."""
    if tile not in ("auto", None):
        return tile, ""
    if not any(exceeds(r.width, r.height, AUTO_TILE_INPUT) for r in records):
        return None, f"no tiles: no frame is larger than the {AUTO_TILE_INPUT} px input" if tile else ""
    chosen = auto_tile(records)
    seen = (f"{hidden_when_tiled(records)} of {sum(len(r.boxes) for r in records)} boxes fall under "
            f"{PLACED_PX:g} px once their frames are squeezed whole to the {AUTO_TILE_INPUT} px input, where the "
            f"model finds a defect but seldom places its edges (a quarter or more are tiled for)")
    if tile is None:
        return None, "" if chosen is None else f"no tiles, though {seen}: --tile auto would cut {chosen} px tiles"
    if chosen is None:
        return None, f"no tiles: {seen}"
    return chosen, (f"tiles of {chosen} px: {seen}; {chosen} px is the largest tile that keeps most of them in "
                    f"sight, and predict and eval tile every frame larger than it")


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


def unconverted(folder: Path) -> str | None:
    """Where `folder`, given as a converted folder (train's or eval's data) and holding no split,
    holds annotations itself (`detect_format`: the labelled folder given in place of its
    conversion): that, and the command converting it into a folder of its own; else None."""
    try:
        fmt = detect_format(folder) if folder.is_dir() else None
    except ConvertError:
        fmt = None
    own = folder.parent / f"{folder.name}-jsonl"
    return (f"{folder} holds {fmt} annotations, not their conversion: convert them into a folder of their own "
            f"(`loomlens convert {folder} {own}`) and give that") if fmt else None


def _check_out(src: Path, out: Path) -> None:
    """Refuse a source folder that does not exist, and an output folder that would overwrite
    or hide input: a file, the conversion of another source (converting the same source again
    replaces it, and goes on where an interrupted one stopped), the source itself (its
    classes.txt would be rewritten, shifting YOLO ids), a folder holding the source, or a
    folder that holds anything but a conversion (a dataset's own classes.txt and labels would be
    overwritten or mixed with the outputs; inside the source they would also be skipped as
    input). A new or empty folder is fine, inside the source too: later runs skip it."""
    if not src.is_dir():
        raise ConvertError(f"source folder {src} does not exist")
    src_abs, out_abs = src.resolve(), out.resolve()
    elsewhere = f"give a new folder outside it, e.g. {src_abs.parent / (src_abs.name + '-jsonl')}"
    if out_abs.exists() and not out_abs.is_dir():
        raise ConvertError(f"the output folder {out} is a file, not a folder; nothing written; give a folder "
                           "(a new one is made)")
    before = _converted_from(out_abs)
    if before is not None and before != src_abs:
        raise ConvertError(f"the output folder {out} holds the conversion of {before}: "
                           f"converting {src} there would replace it; nothing written; give another folder, "
                           "or delete that one first")
    if out_abs == src_abs:
        raise ConvertError(f"the output folder {out} is the source folder: convert would overwrite its "
                           f"classes.txt and mix its outputs into the annotations; nothing written; {elsewhere}")
    if src_abs.is_relative_to(out_abs):
        raise ConvertError(f"the output folder {out} holds the source folder {src}: its outputs would land "
                           f"among the annotations; nothing written; {elsewhere}")
    if before is None and out_abs.is_dir() and holds_files(out_abs):
        raise ConvertError(f"the output folder {out} holds files that are not a conversion's output: convert "
                           "would overwrite its classes.txt and mix its outputs among them; nothing written; "
                           "give a new or empty folder")


def _earlier_outputs(src: Path) -> list[Path]:
    """The folders inside the resolved source `src` that hold a conversion, finished or
    interrupted (`_converted_from`, whatever source it names): their flipped copies and tiles
    are outputs, never input."""
    return sorted({found.parent for name in (SUMMARY, STARTED) for found in src.rglob(name)
                   if _converted_from(found.parent) is not None})


def _converted_from(out: Path) -> Path | None:
    """The source folder the conversion in `out` was made from, resolved: its `summary.json`'s,
    else (one stopped before its end) the `STARTED` mark's. None when there is neither, or it
    cannot be read (nothing to protect then). A summary written before sources were recorded
    whole names it relative to the working folder of its day, read here from this one."""
    for name in (SUMMARY, STARTED):
        try:
            return Path(json.loads((out / name).read_text(encoding="utf-8"))["source"]).resolve()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


@contextmanager
def _claim(out: Path, src: Path) -> Iterator[None]:
    """Claim `out` for the conversion of `src` before its first image is written (the `STARTED`
    mark, unless its summary or mark names this source already), so that a run stopped
    part-way is known as a conversion: the same command goes on, another is refused, and the
    source's later runs skip it as input. A `ConvertError` in the block (no usable image, a
    strict problem) with nothing written takes the claim back: the mark, and `out` where the
    claim made it; a folder holding images the block wrote keeps its mark."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    claimed = _converted_from(out) is None
    if claimed:
        atomic_write(out / STARTED, json.dumps({"source": str(src)}) + "\n")
    try:
        yield
    except ConvertError:
        if claimed and not any(p.name != STARTED for p in out.iterdir()):
            (out / STARTED).unlink(missing_ok=True)
            if made:
                out.rmdir()
        raise


def _tile_names(frames: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(frame key, frame path relative to the output) -> the file name its tiles are named
    after: distinct for distinct frames (see `unique_names`), so tiles never collide; "_x"
    cannot occur inside "_x<X0>_y<Y0>"."""
    ordered = sorted(frames)
    return dict(zip(ordered, unique_names([key for key, _ in ordered]), strict=True))


def _images(
    records: Sequence[ImageRecord], src: Path, out: Path, flip: bool, tile: int | None, overlap: float,
    seed: int, write: bool, progress: ProgressFn | None, mode: str = "refer",
) -> tuple[dict[int, list[tuple[ImageRecord, str]]], set[str], list[Problem]]:
    """Decode every record's image in full, once (a header can be whole over a truncated
    file, which would crash training later); a damaged one is reported and left out, one that
    EXIF turns or mirrors is reported and kept (`orientation_problem`). With
    `write`, that one decode also gives the flipped copy (`out/images/flipped_<name>`) and the
    tiles of both (`out/images/tiles/<frame name>_x<X0>_y<Y0><suffix>`, see `tile_record`),
    and with `mode` copy or link the image itself in `out/images/originals/` (see
    `place_image`). Only frames longer than a tile give tiles (`tiles.tile_record`), the
    frames prediction tiles. Images are worked on `_workers` threads at once (Pillow lets go
    of the GIL while it decodes and compresses), in order for `progress`.
    `src`, `out` resolved. Returns record index -> its (record, path relative to `out`) items
    (the frame first) for the whole images, the tile paths among them, and the problems.
    Write errors raise OSError."""
    flips = flipped_names([r.image for r in records]) if flip and write else {}
    placed = dict(zip(sorted(r.image for r in records), unique_names(sorted(r.image for r in records)), strict=True))
    frames = [(r.image, f"{ORIGINALS_DIR}/{placed[r.image]}" if mode != "refer"
               else Path(os.path.relpath(src / r.image, out)).as_posix()) for r in records]
    names = _tile_names(frames + [(f"images/{n}", f"images/{n}") for n in flips.values()])
    one = partial(_image, src=src, out=out, flips=flips, names=names, tile=tile if write else None,
                  overlap=overlap, seed=seed, place=mode if write and mode != "refer" else None)
    items: dict[int, list[tuple[ImageRecord, str]]] = {}
    tiles: set[str] = set()
    problems = []
    largest = max((r.width * r.height for r in records), default=0)
    pool = ThreadPoolExecutor(_workers(largest), thread_name_prefix="loomlens-convert")
    try:
        for i, (made, cut, found) in enumerate(pool.map(one, records, (image for _, image in frames))):
            if made is not None:
                items[i] = made
            tiles.update(cut)
            problems += found
            if progress:
                progress("images" if write else "check", i + 1, len(records))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error: no image started past it
    return items, tiles, problems


def _workers(pixels: int) -> int:
    """Threads `_images` works on, for frames of at most `pixels`: the cores this process may
    use, at most 8 (past that the disk, not the cores, sets the pace), and no more than a
    quarter of the memory holds at ~12 bytes a pixel each (a frame, its mirror and a copy, 4
    bytes a pixel at most): a line-scan camera's 300 MP frames go one at a time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the cores alone
        memory = None
    fit = cores if memory is None else memory // 4 // max(12 * pixels, 1)
    return max(1, min(8, cores, fit))


def _image(
    record: ImageRecord, image: str, *, src: Path, out: Path, flips: dict[str, str],
    names: dict[tuple[str, str], str], tile: int | None, overlap: float, seed: int, place: str | None,
) -> tuple[list[tuple[ImageRecord, str]] | None, set[str], list[Problem]]:
    """`_images`' work on one record whose image sits at `image` (relative to `out`): decode
    it, place it (`place`: copy or link, see `place_image`), mirror it (when `flips` names it)
    and cut its tiles and its mirror's (`tile`). Returns its (record, path) items (None when
    the image is damaged), its tile paths and its problems."""
    problems = []
    try:
        with open_image(src / record.image, decode=True) as im:
            turned = orientation_problem(im, record.image, record.source)
            problems += [turned] if turned else []
            if place:
                place_image(src / record.image, out / image, place)
            made = [(record, image, im)]
            if record.image in flips:
                path = f"images/{flips[record.image]}"
                mirrored = flip_image(src / record.image, out / path, im)
                made.append((ImageRecord(path, record.width, record.height,
                                         [b.hflip(record.width) for b in record.boxes], record.source),
                             path, mirrored))
            items = [(r, path) for r, path, _ in made]
            tiles: set[str] = set()
            for frame, path, pixels in made if tile is not None else []:
                name = PurePosixPath(names[frame.image, path])
                cut = {f"{TILES_DIR}/{name.stem}_x{t.window[0]}_y{t.window[1]}{name.suffix}": t
                       for t in tile_record(frame, tile, overlap, seed=seed)}
                # Lexically: "../src/..." passes through `out` even before it exists.
                # A deep frame's tiles are scaled as the whole frame is (see `to_rgb`), not each alone.
                save_tiles(Path(os.path.normpath(out / path)), {out / p: t.window for p, t in cut.items()},
                           to_rgb(pixels) if is_deep(pixels) else pixels)
                items += [(ImageRecord(p, t.width, t.height, list(t.boxes), record.source), p)
                          for p, t in cut.items()]
                tiles.update(cut)
            return items, tiles, problems
    except BadImage as err:
        problems.append(Problem(file=record.source, message=f"image {record.image} is damaged ({err}); skipped",
                                fix="replace the image with a whole copy, or delete its annotation"))
        return None, set(), problems


def _unannotated(src: Path, skip: Sequence[Path], records: Sequence[ImageRecord],
                 problems: Sequence[Problem]) -> list[Path]:
    """The image files under `src` (not under `skip`) that no annotation read refers to:
    silently leaving one out would hide a missing label file, or a split folder the data.yaml
    does not list. An image that one of `problems` already skipped, or named after an
    annotation file reported without its image (as LabelImg names them), counts: its own problem
    is reported already. An annotation file that was read excuses only the image it names, so a
    frame name repeated in another camera's folder still counts."""
    used = {(src / r.image).resolve() for r in records} | {Path(p.image).resolve() for p in problems if p.image}
    read = {r.source for r in records}
    stems = {PurePosixPath(p.file).stem for p in problems if p.file and not p.image and p.file not in read
             and PurePosixPath(p.file).suffix.lower() in (".xml", ".txt")}
    return [path for path in iter_files(src, IMAGE_SUFFIXES, skip) if path.resolve() not in used
            and path.stem not in stems]


def _unlabelled(paths: Sequence[Path], src: Path, clean: bool) -> tuple[list[ImageRecord], list[Problem]]:
    """The images no annotation names (`_unannotated`): with `clean`, defect-free records (a
    folder of good frames without label files; an unreadable one is a problem), else one
    problem each."""
    if not clean:
        return [], [Problem(file=relative(path, src), message="image in no usable annotation; not converted",
                            fix="annotate it (an annotation without boxes marks it defect-free), pass "
                            "--unlabelled-clean if every such image is, or move it out of the folder")
                    for path in paths]
    records, problems = [], []
    for path in paths:
        name = relative(path, src)
        size, problem = image_size(path, None, name)
        if size is None:
            problems.append(problem)
        else:
            records.append(ImageRecord(name, *size, [], name))
    return records, problems


def _emptied(records: Sequence[ImageRecord], keep_empty: bool) -> tuple[list[ImageRecord], list[Problem]]:
    """Leave out the images whose every box was dropped (they would teach the model to miss
    those defects), each reported, unless `keep_empty` keeps them as defect-free."""
    if keep_empty:
        return list(records), []
    emptied = [r for r in records if r.dropped and not r.boxes]
    return [r for r in records if not (r.dropped and not r.boxes)], [
        Problem(file=r.source, message=f"every box of {r.image} ({r.dropped}) was dropped; image left out rather "
                "than trained as defect-free", fix="fix its boxes (see the problems above), or pass --keep-empty")
        for r in emptied
    ]


def _twins(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[Problem]]:
    """Keep one record per image: a second annotation of the same image (LabelImg's
    `a (1).xml` beside `a.xml`, an image listed twice in a COCO file) is left out and
    reported, since each copy would teach that the other's defects are not there."""
    first: dict[str, ImageRecord] = {}
    problems = []
    for r in records:
        kept = first.setdefault(r.image, r)
        if kept is not r:
            problems.append(Problem(
                file=r.source, message=f"annotates {r.image} too, as {kept.source} does; its {len(r.boxes)} box(es) "
                "left out", fix="merge the two annotations into one, or delete one", image=r.image))
    return list(first.values()), problems


def _case_twins(records: Sequence[ImageRecord]) -> list[Problem]:
    """One problem per class name that differs from an earlier one only in case (`Hole` after
    `hole`): the two would train as two classes of one defect."""
    first: dict[str, str] = {}
    reported: set[str] = set()
    problems = []
    for r in records:
        for label in dict.fromkeys(b.label for b in r.boxes):
            earlier = first.setdefault(label.casefold(), label)
            if earlier != label and label not in reported:
                reported.add(label)
                problems.append(Problem(
                    file=r.source, message=f"class {label!r} differs from {earlier!r} only in case: two classes",
                    fix=f"spell both {earlier!r} in the labelling tool or the annotation files"))
    return problems


def _split_gaps(records: Sequence[ImageRecord], split_of: dict[str, str], info: dict[str, Any],
                fractions: tuple[float, float]) -> list[Problem]:
    """The problems of the split `choose_splits` made (`split_of`, `info`) for the (val, test)
    `fractions` asked: classes the train split lacks (`_class_gaps`), splits that grouping
    left empty (`_group_gaps`) and held-out splits without a defect (`_defect_gaps`)."""
    return [*_class_gaps(records, split_of, kept=bool(info["kept"])),
            *_group_gaps(split_of, info, val_fraction=fractions[0], test_fraction=fractions[1]),
            *_defect_gaps(records, split_of, kept=bool(info["kept"]))]


def _defect_gaps(records: Sequence[ImageRecord], split_of: dict[str, str], kept: bool) -> list[Problem]:
    """A problem for a val or test split whose images are all defect-free while the data has
    defects: its mAP is undefined, so training's `best/` and its collapse guard would judge by
    val loss alone, and a test figure would score nothing."""
    defective = {split_of[r.image] for r in records if r.boxes}
    if not defective:
        return []
    return [Problem(file=".", message=f"the {split} split holds no defect box, only defect-free images: it cannot "
                    f"score the run{' nor choose its best step' if split == 'val' else ''}",
                    fix="pass --resplit to draw the splits from all images" if kept else
                    f"raise --{split}-fraction, or pass another --seed")
            for split in ("val", "test") if split in split_of.values() and split not in defective]


def _class_gaps(records: Sequence[ImageRecord], split_of: dict[str, str], kept: bool) -> list[Problem]:
    """One problem per class with boxes outside the train split and none in it, or one for a
    train split that has no box at all (an anomaly-detection layout: `train/good` only): such a
    run trains its whole budget without ever seeing the defect. `kept`: some images kept the
    dataset's own split, which `--resplit` redraws."""
    where: dict[str, Counter] = {}
    for r in records:
        for b in r.boxes:
            where.setdefault(b.label, Counter())[split_of[r.image]] += 1
    missing = {label: n for label, n in where.items() if not n["train"]}
    if not missing:
        return []
    redraw = "pass --resplit to draw the splits from all images" if kept else "label more images with it"
    if len(missing) == len(where):
        redraw = redraw if kept else "label more defective images"
        return [Problem(file=".", message="the train split holds no defect box at all; training would learn "
                        "only 'no defect'", fix=f"{redraw}, or move some defective images into the train split")]
    return [Problem(file=".", message=f"class {label!r} has no box in the train split "
                    f"({', '.join(f'{n[s]} in {s}' for s in SPLITS if n[s])}); training cannot learn it",
                    fix=f"{redraw}, or move some of its images into the train split")
            for label, n in sorted(missing.items())]


def thin_classes(records: Sequence[ImageRecord], split_of: dict[str, str]) -> dict[str, int]:
    """Class -> its count of boxes in the train split of `records` (`split_of`: image -> split),
    for each class with at least one there and fewer than `MIN_TRAIN_BOXES`, rarest first. A
    split's table counts mirrors and tiles, so a class of three boxes there can read as 18."""
    counts = Counter(b.label for r in records if split_of[r.image] == "train" for b in r.boxes)
    return dict(sorted(((c, n) for c, n in counts.items() if n < MIN_TRAIN_BOXES), key=lambda cn: (cn[1], cn[0])))


def _group_gaps(split_of: dict[str, str], info: dict[str, Any], *, val_fraction: float, test_fraction: float
                ) -> list[Problem]:
    """A problem for each split asked for that `--group-by` left empty: with too few groups,
    every image went to train, and the run could neither choose its best step nor be scored."""
    if not info["group_by"]:
        return []
    groups = len(set(info["groups"])) or len(split_of)
    have = set(split_of.values())
    return [Problem(file=".", message=f"--group-by {info['group_by']} made {groups} group(s), and whole groups left "
                    f"the {split} split empty", fix="group by something that makes more groups (folder, "
                    "time:SECONDS, regex:...), or leave --group-by out")
            for split, fraction in (("val", val_fraction), ("test", test_fraction))
            if fraction > 0 and split not in have]


def _write_failed(err: OSError, out: Path) -> ConvertError:
    """A clear error for a failed write (a full disk above all): atomic writes leave every
    file already there whole, old or new."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    what = "the disk is full" if full else f"cannot write ({err.strerror or err})"
    return ConvertError(
        f"{what} while writing {err.filename or out}; every file already in {out} is intact (each is replaced "
        f"only once complete): {'free some space' if full else 'check the folder and its permissions'} "
        "and run convert again"
    )


def _split_stats(
    items: list[tuple[ImageRecord, str]], samples: list[dict[str, Any]], tiles: set[str]
) -> dict[str, Any]:
    return {
        "images": len(items),
        "samples": len(samples),
        "tiles": sum(image in tiles for _, image in items),
        "tile_samples": sum(s["image"] in tiles for s in samples),
        "boxes_per_class": dict(sorted(Counter(b.label for r, _ in items for b in r.boxes).items())),
        "most_boxes": max((len(r.boxes) for r, _ in items), default=0),  # eval's and predict's default read
        "samples_per_task": dict(Counter(s["task"] for s in samples)),
    }


def _write_splits(
    items: dict[str, list[tuple[ImageRecord, str]]], out: Path, tasks: Sequence[str], order: str, seed: int,
    no_test: bool, tiles: set[str], opener: Callable[..., Any],
) -> dict[str, dict[str, Any]]:
    """Shuffle each split's items (deterministic for `seed`), write its samples as
    `out/<split>.jsonl` through `opener` (an `atomic_group`'s) and return each split's counts;
    with `no_test`, no `test.jsonl` (the caller removes a stale one)."""
    rng = random.Random(seed)
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if split == "test" and no_test:
            continue
        chosen = sorted(items[split], key=lambda item: item[1])
        rng.shuffle(chosen)
        samples = list(_order(chosen, tasks, order))
        write_jsonl(out / f"{split}.jsonl", samples, opener)
        splits[split] = _split_stats(chosen, samples, tiles)
    return splits


def _usable_records(
    read: ReadResult, src: Path, skip: Sequence[Path], keep_empty: bool, unlabelled_clean: bool,
) -> tuple[list[ImageRecord], list[Problem]]:
    """The records of `read` worth converting (see `_emptied`), with the images of resolved
    `src` in no annotation as defect-free ones if `unlabelled_clean`, and every problem so far:
    the reader's, those images' otherwise, and the records left out."""
    clean, unlabelled = _unlabelled(_unannotated(src, skip, read.records, read.problems), src, unlabelled_clean)
    problems = [*read.problems, *unlabelled]
    records, twins = _twins([*read.records, *clean])
    records, emptied = _emptied(records, keep_empty)
    return records, problems + twins + _case_twins(records) + emptied


def _items_by_split(
    frames: dict[int, list[tuple[ImageRecord, str]]], split_of: dict[str, str]
) -> dict[str, list[tuple[ImageRecord, str]]]:
    """Split -> the items of every frame (the frame, its flipped copy and tiles) whose original
    image `split_of` puts there."""
    items: dict[str, list[tuple[ImageRecord, str]]] = {s: [] for s in SPLITS}
    for made in frames.values():
        items[split_of[made[0][0].image]] += made
    return items


def choose_splits(
    records: Sequence[ImageRecord], root: Path, *, val_fraction: float, test_fraction: float, seed: int,
    resplit: bool, group_by: str | None, split_from: Sequence[str],
) -> tuple[dict[str, str], dict[str, Any]]:
    """Image -> split for `records` (of the dataset in `root`), and how it was made (for
    summary.json; unless `resplit`, "from" names the reader's `split_from` and the split
    folders read: `split_sources`). Unless `resplit`, each image keeps the dataset's own split
    (`own_split`); the images without one, and its train images when it has no val split (or
    no test split and `test_fraction` asks for one), are split at random by group (`group_keys`
    of `group_by`), val (test) drawn only where the dataset has none.
    Raises `ConvertError` for a `group_by` it cannot read."""
    try:
        groups = group_keys(records, root, group_by)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    own = {} if resplit else {r.image: s for r in records if (s := own_split(r))}
    has = set(own.values())
    short = "val" not in has or (test_fraction > 0 and "test" not in has)  # its train images give the missing split
    free = [r.image for r in records if r.image not in own or (own[r.image] == "train" and short)]
    drawn = assign_splits(free, 0 if "val" in has else val_fraction, 0 if "test" in has else test_fraction,
                          seed, groups)
    split_of = {**own, **drawn}
    members = Counter(groups.values())
    info = {
        "resplit": resplit, "group_by": group_by,
        "kept": dict(Counter(s for image, s in own.items() if image not in drawn)),
        "from": [] if resplit else split_sources(records, split_from),
        "drawn": dict(Counter(drawn.values())),
        "groups": {g: {"split": split_of[image], "images": members[g]}
                   for image, g in sorted(groups.items()) if image in split_of},
    }
    return split_of, info


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
    tile: int | str | None = None,
    tile_overlap: float = 0.25,
    keep_empty: bool = False,
    unlabelled_clean: bool = False,
    resplit: bool = False,
    group_by: str | None = None,
    images: str = "refer",
) -> ConvertReport:
    """Convert the annotated dataset in folder `src` to Florence-2 JSONL in folder `out`, and
    return what was written and every problem found (`ConvertReport`, also `out/summary.json`).

    `format`: auto | voc | cvat | yolo | coco | labelstudio; `tasks`: any of `CONVERTIBLE`;
    `order`: see `_order`. `flip` adds a mirrored copy of every image and `tile` (px; "auto":
    `tiles.auto_tile` picks it, or none, and the report says why) the windows of every frame
    overlapping by `tile_overlap` (`tiles.tile_record`), each in its original's split. Damaged
    images are left out, so are images whose every box was dropped unless `keep_empty`, and images
    no annotation names unless `unlabelled_clean` (then defect-free). The dataset's own split is
    kept unless `resplit`; a drawn split keeps each group of `group_by` whole and is
    deterministic for `seed` (see `choose_splits`). `images`: refer (the samples point at
    `src`), copy or link (into `out/images/originals/`). Problems are reported and the rest
    converted (`strict`: `ConvertError` before anything is written); `progress(stage, done,
    total)` follows the image work. Raises `ConvertError` for user errors: no `src`, an `out`
    that is or holds it, a full disk."""
    _check_arguments(format, tasks, order, val_fraction, test_fraction, tile, tile_overlap, images, group_by)
    _check_out(src := Path(src), out := Path(out))
    out_abs, src_abs = out.resolve(), src.resolve()
    skip = [out, *_earlier_outputs(src_abs)]  # outputs inside the source are not input
    fmt = detect_format(src, skip) if format == "auto" else format
    read = READERS[fmt](src, skip)
    read.problems += misnamed_files(src, skip)  # the readers cannot name them: left out, said here
    records, problems = _usable_records(read, src_abs, skip, keep_empty, unlabelled_clean)
    _fail_if_strict(strict, problems, src)
    tile, tile_reason = _resolve_tile(tile, records)
    work = partial(_images, records, src_abs, out_abs, flip, tile, tile_overlap, seed, progress=progress,
                   mode=images)
    if strict and (flip or tile is not None):  # check every image before the first flip or tile is written
        problems += work(write=False)[2]
        _fail_if_strict(strict, problems, src)
    try:
        with _claim(out_abs, src_abs):
            frames, tiles, damaged = work(write=True)
            problems += damaged
            _fail_if_strict(strict, problems, src)
            records = [records[i] for i in frames]
            if not records:
                raise ConvertError(f"no usable annotated images in {src} ({len(problems)} problem(s))", problems)
        split_of, split_info = choose_splits(records, src_abs, val_fraction=val_fraction,
                                             test_fraction=test_fraction, seed=seed, resplit=resplit,
                                             group_by=group_by, split_from=read.split_from)
        problems += _split_gaps(records, split_of, split_info, (val_fraction, test_fraction))
        seen = sorted({b.label for r in records for b in r.boxes} - set(read.classes))
        report = ConvertReport(
            source=str(src_abs), out=str(out),
            source_root="." if images != "refer" else Path(os.path.relpath(src_abs, out_abs)).as_posix(),
            format=fmt, tasks=[t for t in CONVERTIBLE if t in tasks], order=order,
            flip=flip, tile=tile, tile_overlap=tile_overlap, seed=seed, classes=[*read.classes, *seen],
            images=len(records), negatives=sum(not r.boxes for r in records), keep_empty=keep_empty,
            unlabelled_clean=unlabelled_clean, images_mode=images,
            boxes_per_class=dict(sorted(Counter(b.label for r in records for b in r.boxes).items())),
            split=split_info, problems=problems, tile_reason=tile_reason,
            thin_classes=thin_classes(records, split_of),
        )
        return _write_outputs(report, _items_by_split(frames, split_of), out, tiles,
                              no_test=test_fraction == 0 and "test" not in split_of.values())
    except OSError as err:
        raise _write_failed(err, out) from err


def _write_outputs(report: ConvertReport, items: dict[str, list[tuple[ImageRecord, str]]], out: Path,
                   tiles: set[str], no_test: bool) -> ConvertReport:
    """Write each split's samples of `items` (`_write_splits`), `classes.txt` and `summary.json`
    for `report` into `out` together (`atomic_group`: a failed write leaves all of them as they
    were), then drop a stale `test.jsonl` where `no_test` and the `STARTED` mark. Returns
    `report` with its `splits` counted."""
    with atomic_group() as opener:
        report.splits = _write_splits(items, out, report.tasks, report.order, report.seed, no_test, tiles, opener)
        write_classes(out / CLASSES_FILE, report.classes, opener)
        with opener(out / SUMMARY) as f:
            f.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if no_test:
        (out / "test.jsonl").unlink(missing_ok=True)  # a stale one would be read as current
    (out / STARTED).unlink(missing_ok=True)  # the summary names the source from here on
    return report
