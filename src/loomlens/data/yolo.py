"""LabelImg's YOLO txt: one `.txt` per image with lines `class cx cy w h` (normalised 0..1),
and a `classes.txt` naming the class ids in order.

A label file's image has the same stem, beside it or in the `images/` folder that mirrors its
`labels/` folder; its classes are the nearest `classes.txt` in its folder or above."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from loomlens.data.atomic import atomic_open, atomic_write
from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import IMAGE_SUFFIXES, add_box, image_size, iter_files, read_text, relative

CLASSES_FILE = "classes.txt"
#: A box reaching past this many image widths or heights was written in pixels, not fractions
#: (a box a little over 1 is clipped, as a box a little outside the image is).
PIXELS_LIKELY = 1.5


def read_classes(path: Path, root: Path) -> tuple[list[str | None], list[Problem]]:
    """A `classes.txt` -> names by class id (None where a name cannot round-trip) + problems."""
    names: list[str | None] = []
    problems: list[Problem] = []
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are not classes; one in the middle is an error
    for number, line in enumerate(lines, 1):
        try:
            names.append(validate_label(line))
        except LabelError as err:
            names.append(None)
            problems.append(Problem(
                file=relative(path, root), line=number, message=str(err), fix="rename the class in classes.txt",
            ))
    return names, problems


def _images_for(txt: Path, root: Path) -> list[Path]:
    """The images with the label file's stem, beside it or else in the mirrored `images/`
    folder: one, none, or several with other extensions (a.jpg and a.png), which it cannot tell apart."""
    parts = txt.parent.relative_to(root).parts
    dirs = [txt.parent]
    if "labels" in parts:
        i = len(parts) - 1 - parts[::-1].index("labels")  # the innermost labels/
        dirs.append(root.joinpath(*parts[:i], "images", *parts[i + 1 :]))
    for d in dirs:
        found = _images_in(d).get(txt.stem)
        if found:
            return found
    return []


@cache
def _images_in(folder: Path) -> dict[str, list[Path]]:
    # Listing a folder once beats probing every suffix in every case for every label file.
    if not folder.is_dir():
        return {}
    images: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(p.stem, []).append(p)
    return images


def _nearest_classes(folder: Path, root: Path) -> Path | None:
    for d in (folder, *folder.parents):
        if (d / CLASSES_FILE).is_file():
            return d / CLASSES_FILE
        if d == root:
            return None
    return None


def _class_id(text: str) -> int:
    """A class id as YOLO writes it, `0`, or as numpy-based scripts do, `0.0`."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"class id {text!r} is not a whole number")
    return int(value)


YoloRow = tuple[int, int, tuple[float, float, float, float]]  # line, class id, normalised x1, y1, x2, y2


def parse_label_text(text: str, file: str) -> tuple[list[YoloRow], Problem | None]:
    """The lines of a YOLO label file -> (line, class id, normalised corners) rows, or a
    problem naming the first malformed line. A line is `class cx cy w h` (a box) or `class x1
    y1 x2 y2 x3 y3 ...` (an ultralytics segmentation polygon: its bounding box is kept)."""
    rows: list[YoloRow] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
                raise ValueError(f"expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)} fields")
            cls, values = _class_id(fields[0]), [float(f) for f in fields[1:]]
        except ValueError as err:
            return [], Problem(
                file=file, line=number, message=f"malformed YOLO line {line.strip()[:60]!r} ({err}); file skipped",
                fix="each line must be 'class_id cx cy w h' (or a polygon 'class_id x1 y1 x2 y2 ...') in 0..1",
            )
        if len(values) == 4:
            cx, cy, w, h = values
            corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        else:
            xs, ys = values[0::2], values[1::2]
            corners = (min(xs), min(ys), max(xs), max(ys))
        rows.append((number, cls, corners))
    return rows, None


def add_label_rows(record: ImageRecord, rows: Sequence[YoloRow], classes: Sequence[str | None], file: str,
                   classes_file: str = CLASSES_FILE) -> list[Problem]:
    """Add the boxes of `rows` (see `parse_label_text`) to `record`, class ids indexing
    `classes` (named by `classes_file` in messages); a row `_refused` or a bad box is dropped
    (counted in `record.dropped`) and reported. Returns the problems."""
    problems: list[Problem] = []
    for number, cls, corners in rows:
        refused = _refused(cls, corners, classes, classes_file, file, number)
        if refused is not None:
            problems.append(refused)
            record.dropped += 1
            continue
        x1, y1, x2, y2 = corners
        coords = (x1 * record.width, y1 * record.height, x2 * record.width, y2 * record.height)
        problems += add_box(record, classes[cls], coords, file, number)
    return problems


def _refused(cls: int, corners: tuple[float, float, float, float], classes: Sequence[str | None],
             classes_file: str, file: str, number: int) -> Problem | None:
    """Why the row `number` of `file` (class id `cls`, normalised `corners`) gives no box at all:
    an id with no usable name in `classes`, a coordinate that is no finite number (`inf`,
    `nan`: every other check would misread it), or pixels where fractions belong; else None."""
    if not 0 <= cls < len(classes) or classes[cls] is None:
        return Problem(
            file=file, line=number,
            message=f"class id {cls} has no usable name in {classes_file} ({len(classes)} classes); box dropped",
            fix=f"add the class to {classes_file} or fix the id",
        )
    if not all(math.isfinite(c) for c in corners):
        return Problem(file=file, line=number, message="a coordinate is not a finite number (inf or nan); box dropped",
                       fix="write cx cy w h as fractions of the image's width and height, 0..1")
    if max(corners[2], corners[3]) > PIXELS_LIKELY:
        return Problem(
            file=file, line=number, message=f"coordinates over 1 ({max(corners[2], corners[3]):g}): they look like "
            "pixels, and YOLO's are fractions of the image's size; box dropped",
            fix="divide cx and w by the image's width and cy and h by its height",
        )
    return None


def shared_label(txt: Path, images: Sequence[Path], root: Path) -> Problem:
    """The problem of the label file `txt` (under `root`) that several `images` share, one stem
    with other suffixes (a.jpg and a.png): which one its boxes were drawn on cannot be told, so
    it is skipped, and they with it. The YOLO reader and the data.yaml reader both report it so."""
    file = relative(txt, root)
    names = " and ".join(relative(i, root) for i in images)
    return Problem(
        file=file, message=f"images {names} share the label file's stem: which one {file} labels cannot be "
        "told; file skipped",
        fix=f"rename the one {file} was not drawn on (e.g. to {txt.stem}-2{images[-1].suffix}) and give it a "
        "label file of its own",
    )


def read_yolo_file(
    txt: Path, root: Path, classes: Sequence[str | None]
) -> tuple[ImageRecord | None, list[Problem]]:
    """One YOLO label file with its class names -> (record, or None if skipped; problems)."""
    file = relative(txt, root)
    images = _images_for(txt, root)
    if len(images) > 1:
        return None, [shared_label(txt, images, root)]
    image = images[0] if images else None
    if image is None or not image.resolve().is_relative_to(root.resolve()):
        return None, [Problem(
            file=file, message=f"no image named {txt.stem}.* beside it or in images/; file skipped",
            fix="put the image next to its label file, or delete the label file",
        )]
    try:
        text = read_text(txt)
    except OSError as err:
        return None, [Problem(file=file, message=f"cannot read: {err}; file skipped", fix="check permissions")]
    rows, problem = parse_label_text(text, file)
    if problem is not None:
        return None, [problem]
    size, problem = image_size(image, None, file)
    if size is None:
        return None, [problem]
    record = ImageRecord(relative(image, root), size[0], size[1], [], file)
    return record, add_label_rows(record, rows, classes, file)


def read_yolo(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """Every label `*.txt` under `root` (not `classes.txt`, not under the folders in `skip`)
    -> records, problems, and the class names of the `classes.txt` files used, top-most file
    first, each in id order."""
    root = Path(root)
    result = ReadResult()
    loaded: dict[Path, list[str | None]] = {}
    for txt in iter_files(root, ".txt", skip):
        if txt.name == CLASSES_FILE:
            continue
        classes_path = _nearest_classes(txt.parent, root)
        if classes_path is None:
            result.problems.append(Problem(
                file=relative(txt, root), message="no classes.txt in its folder or above; file skipped",
                fix="copy LabelImg's classes.txt into the dataset folder",
            ))
            continue
        if classes_path not in loaded:
            loaded[classes_path], problems = read_classes(classes_path, root)
            result.problems += problems
        record, problems = read_yolo_file(txt, root, loaded[classes_path])
        result.problems += problems
        if record is not None:
            result.records.append(record)
    for path in sorted(loaded, key=lambda p: len(p.parts)):
        result.classes += [n for n in loaded[path] if n is not None and n not in result.classes]
    _images_in.cache_clear()  # the folders may change before the next read
    return result


def write_classes(path: str | Path, classes: Sequence[str], opener: Callable[..., Any] = atomic_open) -> None:
    """Write class names one a line, id = line number - 1 (LabelImg's `classes.txt`),
    atomically through `opener` (`atomic_open`, or an `atomic_group`'s)."""
    with opener(path) as f:
        f.write("".join(f"{name}\n" for name in classes))


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a `classes.txt` (one a line, blank lines skipped), as `convert` and
    a training run keep them; empty if the file is missing."""
    path = Path(path)
    return [line.strip() for line in read_text(path).splitlines() if line.strip()] if path.exists() else []


def write_yolo(record: ImageRecord, txt_path: str | Path, classes: Sequence[str]) -> None:
    """Write `record`'s boxes as YOLO lines (ids index `classes`) at `txt_path`."""
    lines = []
    for box in record.boxes:
        cx, cy = (box.x1 + box.x2) / 2 / record.width, (box.y1 + box.y2) / 2 / record.height
        w, h = box.width / record.width, box.height / record.height
        lines.append(f"{classes.index(box.label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    atomic_write(txt_path, "".join(lines), durable=False)
