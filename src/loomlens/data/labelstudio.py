"""Label Studio JSON: a list of tasks, each `{"data": {"image": URL}, "annotations": [{"result":
[...]}], "predictions": [...]}`; a result of type `rectanglelabels` (or `polygonlabels`) holds
its shape in percent of the image (`x`, `y`, `width`, `height`, `rotation` in degrees about the
top-left corner; `points` for polygons).

Reading takes each task's latest annotation that was not cancelled (predictions are not truth;
a task with neither is skipped, reported). The image URL's file is looked for beside the JSON,
in an `images/` folder, or at the dataset root: by its `?d=` path (local files), its path, or
its name with Label Studio's upload prefix (`8c2a1b3f-`) taken off.

Writing (`labelstudio_tasks`) makes the tasks JSON Label Studio imports as pre-annotations:
each box a `rectanglelabels` result with its own `score` under `predictions`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from loomlens.data.records import Box, ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import (
    IMAGE_SUFFIXES,
    add_box,
    find_image,
    image_size,
    iter_files,
    read_text,
    relative,
    rotated_bounds,
)

#: Result types read as boxes: a `labels` result with x, y, width, height comes from a `<Labels>`
#: control beside a `<Rectangle>` tool (label-studio-converter reads it so too).
SHAPES = ("rectanglelabels", "polygonlabels", "ellipselabels", "labels")
#: Result types that mark a defect without a box loomlens reads (a brush mask, a keypoint, a
#: shape with no label): named and counted as dropped, so the image never trains as defect-free.
UNREAD = ("brushlabels", "keypointlabels", "rectangle", "polygon", "ellipse", "keypoint", "brush")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
#: The control and object names pre-annotations are written for (the labelling config's).
FROM_NAME, TO_NAME = "label", "image"


def looks_like_labelstudio(path: Path) -> bool:
    """Whether the JSON file at `path` starts as a Label Studio export: a list of tasks with
    `data`, or of JSON-MIN records with `annotation_id` (read only to be named, see
    `_json_min`); a cheap sniff of its first MiB for format detection."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head.lstrip().startswith(b"[") and (b'"data"' in head or b'"annotation_id"' in head)


def _json_min(tasks: list[Any], file: str) -> Problem | None:
    """A problem for a Label Studio JSON-MIN export (`tasks` without `data`, each with
    `annotation_id`: one record per annotation, the task's data spread among its results), else
    None. It leaves out the tasks not yet annotated and keeps no `type` for a result, so it is
    named with the export to choose rather than read as a project without images."""
    if not tasks or not all(isinstance(t, dict) and "data" not in t and "annotation_id" in t for t in tasks):
        return None
    return Problem(file=file, message=f"a Label Studio JSON-MIN export ({len(tasks)} record(s)), whose tasks have "
                   "no 'data'; file skipped", fix="export the project from Label Studio as JSON, not JSON-MIN")


def image_candidates(url: str) -> list[str]:
    """Paths relative to a dataset the image URL of a task may name, most specific first:
    the `?d=` path of local files, the URL's path (without a leading `/data/upload/N/`), its
    file name, and that name less Label Studio's upload prefix."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d", [])
    path = unquote(parsed.path)
    name = PurePosixPath(path).name
    names = [*local, *(p for p in (PurePosixPath(l).name for l in local)), path.lstrip("/"), name,
             _UPLOAD_PREFIX.sub("", name)]
    return [n for n in dict.fromkeys(names) if n and PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES]


def _task_image(task: dict[str, Any]) -> str | None:
    """The image URL of a task: `data.image`, else the one `data` value that names an image."""
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("image"), str) and data["image"]:
        return data["image"]
    urls = [v for v in data.values() if isinstance(v, str) and image_candidates(v)]
    return urls[0] if len(urls) == 1 else None


def _result_corners(result: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel bounds of one rectangle, polygon or ellipse result (percent -> pixels). Raises ValueError,
    TypeError or KeyError for a malformed one."""
    value = result["value"]
    if result["type"] == "polygonlabels":
        points = [(float(x) * width / 100, float(y) * height / 100) for x, y in value["points"]]
        if len(points) < 3:
            raise ValueError("a polygon needs three points")
        return min(p[0] for p in points), min(p[1] for p in points), max(p[0] for p in points), max(p[1] for p in points)
    x, y = float(value["x"]) * width / 100, float(value["y"]) * height / 100
    if result["type"] == "ellipselabels":  # x, y: the centre; the bounds of its box turned as it is
        rx, ry = float(value["radiusX"]) * width / 100, float(value["radiusY"]) * height / 100
        return rotated_bounds(x - rx, y - ry, x + rx, y + ry, float(value.get("rotation", 0) or 0), (x, y))
    w, h = float(value["width"]) * width / 100, float(value["height"]) * height / 100
    return rotated_bounds(x, y, x + w, y + h, float(value.get("rotation", 0) or 0), (x, y))


def _annotation(task: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The results of the task's latest annotation not cancelled; None when it has none."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    results = done[-1].get("result") or []
    return [r for r in results if isinstance(r, dict)]


def read_labelstudio_file(path: Path, root: Path) -> ReadResult:
    """One Label Studio JSON export -> records, problems and class names (in the order seen)."""
    file = relative(path, root)
    try:
        tasks = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        return ReadResult(problems=[Problem(file=file, line=err.lineno, message=f"malformed JSON ({err.msg}); "
                                            "file skipped", fix="export the project from Label Studio again")])
    except (OSError, UnicodeDecodeError) as err:
        return ReadResult(problems=[Problem(file=file, message=f"cannot read: {err}; file skipped",
                                            fix="check the file")])
    if not isinstance(tasks, list):
        return ReadResult(problems=[Problem(file=file, message="not a Label Studio export (no list of tasks); "
                                            "file skipped", fix="export as JSON from Label Studio")])
    minimal = _json_min(tasks, file)
    if minimal is not None:
        return ReadResult(problems=[minimal])
    result = ReadResult()
    dirs = [path.parent, path.parent / "images", root / "images", root]
    for i, task in enumerate(tasks):
        record, problems = _task(task if isinstance(task, dict) else {}, i, root, dirs, file)
        result.problems += problems
        if record is not None:
            result.records.append(record)
            result.classes += [b.label for b in record.boxes if b.label not in result.classes]
    return result


def _task(
    task: dict[str, Any], index: int, root: Path, dirs: Sequence[Path], file: str
) -> tuple[ImageRecord | None, list[Problem]]:
    """One task -> (its record, or None when it must be skipped; problems)."""
    where = f"task {task.get('id', index)!r} (#{index})"
    url = _task_image(task)
    if url is None:
        return None, [Problem(file=file, message=f"{where} has no image (data.image); skipped",
                              fix="give every task data.image, or export the project again")]
    results = _annotation(task)
    if results is None:
        return None, [Problem(file=file, message=f"{where} ({url}) has no annotation (only cancelled ones, or "
                              "predictions); skipped", fix="annotate or skip the task in Label Studio")]
    found, problem = None, None
    for name in image_candidates(url) or [url]:
        found, problem = find_image(root, name, dirs, file)
        if found is not None:
            break
    if found is None:
        return None, [Problem(file=file, message=f"{where}: image {url!r} not found; skipped",
                              fix="put the image files beside the export or in images/")]
    size, problem = image_size(found, None, file)
    # Label Studio records the size it showed the picture at (percentages survive a rescale, a
    # quarter turn not): a browser turns a picture upright by its EXIF orientation.
    shown = next(((r.get("original_width"), r.get("original_height")) for r in results
                  if isinstance(r.get("original_width"), int) and isinstance(r.get("original_height"), int)), None)
    if size is not None and size[0] != size[1] and shown == size[::-1]:
        size, problem = image_size(found, shown, file)
    if size is None:
        return None, [replace(problem, message=f"{where}: {problem.message}")]
    record = ImageRecord(relative(found, root), size[0], size[1], [], file)
    problems: list[Problem] = []
    for n, res in enumerate(results):
        if res.get("type") in UNREAD:
            problems.append(Problem(
                file=file, message=f"{where} result {n}: a {res['type']} result is no labelled box; dropped",
                fix="draw the defect with RectangleLabels, PolygonLabels or EllipseLabels"))
            record.dropped += 1
            continue
        if res.get("type") not in SHAPES:
            continue  # choices, text, ...: no boxes
        labels = res.get("value", {}).get(res["type"]) if isinstance(res.get("value"), dict) else None
        if isinstance(labels, str):
            labels = [labels]  # one label written bare, as some scripts do: not its first letter
        if isinstance(labels, list) and len(labels) != 1:
            problems.append(Problem(
                file=file, message=f"{where} result {n}: a box with {len(labels)} labels {labels}; box dropped",
                fix="give the box exactly one label in Label Studio"))
            record.dropped += 1
            continue
        try:
            label = labels[0]
            corners = _result_corners(res, *size)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            problems.append(Problem(file=file, message=f"{where} result {n}: malformed {res.get('type')} "
                                    f"({type(err).__name__}: {err}); box dropped", fix="redraw the box"))
            record.dropped += 1
            continue
        problems += [replace(p, message=f"{where}: {p.message}") for p in add_box(record, str(label), corners, file)]
    return record, problems


def read_labelstudio(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """Every Label Studio JSON export under `root` (not under `skip`) -> records, problems and
    class names (first file first)."""
    root = Path(root)
    result = ReadResult()
    for path in iter_files(root, ".json", skip):
        if not looks_like_labelstudio(path):
            continue
        result.add(read_labelstudio_file(path, root))
    return result


def _result(box: Box, width: int, height: int, index: int) -> dict[str, Any]:
    return {
        "id": f"r{index}", "type": "rectanglelabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": box.x1 / width * 100, "y": box.y1 / height * 100, "width": box.width / width * 100,
                  "height": box.height / height * 100, "rotation": 0, "rectanglelabels": [box.label]},
        "score": 1.0 if box.score is None else box.score,
    }


def labelstudio_tasks(records: Sequence[ImageRecord], urls: Sequence[str], model_version: str,
                      answer_probabilities: Sequence[float | None] | None = None) -> list[dict]:
    """Label Studio tasks for `records` (boxes in pixels, with scores) whose images Label
    Studio reaches at `urls` (one per record): each box a `rectanglelabels` result with its
    `score` in the task's one prediction, scored by its lowest box (the one to check first).
    A picture without a box scores how sure the model was that there is nothing to box,
    1 - its `answer_probabilities` entry (1 where not given): sorted by score, a frame the model
    thought likely defective but left empty comes up for checking early. The labelling config
    must name its RectangleLabels `label` and its Image `image`."""
    tasks = []
    probabilities = answer_probabilities or [None] * len(records)
    for record, url, p in zip(records, urls, probabilities, strict=True):
        results = [_result(b, record.width, record.height, i) for i, b in enumerate(record.boxes)]
        score = min((r["score"] for r in results), default=1.0 if p is None else 1.0 - p)
        tasks.append({"data": {"image": url}, "predictions": [
            {"model_version": model_version, "score": score, "result": results}]})
    return tasks
