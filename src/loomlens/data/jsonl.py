"""Reading a converted split (`train.jsonl`, ...) without trusting it.

A split may come from anywhere: hand edits, another tool, a download. `validate_split` checks
all of it before the first training step, so a bad line fails at once with its file and line,
not as a bare `KeyError` an hour into a run, and an image path cannot lead training to read
files outside the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loomlens.data.florence_text import parse_text
from loomlens.data.records import Problem
from loomlens.data.sanitize import BadImage, open_image

#: Keys every sample needs, with the type of each value.
REQUIRED = {"prefix": str, "suffix": str, "image": str}
#: Optional keys, checked when present.
OPTIONAL = {"task": str, "width": int, "height": int, "source": str}
SUMMARY = "summary.json"


class SplitError(ValueError):
    """A split that cannot be trained on: the message lists the first problems, one a line,
    as `file:line: what (fix)`; `problems` holds them all."""

    def __init__(self, path: Path, problems: list[Problem], limit: int) -> None:
        shown = "\n".join(f"  {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} problem(s) in {path}; fix them, or convert the data again:\n{shown}{more}")
        self.problems = problems


def read_lines(path: str | Path) -> list[tuple[int, Any]]:
    """The (line number, parsed JSON) of each non-empty line of the file at `path`. Raises
    `SplitError` naming each line that is not JSON."""
    path = Path(path)
    rows, problems = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(Problem(file=str(path), line=number, message=f"not JSON ({err.msg})",
                                        fix="write one JSON object a line"))
    if problems:
        raise SplitError(path, problems, 20)
    return rows


def allowed_roots(folder: Path) -> list[Path]:
    """The folders a split in `folder` may take images from: `folder` itself and, when
    `convert` wrote it, the source folder its `summary.json` records (`source_root`, relative
    to `folder`), since converted samples point at the original images there. Resolved."""
    roots = [folder.resolve()]
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return roots
    source = summary.get("source_root") if isinstance(summary, dict) else None
    if isinstance(source, str) and source:
        roots.append((folder / source).resolve())
    return roots


def _fields(sample: Any) -> tuple[str, str] | None:
    """What is wrong with the keys and types of one parsed line, and the fix; None if nothing."""
    if not isinstance(sample, dict):
        return f"a JSON {type(sample).__name__}, not an object", "write one object a line"
    missing = [key for key in REQUIRED if key not in sample]
    if missing:
        return f"no {', '.join(map(repr, missing))}", f"give every sample {', '.join(REQUIRED)}"
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        value = sample.get(key)
        if key in sample and not (isinstance(value, kind) and not isinstance(value, bool)):
            return f"{key!r} is {value!r}, not a {kind.__name__}", f"make {key!r} a {kind.__name__}"
    return None


def _image(name: str, folder: Path, roots: list[Path]) -> tuple[str, str] | tuple[int, int]:
    """What is wrong with the image path `name` of a sample in the resolved `folder`, and the
    fix; else, when it stays inside `roots` and opens as an image (its header only), its (width,
    height). A missing image outside `folder` (the source's, which a sample reaches by a path
    relative to the folder) is also told how to make a folder that holds its images: moving
    either folder breaks those paths."""
    image = (folder / name).resolve()
    if not any(image.is_relative_to(root) for root in roots):
        return (f"image {name!r} leads outside the data folder (and the source it was converted from); refused",
                "convert the data again (its summary.json then admits the source folder), or keep the images "
                "inside the data folder")
    try:
        with open_image(image) as im:
            return im.size
    except BadImage as err:
        if isinstance(err.__cause__, FileNotFoundError):
            moved = "" if image.is_relative_to(folder) else (
                "; a data folder reaches its source's images by where the two lie, so moving either breaks it: "
                "`loomlens convert --copy-images` makes one that holds its images and can be moved")
            return f"image {name!r} not found", f"restore the image, or convert the data again{moved}"
        return f"image {name!r}: {err}", "replace the damaged image, or convert the data again"


def _size(sample: dict, size: tuple[int, int]) -> tuple[str, str] | None:
    """What is wrong with a sample's `width` and `height` against its image's `size`, and the
    fix: training moves its boxes as pixels of that size, so an image resized since conversion
    would put every box elsewhere. None also without them (the seed's samples have none)."""
    if "width" not in sample or "height" not in sample:
        return None
    if (sample["width"], sample["height"]) != tuple(size):
        return (f"image {sample['image']!r} is {size[0]}x{size[1]}, but the sample says "
                f"{sample['width']}x{sample['height']} (resized since it was converted?)",
                "convert the data again from the images as they are now")
    return None


def _boxes(sample: dict, size: tuple[int, int]) -> tuple[str, str] | None:
    """What is wrong with an `<OD>` sample's true boxes on an image of `size`, and the fix: a
    part that is no box (`parse_text` drops it) would leave its frame scored, and trained, as
    holding fewer defects, or none. None for a sound sample and for other tasks."""
    if sample["prefix"] != "<OD>":
        return None
    dropped = parse_text(sample["suffix"], *size)[1]
    if not dropped:
        return None
    return (f"the true boxes {sample['suffix'][:120]!r} hold {dropped} part{'s' if dropped > 1 else ''} that "
            f"{'are' if dropped > 1 else 'is'} no box",
            "write each box as its label and four <loc_N> (0..999, x1 <= x2, y1 <= y2), or convert again")


def validate_split(path: str | Path, root: str | Path | None = None, limit: int = 20) -> list[dict]:
    """The samples of the split at `path`, each checked: valid JSON objects with the
    `REQUIRED` keys (and `OPTIONAL` ones) of the right types, whose image resolves inside
    the split's folder, the source `convert` recorded (see `allowed_roots`) or `root`, exists
    and opens as an image (its header; each image once) of the sample's size (`_size`), and
    whose `<OD>` boxes all parse (`_boxes`). Raises
    `SplitError` listing the first `limit` problems, every one as `file:line: what (fix)`."""
    path = Path(path)
    folder = path.parent.resolve()
    roots = allowed_roots(folder) + ([Path(root).resolve()] if root is not None else [])
    images: dict[str, tuple[str, str] | tuple[int, int]] = {}
    samples, problems = [], []
    for number, sample in read_lines(path):
        wrong = _fields(sample)
        if wrong is None:
            name = sample["image"]
            if name not in images:
                images[name] = _image(name, folder, roots)
            found = images[name]
            wrong = (_size(sample, found) or _boxes(sample, found)) if isinstance(found[0], int) else found
        if wrong is None:
            samples.append(sample)
        else:
            problems.append(Problem(file=str(path), line=number, message=wrong[0], fix=wrong[1]))
    if problems:
        raise SplitError(path, problems, limit)
    return samples
