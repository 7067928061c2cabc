"""Ultralytics / Roboflow YOLO datasets: a `data.yaml` naming the classes and the splits.

`data.yaml` holds `names` (a list, or a dict id -> name), optionally `path` (the dataset
root) and `train` / `val` / `test`, each a folder of images, a txt file listing images, one
image, or a list of those. Paths resolve as ultralytics resolves them: against `path` (itself
relative to the folder of data.yaml), and a path starting with `../` that leads nowhere is
tried again without it (Roboflow writes `train: ../train/images` beside `train/`); the folder
beside data.yaml is the fallback root. Each image's labels are in the `labels/` folder that
mirrors its `images/` folder (the last `/images/` in its path), same stem, `.txt`; an image
without one is defect-free. Segmentation polygons become their bounding boxes. Every image
keeps the split its data.yaml puts it in (`ImageRecord.split`). As ultralytics tells names
apart by case, a label file no image reads (`img_001.txt` beside `IMG_001.JPG`, a `Labels/`
folder) is reported, and the image it matches but for case skipped, not trained as defect-free.
Images that read one label file (`a.jpg` and `a.png`) are reported as the YOLO reader reports
them (`yolo.shared_label`), and skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import (
    FOREIGN_ABSOLUTE,
    IMAGE_SUFFIXES,
    image_size,
    is_utf8,
    iter_files,
    read_text,
    relative,
)
from loomlens.data.yolo import CLASSES_FILE, add_label_rows, parse_label_text, read_yolo, shared_label

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


def nested_data_yamls(root: Path, skip: Sequence[Path] = ()) -> list[Path]:
    """The dataset YAML files (see `_declares_dataset`) in the folders below `root`, not under
    `skip`: an export unzipped into a folder of its own (Windows' Extract All) inside the folder
    given. Their paths lead from their own folder, which is the one to convert."""
    return [p for p in iter_files(root, YAML_SUFFIXES, skip) if p.parent != root and _declares_dataset(p)]


def _declares_dataset(path: Path) -> bool:
    try:
        data = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError):
        return path.stem.lower() == "data"  # a broken data.yaml is still the one meant: report it
    return isinstance(data, dict) and "names" in data and any(k in data for k in SPLIT_KEYS)


def _top_nodes(text: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Top-level key -> (its key node, its value node) in the YAML `text`, for the lines and the
    text as written that messages quote; empty if unparsable."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value}


def _entries_written(node: yaml.Node | None) -> list[tuple[int, str | None]]:
    """(1-based line, text as written, None when not one scalar) of each entry of a `names`
    node: a list's items, a dict's values, in order; empty for anything else."""
    if isinstance(node, yaml.SequenceNode):
        items = node.value
    elif isinstance(node, yaml.MappingNode):
        items = [v for _, v in node.value]
    else:
        return []
    return [(v.start_mark.line + 1, v.value if isinstance(v, yaml.ScalarNode) else None) for v in items]


def _names(
    data: dict[str, Any], file: str, line: int | None, written: Sequence[tuple[int, str | None]]
) -> tuple[list[str | None], list[Problem]]:
    """`names` (list, or dict of id -> name; `written`: each entry's line and text, see
    `_entries_written`) -> names by class id (None where unusable). An entry YAML reads as no
    text (`no` is False, `~` None, `1.0` a number) is refused rather than trained as 'False'."""
    raw = data.get("names")
    fix = "write names as a list (names: [drop, wrinkle]) or a dict of ids (names: {0: drop, 1: wrinkle})"
    if isinstance(raw, list):
        ids, entries = list(range(len(raw))), raw
    elif isinstance(raw, dict) and all(isinstance(k, int) and k >= 0 or str(k).isdigit() for k in raw):
        ids, entries = [int(k) for k in raw], list(raw.values())  # ids quoted ('0': drop), as ultralytics takes them
    else:
        return [], [Problem(file=file, line=line, message=f"'names' is {raw!r}, not a list or a dict of class ids",
                            fix=fix)]
    where = list(written) if len(written) == len(entries) else [(line, None)] * len(entries)
    names: list[str | None] = [None] * (max(ids, default=-1) + 1)
    problems = []
    for k, name, (at, text) in sorted(zip(ids, entries, where), key=lambda entry: entry[0]):
        if not isinstance(name, str):
            problems.append(Problem(
                file=file, line=at, message=f"class {k} is {text!r}, which YAML reads as {name!r}, not as a name"
                if text else f"class {k} is {name!r}, not a name",
                fix=f"quote it: '{text}'" if text else "write the class's name as text"))
            continue
        try:
            names[k] = validate_label(name)
        except LabelError as err:
            problems.append(Problem(file=file, line=at, message=f"class {k}: {err}", fix="rename the class"))
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


def _label_folders(folder: Path, root: Path) -> list[Path]:
    """The folders inside `root` that hold, or look meant to hold, the label files of the
    images in `folder`, all resolved: the `labels/` folder ultralytics reads (`label_path`,
    where that is not `folder` itself), and any spelled as it but for case (`Labels/`, or
    `labels/` beside `Images/`), which ultralytics never reads."""
    read = label_path(folder / "image.jpg").parent
    found = [read] if read != folder and read.is_dir() and read.is_relative_to(root) else []
    parts = folder.relative_to(root).parts
    at = [i for i, part in enumerate(parts) if part.casefold() == "images"]
    if not at:
        return found
    for sibling in sorted(root.joinpath(*parts[: at[-1]]).iterdir()):
        mirror = sibling.joinpath(*parts[at[-1] + 1 :])
        if sibling.name.casefold() == "labels" and mirror.is_dir() and not any(mirror.samefile(f) for f in found):
            found.append(mirror)
    return found


def _identity(path: Path) -> tuple[int, int]:
    """A file's identity (device, inode): one file by two names on a case-insensitive disk."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _unread_labels(images: Sequence[Path], root: Path) -> tuple[list[Problem], set[Path]]:
    """The label files no image of `images` reads (see `label_path`), in the folders
    `_label_folders` finds for theirs -> (a problem for each, the images to skip, resolved).
    Ultralytics pairs them case-sensitively and reads nothing in a `Labels/` folder, so such a
    file (`img_001.txt` for `IMG_001.JPG`, Windows' doing) would leave its image defect-free:
    an image whose stem it matches but for case, without a label file of its own, is skipped."""
    root = root.resolve()
    images = [i.resolve() for i in images if i.is_file() and i.resolve().is_relative_to(root)]
    read = {_identity(label_path(i)) for i in images if label_path(i).is_file()}
    by_folder: dict[Path, dict[str, list[Path]]] = {}  # folder -> casefolded stem -> its images
    for image in images:
        by_folder.setdefault(image.parent, {}).setdefault(image.stem.casefold(), []).append(image)
    problems: list[Problem] = []
    for folder, stems in by_folder.items():
        for labels in _label_folders(folder, root):
            for txt in sorted(labels.iterdir()):
                if txt.suffix.lower() != ".txt" or txt.name == CLASSES_FILE or txt.name.startswith(".") \
                        or not is_utf8(txt.name) or not txt.is_file() or _identity(txt) in read:
                    continue
                problems += _unread_label(txt, stems.get(txt.stem.casefold(), []), folder, root)
    return problems, {Path(p.image) for p in problems if p.image}


def _unread_label(txt: Path, alike: Sequence[Path], folder: Path, root: Path) -> list[Problem]:
    """The problems of the label file `txt` that no image reads, `alike` the images of `folder`
    whose stem is its stem but for case: one for each of them without a label file (to skip,
    named in `image`), else one for the file."""
    file = relative(txt, root)
    lost = [image for image in alike if not label_path(image).is_file()]
    if lost:
        return [Problem(
            file=file, image=str(image), fix=f"rename it to {relative(label_path(image), root)}",
            message=f"no image reads it: ultralytics reads {relative(label_path(image), root)} for "
            f"{relative(image, root)} (case matters); that image skipped, not trained as defect-free",
        ) for image in lost]
    if alike:
        ownlabel = relative(label_path(alike[0]), root)
        return [Problem(file=file, message=f"no image reads it: {relative(alike[0], root)} reads {ownlabel} "
                        "(case matters); its boxes are not trained",
                        fix=f"move its lines into {ownlabel} and delete it")]
    return [Problem(file=file, message=f"no image reads it: data.yaml lists no image {txt.stem}.* (in any case) in "
                    f"{relative(folder, root)}/; its boxes are not trained",
                    fix=f"put its image in {relative(folder, root)}/ (and list it in data.yaml), or delete it")]


def _shared_labels(images: Sequence[Path], root: Path) -> tuple[list[Problem], set[Path]]:
    """The label files several of `images` read (`label_path`: a.jpg and a.png in one folder,
    or names alike but for case on a disk that ignores it) -> (`shared_label`'s problem for
    each, as the YOLO reader reports it; their images, resolved, to skip): which one the boxes
    were drawn on cannot be told, and the others would train them where they are not."""
    readers: dict[tuple[int, int], list[Path]] = {}
    for image in images:
        if image.is_file() and label_path(image).is_file():
            readers.setdefault(_identity(label_path(image)), []).append(image)
    shared = [sorted(group) for group in readers.values() if len(group) > 1]
    return ([shared_label(label_path(group[0]), group, root) for group in shared],
            {image.resolve() for group in shared for image in group})


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
    under `skip`) -> records (each with its `split`), problems, class names in id order and
    the data.yaml's path (relative to `root`) as where the split came from."""
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
    nodes = _top_nodes(text)
    lines = {key: node.start_mark.line + 1 for key, (node, _) in nodes.items()}
    names, problems = _names(data, file, lines.get("names"), _entries_written(nodes.get("names", (None, None))[1]))
    if not names:  # no class list: no label file can be read
        return ReadResult(problems=problems)
    result = ReadResult(problems=problems, classes=[n for n in names if n is not None])
    folder = path.parent.resolve()
    given = data.get("path")
    bases = ([(folder / str(given)).resolve()] if given else []) + [folder]
    seen: dict[Path, tuple[Path, str]] = {}  # resolved image -> (the image as listed, its split)
    for key, split in SPLIT_KEYS.items():
        if not data.get(key):
            continue
        images, problems = _split_images(data[key], key, bases, root, skip, file, lines.get(key))
        result.problems += problems
        for image in images:
            seen.setdefault(image.resolve(), (image, split))  # an image listed twice keeps its first split
    problems, unlabelled = _unread_labels([image for image, _ in seen.values()], root)
    shared, ambiguous = _shared_labels([image for image, _ in seen.values()], root)
    result.problems += problems + shared
    skipped = unlabelled | ambiguous
    for image, split in seen.values():
        if image.resolve() in skipped:
            continue
        record, problems = _record(image, split, names, root, file)
        result.problems += problems
        if record is not None:
            result.records.append(record)
    result.split_from = [file] if result.records else []
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
    (ultralytics, Roboflow), else LabelImg's label files with a classes.txt (`read_yolo`). With
    neither, a data.yaml in a folder below (`nested_data_yamls`) is a problem naming the folder
    to convert, rather than each label file's missing classes.txt."""
    root = Path(root)
    described = find_data_yaml(root)
    if described is not None:
        return read_data_yaml(described, root, skip)
    nested = nested_data_yamls(root, skip)
    if nested and not any(p.name == CLASSES_FILE for p in iter_files(root, ".txt", skip)):
        return ReadResult(problems=[Problem(
            file=relative(path, root), fix=f"convert its folder: loomlens convert {path.parent} OUT",
            message="a data.yaml below the folder converted: its paths lead from its own folder; nothing read",
        ) for path in nested])
    return read_yolo(root, skip)
