"""Pre-annotations: predictions written as the files a labelling tool opens, so a person
corrects boxes instead of drawing them (`loomlens predict --save-labels FORMAT --labels-out DIR`).

DIR becomes a dataset `loomlens convert DIR` reads back:
- `images/`: every predicted picture not already inside DIR (a hard link to the file, or a
  copy where the file system cannot link; a video frame saved as `<video>_f<frame>.jpg`, the
  name `convert` groups by video);
- voc: `annotations/<name>.xml`, Pascal VOC as LabelImg writes it (Open Dir `images/`, Change
  Save Dir `annotations/`);
- yolo: `labels/<name>.txt` with `labels/classes.txt` (LabelImg's YOLO mode);
- labelstudio: `tasks.json`, one task per picture, each box a `rectanglelabels` prediction with
  its `score` (a picture without a box scores 1 - the model's probability that it holds a
  defect, so sorting by score brings the likely misses up early); images as `/data/local-files/?d=images/...` (percent-encoded): serve DIR as Label Studio's local
  files document root;
- coco: `annotations.json`, a COCO dataset whose boxes carry their `score`; a later run adds its
  pictures to it.

A per-image annotation file already in DIR (one a person may have corrected) is never
overwritten: it is kept and counted; delete it to have it predicted again (so is a picture's
entry in an `annotations.json` already there). A picture of a later
run whose name an earlier run's picture holds (every day's `frame_0001.jpg`) gets a name of its
own, so no annotation is ever kept beside another picture.
"""

from __future__ import annotations

import filecmp
import io
import itertools
import json
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from loomlens.data.atomic import atomic_copy, atomic_write
from loomlens.data.coco import add_to_coco
from loomlens.data.labelstudio import labelstudio_tasks
from loomlens.data.records import ImageRecord
from loomlens.data.voc import write_voc
from loomlens.data.yolo import CLASSES_FILE, read_class_names, write_classes, write_yolo
from loomlens.predict.predictor import Prediction
from loomlens.predict.sources import Item

LABEL_FORMATS = ("voc", "yolo", "labelstudio", "coco")
#: Per-image annotation files: format -> (folder in DIR, suffix).
PER_IMAGE = {"voc": ("annotations", ".xml"), "yolo": ("labels", ".txt")}
LOCAL_FILES = "/data/local-files/?d="


def _channels(item: Item) -> int:
    """1 for a still picture stored grey (8- or 16-bit, whatever `Item.image` was converted
    to), else 3: what LabelImg writes as a VOC file's depth. A video frame is saved in colour."""
    if item.frame is None:
        with Image.open(item.source) as stored:
            return 1 if len(stored.getbands()) == 1 else 3
    return 3


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
        self.out.mkdir(parents=True, exist_ok=True)
        # Ids a person's label files already use stay as they are; new classes are appended.
        known = read_class_names(self.out / "labels" / CLASSES_FILE) if fmt == "yolo" else []
        self.classes = list(dict.fromkeys([*known, *classes]))
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

    def add(self, item: Item, prediction: Prediction, name: str) -> None:
        """Write the pre-annotation of one picture, `name` its unique stem in this run."""
        record = ImageRecord(self._place(item, name), prediction.width, prediction.height, list(prediction.boxes))
        new = list(dict.fromkeys(b.label for b in record.boxes if b.label not in self.classes))
        self.classes += new
        if self.fmt == "yolo" and (new or not self.records):
            # Before the label file: every id on disk is named even if the run stops here.
            write_classes(self.out / "labels" / CLASSES_FILE, self.classes)
        self.records.append(record)
        self.probabilities.append(prediction.answer_probability)
        if self.fmt not in PER_IMAGE:
            return
        folder, suffix = PER_IMAGE[self.fmt]
        target = self.out / folder / (Path(record.image).stem + suffix)
        if target.exists():
            self.kept += 1
            return
        if self.fmt == "voc":
            write_voc(record, target, self.out, depth=_channels(item))
        else:
            write_yolo(record, target, self.classes)
        self.written += 1

    def finish(self) -> list[str]:
        """Write the whole-run files (YOLO classes, Label Studio tasks, COCO dataset); return
        what this run wrote, relative to the folder."""
        written = [f"images/ ({len(self.records)})"] if self.records else []
        if self.fmt in PER_IMAGE:
            written.append(f"{PER_IMAGE[self.fmt][0]}/ ({self.written} new, {self.kept} kept)")
        if self.fmt == "yolo":
            write_classes(self.out / "labels" / CLASSES_FILE, self.classes)
            written.append(f"labels/{CLASSES_FILE}")
        if self.fmt == "labelstudio":
            # Percent-encoded: a '#', '+', '&' or '%' in a file name would end or change the path.
            urls = [LOCAL_FILES + quote(r.image) for r in self.records]
            tasks = labelstudio_tasks(self.records, urls, self.model_version, self.probabilities)
            atomic_write(self.out / "tasks.json", json.dumps(tasks, indent=1) + "\n")
            written.append("tasks.json")
        if self.fmt == "coco":
            self.kept = add_to_coco(self.records, self.out / "annotations.json", self.classes)
            written.append(f"annotations.json ({len(self.records) - self.kept} new, {self.kept} kept)")
        return written
