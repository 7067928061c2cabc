"""Pre-annotations: predictions written as the files a labelling tool opens, so a person
corrects boxes instead of drawing them (`loomlens predict --save-labels FORMAT --labels-out DIR`).

DIR becomes a dataset `loomlens convert DIR` reads back:
- `images/`: every predicted picture not already inside DIR (a hard link to the file, or a
  copy where the file system cannot link; a video frame saved as `<video>_f<frame>.jpg`, the
  name `convert` groups by video);
- voc: `annotations/<name>.xml`, Pascal VOC as LabelImg writes it (Open Dir `images/`, Change
  Save Dir `annotations/`);
- yolo: `labels/<name>.txt` with `labels/classes.txt` (LabelImg's YOLO mode; a subfolder of
  `images/` is mirrored in `labels/`); ids a `classes.txt` already names (a blank line too) stay;
- labelstudio: `tasks.json`, one task per picture, each box a `rectanglelabels` prediction with
  its `score` (a picture without a box scores 1 - the model's probability that it holds a
  defect, so sorting by score brings the likely misses up early); images as `/data/local-files/?d=images/...` (percent-encoded): serve DIR as Label Studio's local
  files document root;
- coco: `annotations.json`, a COCO dataset whose boxes carry their `score`; a later run adds its
  pictures to it.

Boxes are in the pixels of each picture as stored; a web tool (labelstudio, coco into CVAT)
shows a photo turned as its EXIF orientation says, so `add` names each such picture.

A picture already inside DIR stays where it is; one outside `images/` (for VOC, in a subfolder
of it too: `day1/a.png`, `day2/a.png`) gets its annotation beside it (`day1/a.xml`; YOLO with a
`classes.txt` there where none is in its folder or above), where LabelImg looks without a Save
Dir and `convert` pairs it with that picture only. Two pictures of one name in one folder
(`a.png`, `a.jpg`) would share one annotation file: the second is named in the run's summary.

A per-image annotation file already in DIR (one a person may have corrected) is never
overwritten: it is kept and counted; delete it to have it predicted again (so is a picture's
entry in an `annotations.json` or task in a `tasks.json` already there; a later run adds its
own). A picture of a later run whose name an earlier run's picture holds (every day's
`frame_0001.jpg`) gets a name of its own, so no annotation is ever kept beside another picture.
"""

from __future__ import annotations

import filecmp
import io
import itertools
import json
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from PIL import Image

from loomlens.data.atomic import atomic_copy, atomic_write
from loomlens.data.coco import add_to_coco, cannot_add, coco_to_add
from loomlens.data.labelstudio import labelstudio_tasks
from loomlens.data.records import ImageRecord
from loomlens.data.sanitize import orientation_problem, read_text
from loomlens.data.voc import write_voc
from loomlens.data.yolo import CLASSES_FILE, read_classes, write_yolo
from loomlens.predict.predictor import Prediction
from loomlens.predict.sources import Item, Problem

LABEL_FORMATS = ("voc", "yolo", "labelstudio", "coco")
#: Per-image annotation files: format -> (folder in DIR, suffix).
PER_IMAGE = {"voc": ("annotations", ".xml"), "yolo": ("labels", ".txt")}
LOCAL_FILES = "/data/local-files/?d="
#: The formats of web labelling tools, which show a picture turned as its EXIF orientation says.
WEB_FORMATS = ("labelstudio", "coco")


def _channels(item: Item) -> int:
    """1 for a still picture stored grey (8- or 16-bit, whatever `Item.image` was converted
    to), else 3: what LabelImg writes as a VOC file's depth. A video frame is saved in colour."""
    if item.frame is None:
        with Image.open(item.source) as stored:
            return 1 if len(stored.getbands()) == 1 else 3
    return 3


def _turned(item: Item) -> Problem | None:
    """A problem for a still picture whose EXIF orientation turns or mirrors it
    (`orientation_problem`): it is predicted as stored, so its boxes fit the stored picture,
    and a web labelling tool (Label Studio, CVAT) that shows it turned puts them in the wrong
    place. None for any other picture."""
    if item.frame is not None:
        return None
    with Image.open(item.source) as stored:
        found = orientation_problem(stored, str(item.source), str(item.source))
    if found is None:
        return None
    return Problem(str(item.source), f"{found.message}; its pre-annotated boxes fit it as stored: save it "
                   "upright (e.g. `mogrify -auto-orient`, or PIL's ImageOps.exif_transpose) and predict again")


def _held_tasks(path: Path) -> list:
    """The Label Studio tasks already at `path` ([] when there is no file). Raises ValueError
    naming the file when it is not a list of tasks."""
    if not path.exists():
        return []
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(held, list):
            raise ValueError("not a list of tasks")
    except (OSError, ValueError) as err:
        raise cannot_add(path, err) from None
    return held


def _add_tasks(path: Path, tasks: list[dict]) -> int:
    """Add Label Studio `tasks` to the task list at `path` (`_held_tasks`; written when there
    is none) in one atomic write: the tasks already there stay as they are (a person may have
    edited them), and a task for a picture one of them holds is not added. Returns how many
    were not; the file is left untouched when none is new."""
    held = _held_tasks(path)
    images = {t["data"].get("image") for t in held if isinstance(t, dict) and isinstance(t.get("data"), dict)}
    added = [task for task in tasks if task["data"]["image"] not in images]
    if added or not path.exists():
        atomic_write(path, json.dumps([*held, *added], indent=1) + "\n")
    return len(tasks) - len(added)


class LabelsOut:
    """Writes the pre-annotations of one prediction run into a folder, picture by picture
    (`add`), then the whole-run files (`finish`). Holds no pixels: a long video streams."""

    def __init__(self, out: str | Path, fmt: str, classes: list[str], model_version: str, *,
                 link: bool = True) -> None:
        """`out`: the folder; `fmt`: one of `LABEL_FORMATS`; `classes`: the run's class names
        (YOLO ids and COCO categories follow them, new labels appended); `model_version`: what
        Label Studio shows as the predictions' model; `link`: put pictures into `images/` as
        hard links where the file system allows (False: always copies, a folder that can be
        handed to someone else whatever happens to the originals). Raises ValueError for
        another format."""
        if fmt not in LABEL_FORMATS:
            raise ValueError(f"--save-labels must be one of {', '.join(LABEL_FORMATS)}, got {fmt!r}")
        self.out, self.fmt, self.model_version, self.link = Path(out), fmt, model_version, link
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"the pre-annotations folder {out} (--labels-out) cannot be made ({err.strerror or err})"
                             ": give a folder path whose parents are folders you can write to") from None
        if fmt == "labelstudio":
            _held_tasks(self.out / "tasks.json")  # a file it cannot add to: said before any picture is predicted
        elif fmt == "coco":
            coco_to_add(self.out / "annotations.json")
        self.classes = list(dict.fromkeys(classes))
        # YOLO: each classes.txt in use, as its lines and the names by id `convert` reads there.
        self.class_files: dict[Path, tuple[list[str], list[str]]] = {}
        self.claimed: dict[Path, str] = {}  # this run's annotation files, each its picture's
        self.clashed: list[str] = []  # pictures whose annotation file another picture claimed
        self.records: list[ImageRecord] = []
        self.probabilities: list[float | None] = []  # each picture's answer probability, for Label Studio
        self.placed: set[str] = set()  # the stems of this run's pictures in images/
        # The pictures images/ holds, by stem: read once, not once a picture (a folder of 10 000).
        self.held: dict[str, list[Path]] = {}
        for path in sorted((self.out / "images").glob("*")) if (self.out / "images").is_dir() else ():
            self.held.setdefault(path.stem, []).append(path)
        self.written = 0
        self.kept = 0

    def _place(self, item: Item, name: str) -> str:
        """The picture's path relative to the folder: where it is when inside it, else put
        under `images/` as `name` (+ the source's suffix; `.jpg` for a video frame). A name an
        earlier run gave another picture (yesterday's `frame_0001.jpg`) stays with that picture
        and its annotation: this one takes `<folder>_<name>`, then `<name>_2`, ...; the same
        picture again (a re-run) gets its old name back."""
        source = item.source.resolve()
        if item.frame is None and source.is_relative_to(self.out.resolve()):
            return source.relative_to(self.out.resolve()).as_posix()
        suffix = ".jpg" if item.frame is not None else item.source.suffix
        frame = None
        if item.frame is not None:  # a video frame: its JPEG bytes, to be saved or compared
            buffer = io.BytesIO()
            item.image.convert("RGB").save(buffer, format="JPEG", quality=95)
            frame = buffer.getvalue()
        numbered = (f"{name}_{i}" for i in itertools.count(2))
        for stem in itertools.chain((name, f"{item.source.parent.name}_{name}"), numbered):
            if stem in self.placed:
                continue
            image = f"images/{stem}{suffix}"
            target = self.out / image
            # A stem is one picture's: its annotation file is named after the stem alone.
            held = self.held.get(stem, [])
            if not held:
                if frame is not None:
                    atomic_write(target, frame, durable=False)
                else:
                    atomic_copy(source, target, link=self.link)
                self.held[stem] = [target]
                break
            if target not in held:
                continue
            if frame is not None and target.read_bytes() == frame:
                break
            if frame is None and (target.samefile(source) or filecmp.cmp(source, target, shallow=False)):
                break
        self.placed.add(stem)
        return image

    def _annotation(self, image: str) -> Path:
        """Where the VOC or YOLO annotation of the picture at `image` (relative to the folder)
        goes, so that `convert` pairs it with that picture only: `annotations/<stem>.xml` or
        `labels/<stem>.txt` for one in `images/` (YOLO mirrors its subfolders in `labels/`), else
        beside the picture, where LabelImg looks without a Save Dir."""
        folder, suffix = PER_IMAGE[self.fmt]
        path = Path(image)
        inner = path.parent.parts[1:]
        if path.parts[0] == "images" and (not inner or self.fmt == "yolo"):
            return self.out / folder / Path(*inner) / (path.stem + suffix)
        return self.out / path.with_suffix(suffix)

    def _classes_file(self, label: Path) -> Path:
        """The `classes.txt` naming the ids of the YOLO label file `label` as `convert` finds it,
        the nearest in its folder or above (within the folder); where there is none,
        `labels/classes.txt` for a label file under `labels/`, else one beside it."""
        for folder in (label.parent, *label.parent.parents):
            if folder / CLASSES_FILE in self.class_files or (folder / CLASSES_FILE).is_file():
                return folder / CLASSES_FILE
            if folder == self.out:
                break
        labels = self.out / "labels"
        return (labels if label.is_relative_to(labels) else label.parent) / CLASSES_FILE

    def _class_names(self, path: Path) -> list[str]:
        """The names by id of the `classes.txt` at `path` ("" for a blank or unusable line, as
        `convert` reads it: a person's ids never shift), with the run's classes it lacks
        appended; the file is written when they change it or it is not there yet."""
        if path not in self.class_files:
            lines = read_text(path).splitlines() if path.is_file() else []
            while lines and not lines[-1].strip():
                lines.pop()  # trailing blank lines name no class (read_classes drops them too)
            names = [name or "" for name in read_classes(path, self.out)[0]] if lines else []
            self.class_files[path] = (lines, names)
        lines, names = self.class_files[path]
        new = [name for name in self.classes if name not in names]
        lines += new
        names += new
        if new or not path.is_file():
            atomic_write(path, "".join(f"{line}\n" for line in lines))
        return names

    def add(self, item: Item, prediction: Prediction, name: str) -> Problem | None:
        """Write the pre-annotation of one picture, `name` its unique stem in this run. Returns
        a problem (nothing skipped) for a picture a web tool shows turned (`_turned`)."""
        record = ImageRecord(self._place(item, name), prediction.width, prediction.height, list(prediction.boxes))
        self.classes += list(dict.fromkeys(b.label for b in record.boxes if b.label not in self.classes))
        self.records.append(record)
        self.probabilities.append(prediction.answer_probability)
        if self.fmt not in PER_IMAGE:
            return _turned(item) if self.fmt in WEB_FORMATS else None
        target = self._annotation(record.image)
        if self.claimed.setdefault(target, record.image) != record.image:
            self.clashed.append(record.image)  # `a.png` beside `a.jpg`: LabelImg pairs by name too
            return None
        if target.exists():
            self.kept += 1
            return None
        if self.fmt == "voc":
            write_voc(record, target, self.out, depth=_channels(item))
        else:
            # The classes first: every id on disk is named even if the run stops here.
            write_yolo(record, target, self._class_names(self._classes_file(target)))
        self.written += 1
        return None

    def finish(self) -> list[str]:
        """Write the whole-run files (YOLO classes, Label Studio tasks, COCO dataset); return
        what this run wrote, relative to the folder."""
        in_images = sum(PurePosixPath(r.image).parts[0] == "images" for r in self.records)
        written = [f"images/ ({in_images})"] if in_images else []
        if self.fmt in PER_IMAGE:
            folder = PER_IMAGE[self.fmt][0]
            places = [f"{folder}/"] * any(t.is_relative_to(self.out / folder) for t in self.claimed) + \
                ["beside pictures"] * any(not t.is_relative_to(self.out / folder) for t in self.claimed)
            line = f"{' and '.join(places) or f'{folder}/'} ({self.written} new, {self.kept} kept"
            if self.clashed:
                line += (f"; {len(self.clashed)} not annotated, a picture of the same name in the folder has "
                         f"the file: {', '.join(self.clashed[:3])}{', ...' if len(self.clashed) > 3 else ''}")
            written.append(line + ")")
        for path in self.class_files:  # YOLO: the classes of the whole run named everywhere
            self._class_names(path)
            written.append(path.relative_to(self.out).as_posix())
        if self.fmt == "labelstudio":
            # Percent-encoded: a '#', '+', '&' or '%' in a file name would end or change the path.
            urls = [LOCAL_FILES + quote(r.image) for r in self.records]
            tasks = labelstudio_tasks(self.records, urls, self.model_version, self.probabilities)
            self.kept = _add_tasks(self.out / "tasks.json", tasks)
            written.append(f"tasks.json ({len(tasks) - self.kept} new, {self.kept} kept)")
        if self.fmt == "coco":
            self.kept = add_to_coco(self.records, self.out / "annotations.json", self.classes)
            written.append(f"annotations.json ({len(self.records) - self.kept} new, {self.kept} kept)")
        return written
