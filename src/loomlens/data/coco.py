"""COCO JSON: `images` (id, file_name, width, height), `categories` (id, name) and
`annotations` (image_id, category_id, bbox = [x, y, w, h] in pixels).

Every `*.json` under the dataset root is read as one COCO file; `file_name` is found beside
the JSON, in an `images/` folder beside or above it, or at the root. Images with no
annotations are negatives; images that share an `id` (COCO files merged naively) are
reported and skipped, since their annotations cannot be told apart."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from loomlens.data.atomic import atomic_write
from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import add_box, find_image, image_size, iter_files, read_text, relative


def _load(path: Path, file: str) -> tuple[dict[str, Any] | None, Problem | None]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        return None, Problem(
            file=file, line=err.lineno, message=f"malformed JSON ({err.msg}); file skipped",
            fix="fix the JSON or export it again",
        )
    except (OSError, UnicodeDecodeError) as err:
        return None, Problem(file=file, message=f"cannot read: {err}; file skipped", fix="check the file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None, Problem(
            file=file, message="not a COCO file (no 'images' list); file skipped",
            fix="move other JSON files out of the dataset folder",
        )
    return data, None


def _entries(data: dict[str, Any], key: str, fields: Sequence[str], file: str) -> tuple[list[dict], list[Problem]]:
    """The dicts in `data[key]` that carry all `fields`; the others reported by index."""
    good, problems = [], []
    for i, entry in enumerate(data.get(key) or []):
        # Ids must be int or str: they become dict keys, and a list id would crash that.
        if isinstance(entry, dict) and all(f in entry for f in fields) and all(
            isinstance(entry[f], (int, str)) for f in fields if f.endswith("id")
        ):
            good.append(entry)
        else:
            problems.append(Problem(
                file=file, message=f"{key}[{i}] lacks one of {list(fields)}; skipped",
                fix=f"every entry of '{key}' needs {', '.join(fields)}",
            ))
    return good, problems


def _categories(data: dict[str, Any], file: str) -> tuple[dict[str, str | None], list[Problem]]:
    """Category id (as text: 1 is "1", as image ids pair) -> validated name (None when the name
    cannot round-trip) + problems."""
    entries, problems = _entries(data, "categories", ("id", "name"), file)
    names: dict[str, str | None] = {}
    for cat in entries:
        try:
            names[str(cat["id"])] = validate_label(str(cat["name"]))
        except LabelError as err:
            names[str(cat["id"])] = None
            problems.append(Problem(file=file, message=f"category {cat['id']}: {err}", fix="rename the category"))
    return names, problems


def read_coco_file(path: Path, root: Path) -> ReadResult:
    """One COCO JSON file -> its records (sorted by image path), problems and class names
    (in the order of its 'categories')."""
    file = relative(path, root)
    data, problem = _load(path, file)
    if data is None:
        return ReadResult(problems=[problem])
    result = ReadResult()
    categories, result.problems = _categories(data, file)
    images, problems = _entries(data, "images", ("id", "file_name"), file)
    raw = [_with_bbox(a) for a in data.get("annotations") or []]
    annotations, more = _entries({"annotations": raw}, "annotations", ("image_id", "category_id", "bbox"), file)
    result.problems += problems + more
    kept = {id(a) for a in annotations}
    # An image whose annotation was unusable is not a defect-free one (see convert's `_emptied`).
    unusable = Counter(str(a["image_id"]) for a in raw if isinstance(a, dict) and id(a) not in kept
                       and isinstance(a.get("image_id"), (int, str)))
    used = {str(ann["category_id"]) for ann in annotations}
    parents = {str(c.get("supercategory")) for c in data.get("categories") or [] if isinstance(c, dict)}
    # Roboflow adds the project itself as a category (id 0), the supercategory of all the
    # others, with no annotation: a class the model would be taught nothing about.
    result.classes = [n for i, n in categories.items() if n is not None and (i in used or n not in parents)]
    # Ids pair as written, 0 or "0": a script may write one list's as text and the other's as numbers.
    by_image: dict[str, list[dict]] = {}
    for ann in annotations:
        by_image.setdefault(str(ann["image_id"]), []).append(ann)
    dirs = [path.parent, path.parent / "images", path.parent.parent / "images", root / "images", root]
    shared = _shared_ids(images)
    records: dict[str, ImageRecord] = {}
    for img in images:
        key = str(img["id"])
        found, problem = find_image(root, str(img["file_name"]), dirs, file)
        if key in shared:  # whose boxes are whose is unknown: neither trains as defect-free
            names = " and ".join(repr(str(other["file_name"])) for other in shared[key])
            result.problems.append(Problem(
                file=file, image=None if found is None else str(found),
                message=f"images {names} share image id {img['id']!r}; {str(img['file_name'])!r} skipped",
                fix="give every image its own id (and its annotations that image_id)",
            ))
            by_image.pop(key, None)
            continue
        if key in records:  # the same entry twice: its boxes went with the first
            result.problems.append(Problem(file=file, message=f"image {str(img['file_name'])!r} (id {img['id']!r}) is "
                                           "listed twice; the first entry kept", fix="remove the second entry"))
            continue
        declared = (_int(img.get("width")), _int(img.get("height")))
        size, problem = (None, problem) if found is None else image_size(found, declared, file)
        if size is None:
            result.problems.append(problem)
            by_image.pop(key, None)  # its boxes go with it: not "for an image not in 'images'"
            continue
        record = ImageRecord(relative(found, root), size[0], size[1], [], file, dropped=unusable[key])
        for ann in by_image.pop(key, []):
            where = f"annotation {ann.get('id', '?')} (image {record.image}): "
            result.problems += [replace(p, message=where + p.message) for p in _add_box(record, ann, categories, file)]
        records[key] = record
    for anns in by_image.values():
        result.problems.append(Problem(
            file=file,
            message=f"{len(anns)} annotation(s) for image_id {anns[0]['image_id']!r}, which is not in 'images'; "
            "dropped",
            fix="add the image entry or remove the annotations",
        ))
    result.records = sorted(records.values(), key=lambda r: r.image)
    return result


def _shared_ids(images: Sequence[dict]) -> dict[str, list[dict]]:
    """The image ids (as text: 0 is "0") two or more `images` entries of different files give,
    each with those entries (one file listed twice under its id is one image)."""
    by_id: dict[str, list[dict]] = {}
    for img in images:
        by_id.setdefault(str(img["id"]), []).append(img)
    return {image_id: entries for image_id, entries in by_id.items()
            if len({str(e["file_name"]) for e in entries}) > 1}


def _with_bbox(ann: Any) -> Any:
    """`ann`, given the bounds of its polygons as `bbox` when it has polygons and no bbox (an
    export of segmentation only; COCO derives the bbox so, and a run-length mask has none)."""
    if not isinstance(ann, dict) or "bbox" in ann or not isinstance(ann.get("segmentation"), list):
        return ann
    try:
        points = [float(v) for polygon in ann["segmentation"] for v in polygon]
    except (TypeError, ValueError):
        return ann
    if len(points) < 6 or len(points) % 2:
        return ann
    xs, ys = points[0::2], points[1::2]
    return {**ann, "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _add_box(record: ImageRecord, ann: dict, categories: dict[str, str | None], file: str) -> list[Problem]:
    """Add one annotation's box to `record` (or count it in `record.dropped`); return the
    problems it has."""
    name = categories.get(str(ann["category_id"]))
    if name is None:
        record.dropped += 1
        return [Problem(
            file=file, message=f"unknown or unusable category_id {ann['category_id']!r}; box dropped",
            fix="add the category to 'categories'",
        )]
    bbox = ann["bbox"]
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        record.dropped += 1
        return [Problem(
            file=file, message=f"annotation {ann.get('id', '?')}: bbox {bbox!r} is not [x, y, w, h]; dropped",
            fix="write bbox as four numbers",
        )]
    return add_box(record, name, (x, y, x + w, y + h), file)


def read_coco(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """Every `*.json` under `root` (not under the folders in `skip`) -> records, problems and
    class names (first file first)."""
    root = Path(root)
    result = ReadResult()
    for path in iter_files(root, ".json", skip):
        result.add(read_coco_file(path, root))
    return result


def write_coco(records: Sequence[ImageRecord], json_path: str | Path, classes: Sequence[str]) -> None:
    """Write `records` as one COCO file; `file_name`s are the records' paths, relative to the
    dataset root, so put `json_path` at the root. Category ids are 1-based in `classes` order
    (a label not among them is appended); a box's `score`, when it has one (pre-annotations),
    is kept on its annotation."""
    data: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    _append(data, records, classes)
    atomic_write(json_path, json.dumps(data, indent=1) + "\n", durable=False)


def _held(images: Sequence[dict], records: Sequence[ImageRecord]) -> set[str]:
    """The images of `records` that COCO `images` entries already hold: by `file_name`, else by
    the bare name where it is unique among the entries and among the records and one path ends
    with the other (a tool's export naming `a.png` for `images/a.png`), so that `day1/a.png`
    never stands for `day2/a.png`."""
    paths = {str(image["file_name"]).replace("\\", "/") for image in images}
    held = {r.image for r in records} & paths
    theirs = Counter(PurePosixPath(p).name for p in paths)
    ours = Counter(PurePosixPath(r.image).name for r in records)
    mine = {PurePosixPath(r.image).name: r.image for r in records}
    for path in paths - held:
        name = PurePosixPath(path).name
        if theirs[name] == ours[name] == 1 and (f"/{path}".endswith(f"/{mine[name]}")
                                                 or f"/{mine[name]}".endswith(f"/{path}")):
            held.add(mine[name])
    return held


def add_to_coco(records: Sequence[ImageRecord], json_path: str | Path, classes: Sequence[str]) -> int:
    """Add `records` to the COCO file at `json_path` (written as `write_coco` does when there is
    none). Images the file already holds (see `_held`) keep their entries and annotations,
    which a person may have corrected; new categories are appended. Returns how many of
    `records` were already there. Raises ValueError naming the file when it is not COCO."""
    json_path = Path(json_path)
    data = coco_to_add(json_path)
    if data is None:
        write_coco(records, json_path, classes)
        return 0
    try:
        held = _held(data["images"], records)
        added = [r for r in records if r.image not in held]
        _append(data, added, classes)
    except (ValueError, TypeError, KeyError) as err:
        raise cannot_add(json_path, err) from None
    if added:
        atomic_write(json_path, json.dumps(data, indent=1) + "\n", durable=False)
    return len(records) - len(added)


def coco_to_add(json_path: Path) -> dict | None:
    """The COCO dataset at `json_path` that pre-annotations are to be added to, None when
    there is no file. Raises ValueError naming the file when it is not COCO."""
    if not json_path.exists():
        return None
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and all(isinstance(data.get(k), list)
                                               for k in ("images", "annotations", "categories"))):
            raise ValueError("no images, annotations and categories lists")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise cannot_add(json_path, err) from None
    return data


def cannot_add(json_path: Path, err: Exception) -> ValueError:
    """The error for an annotation file pre-annotations cannot be added to (COCO here, Label
    Studio's task list in `predict.labels`): the file, why, and the ways out."""
    return ValueError(f"{json_path} is there but cannot be added to ({type(err).__name__}: {err}): fix it, "
                      "move it away, or write the pre-annotations to another folder")


def _append(data: dict[str, list], records: Sequence[ImageRecord], classes: Sequence[str]) -> None:
    """Append to COCO `data` the categories of `classes` and of the records' labels it lacks,
    then `records` as images and their boxes as annotations, each id after the largest there."""
    category = {c["name"]: c["id"] for c in data["categories"]}
    for name in dict.fromkeys([*classes, *(b.label for r in records for b in r.boxes)]):
        if name not in category:
            category[name] = max(category.values(), default=0) + 1
            data["categories"].append({"id": category[name], "name": name})
    image_id = max((image["id"] for image in data["images"]), default=0)
    ann_id = max((ann["id"] for ann in data["annotations"]), default=0)
    for record in records:
        image_id += 1
        data["images"].append({"id": image_id, "file_name": record.image, "width": record.width,
                               "height": record.height})
        for box in record.boxes:
            ann_id += 1
            data["annotations"].append({
                "id": ann_id, "image_id": image_id, "category_id": category[box.label],
                "bbox": [box.x1, box.y1, box.width, box.height], "area": box.width * box.height, "iscrowd": 0,
                **({} if box.score is None else {"score": box.score}),
            })
