"""Ultralytics / Roboflow YOLO datasets: a `data.yaml` naming the classes and the splits.

`data.yaml` holds `names` (a list, or a dict id -> name), optionally `path` (the dataset
root) and `train` / `val` / `test`, each a folder of images, a txt file listing images, one
image, or a list of those. Paths resolve as ultralytics resolves them: against `path` (itself
relative to the folder of data.yaml), and a path starting with `../` that leads nowhere is
tried again without it (Roboflow writes `train: ../train/images` beside `train/`); the folder
beside data.yaml is the fallback root. Each image's labels are in the `labels/` folder that
mirrors its `images/` folder (the last `/images/` in its path), same stem, `.txt`; an image
without one is defect-free. Segmentation polygons become their bounding boxes. Every image
keeps the split its data.yaml puts it in (`ImageRecord.split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import FOREIGN_ABSOLUTE, IMAGE_SUFFIXES, image_size, iter_files, read_text, relative
from loomlens.data.yolo import add_label_rows, parse_label_text, read_yolo

YAML_SUFFIXES = (".yaml", ".yml")
#: data.yaml key -> loomlens split.
SPLIT_KEYS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def find_data_yaml(root: Path) -> Path | None:
    """The dataset description at the top of `root`: `data.yaml` if there is one, else the
    only top-level YAML file that declares `names` and a split; None when there is none."""
    candidates = sorted(p for p in root.iterdir() if p.suffix.lower() in YAML_SUFFIXES and p.is_file())
    described = [p for p in candidates if _declares_dataset(p)]
    named = [p for p in described if p.stem.lower() == "data"]
    return (named or described or [None])[0]


def _declares_dataset(path: Path) -> bool:
    try:
        data = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError):
        return path.stem.lower() == "data"  # a broken data.yaml is still the one meant: report it
    return isinstance(data, dict) and "names" in data and any(k in data for k in SPLIT_KEYS)


def _key_lines(text: str) -> dict[str, int]:
    """Top-level key -> its 1-based line in the YAML `text` (for messages); empty if unparsable."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def _names(data: dict[str, Any], file: str, line: int | None) -> tuple[list[str | None], list[Problem]]:
    """`names` (list, or dict of id -> name) -> names by class id (None where unusable)."""
    raw = data.get("names")
    fix = "write names as a list (names: [drop, wrinkle]) or a dict of ids (names: {0: drop, 1: wrinkle})"
    if isinstance(raw, list):
        pairs = list(enumerate(raw))
    elif isinstance(raw, dict) and all(isinstance(k, int) and k >= 0 or str(k).isdigit() for k in raw):
        pairs = sorted((int(k), v) for k, v in raw.items())  # ids quoted ('0': drop), as ultralytics takes them
    else:
        return [], [Problem(file=file, line=line, message=f"'names' is {raw!r}, not a list or a dict of class ids",
                            fix=fix)]
    names: list[str | None] = [None] * (max((k for k, _ in pairs), default=-1) + 1)
    problems = []
    for k, name in pairs:
        try:
            names[k] = validate_label(str(name))
        except LabelError as err:
            problems.append(Problem(file=file, line=line, message=f"class {k}: {err}", fix="rename the class"))
    return names, problems


def _resolve(entry: str, bases: Sequence[Path]) -> Path | None:
    """Where a split entry leads, as ultralytics resolves it: against each base in turn, and
    without a leading `../` when that leads nowhere (Roboflow's exports); an absolute path
    written on another machine (`/content/datasets/x/train/images` in Colab) that leads nowhere,
    by its longest tail of two parts or more found under a base; None if nowhere."""
    tries = [entry, entry[3:]] if entry.startswith("../") else [entry]
    parts = PurePosixPath(entry.replace("\\", "/")).parts[1:]
    if FOREIGN_ABSOLUTE.match(entry.replace("\\", "/")) and not Path(entry).exists():
        tries += ["/".join(parts[i:]) for i in range(len(parts) - min(2, len(parts)) + 1)]
    for base in bases:
        for attempt in tries:
            path = (base / attempt).resolve()
            if path.exists():
                return path
    return None


def _listed_images(listing: Path, bases: Sequence[Path]) -> list[Path]:
    """The images an ultralytics image-list txt names, one a line: `./x` relative to the list's
    folder, other relative paths to the list's folder or the bases, absolute ones as they are."""
    images = []
    for line in read_text(listing).splitlines():
        name = line.strip()
        if name:
            images.append(_resolve(name, [listing.parent, *bases]) or (listing.parent / name).resolve())
    return images


def label_path(image: Path) -> Path:
    """The label file ultralytics reads for `image`: the last `/images/` of its path swapped
    for `/labels/`, the suffix for `.txt`."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        i = len(parts) - 2 - parts[-2::-1].index("images")
        parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def _split_images(
    entries: Any, key: str, bases: Sequence[Path], root: Path, skip: Sequence[Path], file: str, line: int | None,
) -> tuple[list[Path], list[Problem]]:
    """The images one split of data.yaml names (`entries`: a path or a list of paths)."""
    images: list[Path] = []
    problems: list[Problem] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        path = _resolve(str(entry), bases)
        tried = ", ".join(str(b / str(entry)) for b in bases)
        if path is None:
            problems.append(Problem(
                file=file, line=line, message=f"{key}: {str(entry)!r} points nowhere (tried {tried})",
                fix="correct the path in data.yaml: relative to its 'path', or to the folder beside data.yaml",
            ))
        elif not path.is_relative_to(root.resolve()):
            problems.append(Problem(
                file=file, line=line, message=f"{key}: {str(entry)!r} leads outside the dataset folder {root}",
                fix="keep the images inside the dataset folder, or convert the folder that holds them",
            ))
        elif path.is_dir():
            images += iter_files(path, IMAGE_SUFFIXES, skip)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            images += _listed_images(path, bases)
    return images, problems


def read_data_yaml(path: Path, root: Path, skip: Sequence[Path] = ()) -> ReadResult:
    """The dataset a `data.yaml` at `path` describes (inside the dataset folder `root`, not
    under `skip`) -> records (each with its `split`), problems and class names in id order."""
    file = relative(path, root)
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return ReadResult(problems=[Problem(file=file, line=mark.line + 1 if mark else None,
                                            message=f"malformed YAML ({getattr(err, 'problem', err)})",
                                            fix="fix the YAML, or export the dataset again")])
    if not isinstance(data, dict):
        return ReadResult(problems=[Problem(file=file, line=1, message="not a YAML mapping",
                                            fix="data.yaml holds names: and train:/val:/test: keys")])
    lines = _key_lines(text)
    names, problems = _names(data, file, lines.get("names"))
    if not names:  # no class list: no label file can be read
        return ReadResult(problems=problems)
    result = ReadResult(problems=problems, classes=[n for n in names if n is not None])
    folder = path.parent.resolve()
    given = data.get("path")
    bases = ([(folder / str(given)).resolve()] if given else []) + [folder]
    seen: dict[Path, str] = {}
    for key, split in SPLIT_KEYS.items():
        if not data.get(key):
            continue
        images, problems = _split_images(data[key], key, bases, root, skip, file, lines.get(key))
        result.problems += problems
        for image in images:
            if image.resolve() in seen:
                continue  # an image listed twice keeps its first split
            seen[image.resolve()] = split
            record, problems = _record(image, split, names, root, file)
            result.problems += problems
            if record is not None:
                result.records.append(record)
    if not seen and not result.problems:
        result.problems.append(Problem(file=file, message="names no split (train:, val: or test:)",
                                       fix="add train: and val: with the image folders"))
    return result


def _record(
    image: Path, split: str, names: Sequence[str | None], root: Path, yaml_file: str
) -> tuple[ImageRecord | None, list[Problem]]:
    """One image of a data.yaml split and its label file -> (record or None; problems)."""
    if not image.is_file():
        return None, [Problem(file=yaml_file, message=f"listed image {image} does not exist; skipped",
                              fix="fix the image list, or restore the image")]
    if not image.resolve().is_relative_to(root.resolve()):
        return None, [Problem(file=yaml_file, message=f"listed image {image} lies outside the dataset folder; skipped",
                              fix="keep the images inside the dataset folder")]
    labels = label_path(image)
    file = relative(labels, root) if labels.is_file() else yaml_file
    rows, problem = parse_label_text(read_text(labels), file) \
        if labels.is_file() else ([], None)
    if problem is not None:
        return None, [problem]
    size, problem = image_size(image, None, file)
    if size is None:
        return None, [problem]
    record = ImageRecord(relative(image, root), size[0], size[1], [], file, split=split)
    return record, add_label_rows(record, rows, names, file, classes_file=f"{yaml_file} names")


def read_yolo_dataset(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """A YOLO dataset under `root` (not under `skip`): through its data.yaml when it has one
    (ultralytics, Roboflow), else LabelImg's label files with a classes.txt (`read_yolo`)."""
    root = Path(root)
    described = find_data_yaml(root)
    return read_yolo(root, skip) if described is None else read_data_yaml(described, root, skip)
