"""Event pictures on disk: a full-frame JPEG and a crop around the defect, per event, under
`MEDIA/CAMERA/`, and the retention that keeps that folder within an age and a size.

Files are written whole (temp file, then rename), so a killed watcher never leaves a
half-written JPEG; retention removes the oldest first and never touches the database (the
server answers 404 for an image retention removed).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image

from loomlens.data.atomic import atomic_open
from loomlens.data.records import Box
from loomlens.predict.draw import fit_jpeg

log = logging.getLogger("loomlens.watch")


#: The names the watcher gives event pictures (`picture_paths`). Retention removes only files so
#: named, so a --media folder that also holds other files (reports, a camera's calibration)
#: loses nothing else.
_PICTURE = re.compile(r"[0-9a-f]{32}-(frame|crop)\.jpg")


def picture_paths(folder: Path, camera: str) -> tuple[str, str]:
    """Fresh (frame, crop) JPEG paths for one event of `camera` under `folder`."""
    stem = folder / camera / uuid.uuid4().hex
    return f"{stem}-frame.jpg", f"{stem}-crop.jpg"


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    """`image` as JPEG bytes, shrunk to fit when a side is longer than a JPEG holds (`fit_jpeg`:
    a line-scan strip's event picture, whose save would raise and stop the watcher)."""
    buffer = io.BytesIO()
    fit_jpeg(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def crop(image: Image.Image, box: Box, margin: float = 0.5, min_side: int = 64) -> Image.Image:
    """The part of `image` around `box`, grown by `margin` of its size on each side (at least
    `min_side` pixels wide and high where the image allows), for a thumbnail with context."""
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    w = max(box.width * (1 + 2 * margin), min_side)
    h = max(box.height * (1 + 2 * margin), min_side)
    x1, y1 = max(0, int(cx - w / 2)), max(0, int(cy - h / 2))
    x2, y2 = min(image.width, int(cx + w / 2) + 1), min(image.height, int(cy + h / 2) + 1)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def write_jpeg(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole (a reader never sees half a file)."""
    with atomic_open(path, "wb", durable=False) as f:
        f.write(data)


def check_media(folder: Path) -> Path:
    """`folder` once it exists and takes a file (made now if missing; a probe written and
    removed), else ValueError naming it and the fix: found at start, where each event would
    only log that its pictures could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"--media {folder}: event pictures cannot be written there ({err.strerror or err}); "
                         "give --media a folder this user can write to, or make it writable (chmod, chown)") from None
    return folder


class Retention:
    """Keeps the event pictures in `folder` within `keep_days` (older ones go) and `keep_mb`
    (oldest go first until under), checked at most every `every_s` seconds. None: no limit of
    that kind. Only the watcher's own pictures count and go (`picture_paths`)."""

    def __init__(self, folder: Path, *, keep_days: float | None = 30.0, keep_mb: float | None = 2048.0,
                 every_s: float = 60.0):
        if keep_days is not None and keep_days <= 0:
            raise ValueError(f"--keep-days must be positive (or unset), got {keep_days}")
        if keep_mb is not None and keep_mb <= 0:
            raise ValueError(f"--keep-mb must be positive (or unset), got {keep_mb}")
        self.folder, self.keep_days, self.keep_mb, self.every_s = folder, keep_days, keep_mb, every_s
        self._next = 0.0
        self.removed = 0

    def maybe_prune(self) -> int:
        """Prune when the last check is `every_s` old. Returns the files removed."""
        if time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + self.every_s
        return self.prune()

    def prune(self) -> int:
        """Remove event pictures past the age limit, then the oldest until they fit the size
        limit. Returns the files removed."""
        files = []
        for root, _dirs, names in os.walk(self.folder):
            for name in filter(_PICTURE.fullmatch, names):
                path = Path(root) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, path))
        files.sort()
        removed = 0
        total = sum(size for _, size, _ in files)
        cutoff = time.time() - self.keep_days * 86400 if self.keep_days is not None else None
        budget = self.keep_mb * 1024 * 1024 if self.keep_mb is not None else None
        for mtime, size, path in files:
            too_old = cutoff is not None and mtime < cutoff
            too_big = budget is not None and total > budget
            if not (too_old or too_big):
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= size
            removed += 1
        if removed:
            log.info("retention removed %d event image(s) from %s", removed, self.folder)
        self.removed += removed
        return removed
