"""CVAT for images 1.1 XML: one `annotations.xml` with an `<image>` per frame (name, width,
height, optional subset) holding `<box>` (xtl, ytl, xbr, ybr, rotation), `<polygon>` (points
"x,y;x,y;..."), `<ellipse>` (cx, cy, rx, ry) and `<mask>` (left, top, width, height) shapes in
pixels. Polygons, ellipses and masks become their bounding boxes; polylines, points and tags
mark no area and are ignored. The classes are the `<meta>` labels, in order.

Images are found beside the XML, in an `images/` folder beside it (CVAT's export layout) or at
the dataset root. Parsed as the VOC reader parses (`voc.parse_xml`: entity bombs refused).
A CVAT for video 1.1 file (`<track>` elements: shapes by frame number) is reported, not read.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from xml.parsers import expat

from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import (
    IMAGE_SUFFIXES,
    add_box,
    find_image,
    image_size,
    iter_files,
    relative,
    rotated_bounds,
)
from loomlens.data.splits import split_name
from loomlens.data.voc import parse_xml

AREA_SHAPES = ("box", "polygon", "ellipse", "mask")
#: Shapes that mark a defect without an area (a line, points, a skeleton, a cuboid): named and
#: counted as dropped, so the image never trains as defect-free. CVAT's own COCO and YOLO
#: exports leave them out silently.
OTHER_SHAPES = ("polyline", "points", "skeleton", "cuboid")


def _float(element: ET.Element, key: str) -> float:
    return float(element.get(key, "nan"))


def shape_corners(shape: ET.Element) -> tuple[float, float, float, float]:
    """The pixel bounds (x1, y1, x2, y2) of one CVAT area shape. Raises ValueError when its
    coordinates are missing or not numbers."""
    if shape.tag == "box":
        x1, y1, x2, y2 = (_float(shape, k) for k in ("xtl", "ytl", "xbr", "ybr"))
        return rotated_bounds(x1, y1, x2, y2, float(shape.get("rotation", 0) or 0), ((x1 + x2) / 2, (y1 + y2) / 2))
    if shape.tag == "polygon":
        points = [tuple(float(v) for v in p.split(",")) for p in shape.get("points", "").split(";") if p.strip()]
        if len(points) < 3 or any(len(p) != 2 for p in points):
            raise ValueError(f"points {shape.get('points', '')[:60]!r} is not three or more x,y pairs")
        return min(p[0] for p in points), min(p[1] for p in points), max(p[0] for p in points), max(p[1] for p in points)
    if shape.tag == "ellipse":
        cx, cy, rx, ry = (_float(shape, k) for k in ("cx", "cy", "rx", "ry"))
        return cx - rx, cy - ry, cx + rx, cy + ry
    left, top, width, height = (_float(shape, k) for k in ("left", "top", "width", "height"))
    return left, top, left + width, top + height


def read_cvat_file(path: Path, root: Path, skip: Sequence[Path] = ()) -> ReadResult:
    """One CVAT for images XML file -> records (each with the split its `subset` names),
    problems and the class names its `<meta>` declares; a CVAT for video file, problems only
    (see `_video_export`; its frames not under `skip`)."""
    file = relative(path, root)
    try:
        tree, lines = parse_xml(path.read_bytes())
    except OSError as err:
        return ReadResult(problems=[Problem(file=file, message=f"cannot read: {err}; file skipped",
                                            fix="check permissions")])
    except expat.ExpatError as err:
        return ReadResult(problems=[Problem(
            file=file, line=err.lineno, message=f"malformed XML ({expat.errors.messages[err.code]}); file skipped",
            fix="fix the XML, or export it from CVAT again",
        )])
    if tree.tag != "annotations":
        return ReadResult(problems=[Problem(file=file, line=1, message=f"root element is <{tree.tag}>, not "
                                            "<annotations>; file skipped", fix="export as 'CVAT for images 1.1'")])
    if tree.find("track") is not None:
        return _video_export(tree, lines, path, root, skip)
    result = ReadResult()
    for label in tree.iterfind("meta//labels/label"):
        try:
            name = validate_label(label.findtext("name") or "")
        except LabelError as err:
            result.problems.append(Problem(file=file, line=lines[label], message=str(err), fix="rename the label"))
            continue
        if name not in result.classes:
            result.classes.append(name)
    dirs = [path.parent, path.parent / "images", root / "images", root]
    for image in tree.iterfind("image"):
        record, problems = _image(image, lines, root, dirs, file)
        result.problems += problems
        if record is not None:
            result.records.append(record)
    return result


def _video_export(tree: ET.Element, lines: dict[ET.Element, int], path: Path, root: Path,
                  skip: Sequence[Path]) -> ReadResult:
    """A CVAT for video 1.1 file (`<track>`s of shapes by frame number, the frames' files not
    named) -> one problem for the file, and one for each image in the export's `images/` folder
    beside it: those are its frames, and `--unlabelled-clean` must not take their defects for
    clean frames."""
    file = relative(path, root)
    tracks = tree.findall("track")
    fix = "export the task from CVAT as 'CVAT for images 1.1'"
    problems = [Problem(file=file, line=lines[tracks[0]], fix=fix, message=f"<track> found ({len(tracks)} in all): "
                        "this is CVAT for video 1.1, whose tracks loomlens does not read; file skipped")]
    frames = iter_files(path.parent / "images", IMAGE_SUFFIXES, skip) if (path.parent / "images").is_dir() else []
    problems += [Problem(file=relative(frame, root), image=str(frame), fix=fix,
                         message=f"a frame of the CVAT for video export {file}, whose tracks are not read; skipped")
                 for frame in frames]
    return ReadResult(problems=problems)


def _image(
    image: ET.Element, lines: dict[ET.Element, int], root: Path, dirs: Sequence[Path], file: str,
) -> tuple[ImageRecord | None, list[Problem]]:
    """One `<image>` element -> (its record, or None when it must be skipped; problems)."""
    line = lines[image]
    name = image.get("name", "")
    if not name:
        return None, [Problem(file=file, line=line, message="<image> without a name; skipped",
                              fix="export the task again from CVAT")]
    found, problem = find_image(root, name, dirs, file, line)
    if found is None:
        return None, [problem]
    try:
        declared = (int(float(image.get("width", 0))), int(float(image.get("height", 0))))
    except ValueError:
        declared = (0, 0)
    size, problem = image_size(found, declared, file, line)
    if size is None:
        return None, [problem]
    record = ImageRecord(relative(found, root), size[0], size[1], [], file, split=split_name(image.get("subset", "")))
    problems: list[Problem] = []
    for shape in image:
        if shape.tag in OTHER_SHAPES:
            problems.append(Problem(file=file, line=lines[shape], message=f"<{shape.tag}> {shape.get('label', '')!r} "
                                    "has no area to box; dropped", fix="draw the defect as a box or polygon in CVAT"))
            record.dropped += 1
            continue
        if shape.tag not in AREA_SHAPES:
            continue
        try:
            coords = shape_corners(shape)
        except ValueError as err:
            problems.append(Problem(file=file, line=lines[shape], message=f"<{shape.tag}> with bad coordinates "
                                    f"({err}); box dropped", fix="redraw the shape in CVAT"))
            record.dropped += 1
            continue
        problems += add_box(record, shape.get("label", ""), coords, file, lines[shape])
    return record, problems


def read_cvat(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """Every CVAT for images XML under `root` (not under `skip`; other XML is left to the VOC
    reader) -> records, problems, class names (first file first) and "CVAT subsets" as where
    the split came from, where a subset gave one."""
    root = Path(root)
    result = ReadResult()
    for path in iter_files(root, ".xml", skip):
        if xml_root_tag(path) != "annotations":
            continue
        result.add(read_cvat_file(path, root, skip))
    result.split_from = ["CVAT subsets"] if any(r.split for r in result.records) else []
    return result


def xml_root_tag(path: Path) -> str | None:
    """The name of the root element of the XML file at `path`, read from its first 64 KiB
    without parsing the rest (a cheap sniff for format detection); None if none is found."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    parser = expat.ParserCreate()
    found: list[str] = []

    def start(tag: str, _attrs: dict[str, str]) -> None:
        found.append(tag)
        raise StopIteration

    parser.StartElementHandler = start
    try:
        parser.Parse(head, False)
    except StopIteration:
        return found[0]
    except expat.ExpatError:
        return found[0] if found else None
    return None
