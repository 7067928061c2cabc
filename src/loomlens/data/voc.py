"""LabelImg's Pascal VOC XML: one `<annotation>` file per image, pixel `<bndbox>` corners.

The image is found from `<filename>`, beside the XML, in a sibling `images/` (or `<folder>`)
folder, or at the dataset root, else by the XML's own name as LabelImg pairs them; `<path>` is ignored, since LabelImg writes the annotator's
own absolute path there.

A dataset's own split is in its `ImageSets/Main` lists (the VOCdevkit layout, CVAT's Pascal VOC
export), one image id (the annotation's file stem) a line: `train.txt`, `val.txt`, `test.txt`,
and `trainval.txt` as the train pool where `train.txt` or `val.txt` is missing; per-class lists
(`crack_train.txt`, ids with ` 1` / `-1`) are not splits."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from xml.parsers import expat

from loomlens.data.atomic import atomic_write
from loomlens.data.records import ImageRecord, Problem, ReadResult
from loomlens.data.sanitize import add_box, find_image, image_size, iter_files, read_text, relative
from loomlens.data.splits import split_name

#: The folder, below a VOC dataset's own, of the image-id lists that split it.
IMAGE_SETS = ("ImageSets", "Main")
#: The order lists are read in: an id that two splits list keeps the first, as a data.yaml's image does.
LIST_ORDER = ("train", "val", "test", "trainval")


def parse_xml(data: bytes) -> tuple[ET.Element, dict[ET.Element, int]]:
    """Parse XML keeping the line each element starts on (ElementTree forgets it), so a
    problem with one `<object>` can name its line. Expat (2.4 and later) refuses entity
    expansion bombs itself ("limit on input amplification factor") and, with no external
    entity handler set, never fetches an external entity. Raises `expat.ExpatError`."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    lines: dict[ET.Element, int] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.Parse(data, True)
    return builder.close(), lines


def _number(element: ET.Element, path: str) -> float | None:
    """The finite number in the child at `path`, or None when it is missing or not one."""
    try:
        value = float((element.findtext(path) or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_voc_file(path: Path, root: Path) -> tuple[ImageRecord | None, list[Problem]]:
    """One VOC XML file -> (its record, or None when the file must be skipped; problems)."""
    file = relative(path, root)
    try:
        ann, lines = parse_xml(path.read_bytes())
    except OSError as err:
        return None, [Problem(file=file, message=f"cannot read: {err}; file skipped", fix="check permissions")]
    except expat.ExpatError as err:
        return None, [Problem(
            file=file, line=err.lineno, message=f"malformed XML ({expat.errors.messages[err.code]}); file skipped",
            fix="fix the XML, or open and save the image again in LabelImg",
        )]
    if ann.tag != "annotation":
        return None, [Problem(
            file=file, line=1, message=f"root element is <{ann.tag}>, not <annotation>; file skipped",
            fix="only Pascal VOC XML belongs in a VOC dataset",
        )]
    name = (ann.findtext("filename") or "").strip()
    if not name:
        return None, [Problem(
            file=file, line=lines[ann], message="no <filename>; file skipped", fix="add the image file name",
        )]
    folder = (ann.findtext("folder") or "").strip()
    dirs = [path.parent, path.parent.parent / "images", path.parent.parent / "JPEGImages", root / "images", root]
    if folder:
        dirs += [path.parent.parent / folder, root / folder]
    image, problem = find_image(root, name, dirs, file, lines[ann])
    problems: list[Problem] = []
    if Path(name.replace("\\", "/")).stem != path.stem:  # LabelImg pairs an XML and its image by name
        own = find_image(root, path.stem, dirs, file, lines[ann])[0]
        if own is not None and image is not None and own != image:  # an XML copied as a template
            problems.append(Problem(
                file=file, line=lines[ann], message=f"<filename> names {name}, but the file is named after "
                f"{own.name}; paired with {own.name}, as LabelImg shows it", fix=f"set <filename> to {own.name}",
            ))
        image = own or image
    if image is None:
        return None, [problem]
    declared = (int(_number(ann, "size/width") or 0), int(_number(ann, "size/height") or 0))
    size, problem = image_size(image, declared, file, lines[ann])
    if size is None:
        return None, [*problems, problem]
    width, height = size
    record = ImageRecord(relative(image, root), width, height, [], file)
    for obj in ann.findall("object"):
        coords = [_number(obj, f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if None in coords:
            problems.append(Problem(
                file=file, line=lines[obj], message="<object> without a numeric <bndbox>; box dropped",
                fix="give it xmin, ymin, xmax, ymax",
            ))
            record.dropped += 1
            continue
        problems += add_box(record, obj.findtext("name") or "", coords, file, lines[obj])
    return record, problems


def _image_sets(root: Path, skip: Sequence[Path]) -> list[Path]:
    """The `ImageSets/Main` folders holding a txt file under `root` (not under `skip`), deepest
    first, so a dataset inside another (VOCdevkit/VOC2007) is split by its own lists."""
    mains = {p.parent for p in iter_files(root, ".txt", skip) if (p.parent.parent.name, p.parent.name) == IMAGE_SETS}
    return sorted(mains, key=lambda main: (-len(main.parts), main))


def _split_lists(main: Path) -> list[tuple[str, Path]]:
    """The split lists in the `ImageSets/Main` folder `main` -> (train | val | test | trainval,
    file) in `LIST_ORDER`; `trainval.txt` only where `train.txt` or `val.txt` is missing (else it
    is their union). Per-class lists (`crack_train.txt`) and other subsets (CVAT's `default.txt`)
    are not splits: left out."""
    files = sorted(p for p in main.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
    lists = [(split, p) for p in files if (split := split_name(p.stem))]
    if not {"train", "val"} <= {split for split, _ in lists}:
        lists += [("trainval", p) for p in files if p.stem.lower() == "trainval"]
    return sorted(lists, key=lambda listed: LIST_ORDER.index(listed[0]))


def _listed_splits(lists: Sequence[tuple[str, Path]], xmls: Sequence[Path], root: Path
                   ) -> tuple[dict[Path, str], list[Problem]]:
    """The annotations of `xmls` that `lists` (`_split_lists`) name by id (file stem) -> their
    split (trainval's: train), and a problem for each line whose id names none of them, or that
    a list of another split names first (trainval naming ids of train.txt or val.txt is meant)."""
    by_id: dict[str, list[Path]] = {}
    for xml in xmls:
        by_id.setdefault(xml.stem, []).append(xml)
    first: dict[str, tuple[str, str]] = {}  # id -> (its split, the file:line that gave it)
    problems = []
    for key, path in lists:
        file, split = relative(path, root), "train" if key == "trainval" else key
        try:
            text = read_text(path)
        except OSError as err:
            problems.append(Problem(file=file, message=f"cannot read: {err}; list skipped", fix="check permissions"))
            continue
        for line, image_id in ((n, raw.strip()) for n, raw in enumerate(text.splitlines(), 1)):
            if not image_id:
                continue
            if image_id not in by_id:
                problems.append(Problem(file=file, line=line, message=f"id {image_id!r} names no annotation; line "
                                        "ignored", fix=f"write an annotation file's name less .xml ({image_id}.xml "
                                        "is not in the dataset), or delete the line"))
                continue
            was, where = first.setdefault(image_id, (split, f"{file}:{line}"))
            if was != split and not (key == "trainval" and was == "val"):
                problems.append(Problem(file=file, line=line, message=f"id {image_id!r} is in {where} too: in two "
                                        f"splits; kept in {was}", fix="delete it from one of the two lists"))
    given = {xml: first[image_id][0] for image_id, found in by_id.items() if image_id in first for xml in found}
    return given, problems


def _voc_splits(root: Path, xmls: Sequence[Path], skip: Sequence[Path]
                ) -> tuple[dict[Path, str], list[Problem], list[str]]:
    """The split each annotation of `xmls` gets from the lists of its dataset (the folder above
    the deepest `ImageSets/Main` over it) -> (annotation -> split, the lists' problems, the
    `ImageSets/Main` folders that gave one, relative to `root`). An annotation no list names
    gets none: it is split at random, as an image outside any split folder is."""
    splits: dict[Path, str] = {}
    problems: list[Problem] = []
    used = []
    left = list(xmls)
    for main in _image_sets(root, skip):
        dataset = main.parent.parent
        mine, left = [x for x in left if x.is_relative_to(dataset)], [x for x in left if not x.is_relative_to(dataset)]
        given, found = _listed_splits(_split_lists(main), mine, root)
        splits.update(given)
        problems += found
        used += [relative(main, root)] if given else []
    return splits, problems, sorted(used)


def read_voc(root: str | Path, skip: Sequence[Path] = ()) -> ReadResult:
    """Every `*.xml` under `root` (not under the folders in `skip`) -> records (sorted by
    file, each with the split its `ImageSets/Main` lists give it), problems, the class names
    seen in sorted order (VOC declares no class list) and the lists' folders that split it."""
    root = Path(root)
    result = ReadResult()
    xmls = list(iter_files(root, ".xml", skip))
    splits, result.problems, result.split_from = _voc_splits(root, xmls, skip)
    for path in xmls:
        record, problems = read_voc_file(path, root)
        result.problems += problems
        if record is not None:
            record.split = splits.get(path)
            result.records.append(record)
    result.classes = sorted({b.label for r in result.records for b in r.boxes})
    return result


def _num(v: float) -> str:
    # LabelImg writes integers; keep fractions when there are any, so a round trip is exact.
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_voc(record: ImageRecord, xml_path: str | Path, root: str | Path, *, depth: int = 3) -> None:
    """Write `record` as a LabelImg VOC file at `xml_path`; `root` is the dataset root that
    `record.image` is relative to (LabelImg's `<folder>`, `<filename>`, `<path>` layout);
    `depth` its channels, 1 for a grey picture as LabelImg writes it, else 3."""
    xml_path, image = Path(xml_path), Path(root) / record.image
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = image.parent.name
    ET.SubElement(ann, "filename").text = image.name
    ET.SubElement(ann, "path").text = Path(os.path.relpath(image, xml_path.parent)).as_posix()
    ET.SubElement(ET.SubElement(ann, "source"), "database").text = "Unknown"
    size = ET.SubElement(ann, "size")
    for key, value in (("width", record.width), ("height", record.height), ("depth", depth)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for box in record.boxes:
        obj = ET.SubElement(ann, "object")
        for key, value in (("name", box.label), ("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
            ET.SubElement(obj, key).text = value
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", box.x1), ("ymin", box.y1), ("xmax", box.x2), ("ymax", box.y2)):
            ET.SubElement(bndbox, key).text = _num(value)
    ET.indent(ann, space="\t")
    atomic_write(xml_path, ET.tostring(ann, encoding="unicode") + "\n", durable=False)
