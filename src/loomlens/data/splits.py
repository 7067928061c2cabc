"""Splits: a dataset's own split, and group-aware random splits.

A dataset may come split already: Roboflow and pre-split LabelImg folders (`train/`,
`valid/` or `val/`, `test/`), a data.yaml's lists, CVAT subsets, VOC's ImageSets/Main lists.
`own_split` reads that, `split_sources` says where from. A random split is by group
(`assign_splits`), so the frames of one video, roll or burst, which look alike, never sit on
both sides of it; `group_keys` makes the groups (`--group-by`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath

from loomlens.data.records import ImageRecord

#: Folder or subset names (any case) -> split.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
#: The splits, in the order they are written and named.
SPLITS = ("train", "val", "test")
#: A frame loomlens saved from a video: `<video stem>_f<frame index, 6 digits>`.
VIDEO_FRAME = re.compile(r"^(?P<video>.+)_f\d{6}$")
#: A Roboflow export's picture: `<source stem>_<source ext>.rf.<hash>`, one per augmented copy
#: of the source picture (`frame000_jpg.rf.3f2c...`), which all look alike.
ROBOFLOW_COPY = re.compile(r"^(?P<source>.+_[A-Za-z0-9]+)\.rf\.[0-9A-Za-z]+$")
#: A timestamp in a file name: YYYYMMDD-HHMMSS, YYYY-MM-DDTHH:MM:SS, YYYYMMDD_HHMMSS.fff, ...
NAME_TIME = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})[T_\- ]?(\d{2})[:\-]?(\d{2})[:\-]?(\d{2})(?:[.,](\d{1,6}))?")
GROUP_HELP = "folder, regex:PATTERN (the first group, else the match) or time:SECONDS"


def split_name(name: str) -> str | None:
    """"train" | "val" | "test" for a split's folder or subset name (`valid`, `Validation`,
    `Train`, ...); None for any other name."""
    return SPLIT_NAMES.get(name.strip().lower())


def split_folder(record: ImageRecord) -> str | None:
    """The first split-named folder (as written: `valid`, `Train`) in `record`'s image path,
    else in its annotation's; None if neither path has one."""
    for path in (record.image, record.source):
        for part in PurePosixPath(path).parts[:-1]:
            if split_name(part):
                return part
    return None


def own_split(record: ImageRecord) -> str | None:
    """The split the dataset itself gives `record`: its reader's (`record.split`), else its
    `split_folder`'s; None if none."""
    if record.split:
        return record.split
    folder = split_folder(record)
    return split_name(folder) if folder else None


def split_sources(records: Iterable[ImageRecord], read_from: Sequence[str]) -> list[str]:
    """Where the dataset's own split of `records` (see `own_split`) came from, for the report:
    `read_from` (the reader's `ReadResult.split_from`), then the split folders that gave the
    records without a reader's split theirs ("split folders train/, valid/"); empty if none."""
    found = {(SPLITS.index(split), folder) for r in records
             if not r.split and (folder := split_folder(r)) and (split := split_name(folder))}
    if not found:
        return list(read_from)
    return [*read_from, f"split folders {', '.join(f'{folder}/' for _, folder in sorted(found))}"]


def assign_splits(
    images: Iterable[str], val_fraction: float, test_fraction: float, seed: int,
    groups: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Image key -> "train" | "val" | "test", deterministic for a seed. Whole groups (`groups`:
    image key -> group; an image in none is its own) go to one split: in a shuffled order, test
    then val take each group that still fits their share of images (first fit, so one large
    group does not swell a split past its share), or, when none fits, the smallest one.
    Fractions are rounded to whole images; a non-zero fraction gets at least one image (one
    group) while train keeps one group; the rest is train."""
    keys = sorted(set(images))
    members: dict[str, list[str]] = {}
    for key in keys:
        members.setdefault((groups or {}).get(key, key), []).append(key)
    left = sorted(members)
    random.Random(seed).shuffle(left)
    n = len(keys)

    def share(fraction: float, room: int) -> int:
        wanted = max(1, round(n * fraction)) if fraction > 0 else 0
        return max(0, min(wanted, room))

    n_test = share(test_fraction, n - 1)
    split_of: dict[str, str] = {}
    for split, want in (("test", n_test), ("val", share(val_fraction, n - 1 - n_test))):
        taken = 0
        for group in list(left):
            if len(left) > 1 and taken + len(members[group]) <= want:
                taken += len(members[group])
                left.remove(group)
                split_of.update(dict.fromkeys(members[group], split))
        if want and not taken and len(left) > 1:  # every group is larger than the share: the smallest
            group = min(left, key=lambda g: len(members[g]))
            left.remove(group)
            split_of.update(dict.fromkeys(members[group], split))
    for group in left:
        split_of.update(dict.fromkeys(members[group], "train"))
    return split_of


def _name_time(stem: str) -> float | None:
    """Seconds since the epoch of the first timestamp in a file name (local time); None if none."""
    match = NAME_TIME.search(stem)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _bursts(records: Sequence[ImageRecord], root: Path, gap: float) -> dict[str, str]:
    """Image -> burst: by time (the timestamp in the file name, else the file's mtime), frames
    at most `gap` seconds after the previous one join its burst."""
    times = []
    for r in records:
        stamp = _name_time(PurePosixPath(r.image).stem)
        times.append((stamp if stamp is not None else (root / r.image).stat().st_mtime, r.image))
    groups: dict[str, str] = {}
    previous, burst = None, ""
    for stamp, image in sorted(times):
        if previous is None or stamp - previous > gap:
            burst = f"burst@{datetime.fromtimestamp(stamp).isoformat(timespec='seconds')}"
        groups[image] = burst
        previous = stamp
    return groups


def _copy_group(image: PurePosixPath) -> str | None:
    """The group of an image that is one of several of the same picture: a frame of a video
    loomlens saved, a Roboflow copy of a source picture; None for any other."""
    if m := VIDEO_FRAME.match(image.stem):
        return f"video:{image.parent / m['video']}"
    if m := ROBOFLOW_COPY.match(image.stem):
        return f"roboflow:{m['source']}"  # its copies may sit in other folders (train/, valid/)
    return None


def group_keys(records: Sequence[ImageRecord], root: Path, group_by: str | None) -> dict[str, str]:
    """Image -> group, for `assign_splits`. `group_by`: "folder" (the image's folder),
    "regex:PATTERN" (searched in the image's path; its first group, else the whole match;
    no match: the image alone), "time:SECONDS" (bursts: see `_bursts`) or None. Unless
    `group_by` says otherwise, frames that loomlens saved from one video
    (`<video>_f000123.jpg`) are grouped by video, and a Roboflow export's augmented copies of
    one picture (`<stem>_jpg.rf.<hash>.jpg`) by that picture. Raises ValueError for a spec it
    cannot read."""
    if group_by is None:
        return {r.image: key for r in records if (key := _copy_group(PurePosixPath(r.image)))}
    kind, _, arg = group_by.partition(":")
    if kind == "folder" and not arg:
        return {r.image: str(PurePosixPath(r.image).parent) for r in records}
    if kind == "regex" and arg:
        try:
            pattern = re.compile(arg)
        except re.error as err:
            raise ValueError(f"--group-by regex:{arg}: not a regular expression ({err})") from None
        matches = {r.image: pattern.search(r.image) for r in records}
        # A first group that took no part in the match (`(cam\d)?`, `a(..)|b(..)`): the whole match.
        return {image: m.group(1) if pattern.groups and m.group(1) is not None else m.group(0)
                for image, m in matches.items() if m}
    if kind == "time":
        try:
            gap = float(arg)
        except ValueError:
            gap = -1.0
        if gap >= 0:
            return _bursts(records, root, gap)
    raise ValueError(f"--group-by {group_by!r}: use {GROUP_HELP}")
