"""Atomic file writes: a crash or an exception mid-write never leaves a half-written file
over a good one.

The data goes to a temporary file in the same folder (so the final rename stays on one file
system, where `os.replace` is atomic), and only a complete file replaces the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # only callers that save images need PIL loaded
    from PIL import Image


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", durable: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (`mode` "w" or "wb"; text is UTF-8 with
    "\\n" line ends); when the block ends normally it replaces `path`, when it raises, `path`
    is left as it was and the temporary file is removed. `durable` also fsyncs before the
    rename, so a power cut cannot leave an empty file either (skip it for bulk outputs that
    can be regenerated)."""
    with atomic_group() as group, group(path, mode, durable) as f:
        yield f


@contextmanager
def atomic_group() -> Iterator[Callable[..., AbstractContextManager[IO]]]:
    """Several files written as one: the block gets an `open(path, mode="w", durable=True)`
    like `atomic_open`'s, and every file it wrote replaces its target only when the whole
    block ends normally; when any write raises, every target is left as it was. The renames
    at the end take no space, so a full disk stops the block before the first of them; a
    rename refused there (a folder where a file goes) leaves the earlier ones done and no
    temporary file behind."""
    written: list[tuple[Path, Path]] = []

    @contextmanager
    def open_one(path: str | Path, mode: str = "w", durable: bool = True) -> Iterator[IO]:
        if mode not in ("w", "wb"):
            raise ValueError(f"atomic_open writes only, mode 'w' or 'wb', got {mode!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        written.append((Path(tmp), path))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())

    try:
        yield open_one
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)  # a no-op for those renamed


def atomic_write(path: str | Path, data: str | bytes, durable: bool = True) -> None:
    """Write all of `data` (text as UTF-8, or bytes) to `path` atomically; see `atomic_open`."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", durable) as f:
        f.write(data)


#: What each format is written with: JPEG at quality 95; PNG at zlib level 1, which writes a
#: frame or tile several times faster than Pillow's default 6 at about the same size (a
#: conversion of large frames spent most of its time compressing; docs/benchmarks.md, "Convert").
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "PNG": {"compress_level": 1}}


def atomic_save_image(image: Image.Image, path: str | Path, fmt: str) -> None:
    """Save the PIL `image` at `path` in format `fmt` (with `SAVE_OPTIONS`) atomically, not
    durably: image outputs of a conversion can be regenerated. A phone's MPO (a JPEG with a
    second picture inside) is written as the plain JPEG it shows, at JPEG's quality: a mirror
    or a tile has no second picture, and the MPO writer's default quality is 75."""
    fmt = "JPEG" if fmt == "MPO" else fmt
    with atomic_open(path, "wb", durable=False) as f:
        image.save(f, format=fmt, **SAVE_OPTIONS.get(fmt, {}))


def atomic_copy(src: str | Path, dst: str | Path, link: bool = False) -> None:
    """Put the file `src` at `dst` atomically (no half-copied file ever sits at `dst`): with
    `link` a hard link (no extra space), or a copy where the file system cannot link; else a
    copy. The copy keeps `src`'s modification time."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:
            tmp.unlink(missing_ok=True)  # another file system, or no links there: copy instead
    with atomic_open(dst, "wb", durable=False) as f, src.open("rb") as source:
        shutil.copyfileobj(source, f)
    shutil.copystat(src, dst)


def stamp(dst: str | Path, src: str | Path) -> None:
    """Give `dst`, a file made from `src` (a flipped copy, a tile), `src`'s modification time,
    so `same_stamp` later tells whether `src` changed since, to an older time too (unzip,
    `cp -p` and `rsync -a` keep a replaced file's own time)."""
    st = Path(src).stat()
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def same_stamp(dst: str | Path, src: str | Path) -> bool:
    """Whether `dst` exists with `src`'s modification time to the nanosecond (see `stamp`, and
    `atomic_copy`, which keeps it): then a re-run may keep `dst`."""
    dst = Path(dst)
    return dst.exists() and dst.stat().st_mtime_ns == Path(src).stat().st_mtime_ns


#: Files Windows' Explorer leaves in folders by itself, hidden from view as dot files are.
EXPLORER_FILES = frozenset({"thumbs.db", "desktop.ini"})


def unseen(path: Path) -> bool:
    """Whether the folder entry `path` is one a file manager hides, so that a person does not
    count it as the folder's contents: a dot name (macOS's `.DS_Store` and `._NAME` copies,
    `.git`, `.gitkeep`) or a file Explorer leaves there (`EXPLORER_FILES`, any case)."""
    return path.name.startswith(".") or path.name.lower() in EXPLORER_FILES


def holds_files(folder: str | Path) -> bool:
    """Whether the folder `folder` holds anything but `unseen` entries: the one rule by which an
    output folder counts as empty (convert, train, merge and export take an empty one)."""
    return any(not unseen(entry) for entry in Path(folder).iterdir())


def keep_unseen(folder: Path, into: Path) -> None:
    """Move the `unseen` entries of `folder` into `into`, the folder about to take its place,
    so that replacing a folder that counted as empty loses none of them (a `.git`)."""
    for entry in Path(folder).iterdir():
        if unseen(entry) and not (into / entry.name).exists():
            entry.rename(into / entry.name)


def output_folder(path: str | Path) -> Path:
    """Make the output folder `path` (and its parents) if missing and return it. Raises
    ValueError, naming it, where a file stands in its place (`--out` given a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"the output folder {path} is a file; give a folder (a new one is made)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _beside(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}"


def swap_in_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path`, the previous `path` set aside first and removed
    last, so a kill leaves either folder whole: `recover_folder` puts the previous one back."""
    old = _beside(path, "old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(path: Path) -> None:
    """Undo a `swap_in_folder` cut short by a kill: put the previous folder back if `path` is missing."""
    old = _beside(path, "old")
    if not path.exists() and old.exists():
        os.rename(old, path)


def write_folder(path: Path, fill) -> None:
    """Make the folder `path` atomically: `fill(tmp)` writes into an empty temporary folder,
    which then replaces `path` whole (the previous `path` stays, and the temporary folder goes,
    if `fill` fails or is interrupted)."""
    tmp = _beside(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_folder(tmp, path)
