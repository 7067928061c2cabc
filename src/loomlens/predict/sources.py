"""What `loomlens predict` reads: image files, folders, globs and video files, as a stream of
items (a still image, or one sampled frame of a video) with where each came from.

A file that cannot be read (0 bytes, truncated, corrupt, not what its suffix says) is not an
error for the whole run: it is skipped and reported as a `Problem`, so one bad file among
thousands never costs the others their predictions."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from loomlens.data.sanitize import (
    IMAGE_SUFFIXES, MISNAMED, MISNAMED_FIX, is_utf8, shown_name, to_rgb, too_large, walk_files,
)
from loomlens.predict.video import VIDEO_SUFFIXES, ends_short, frame_count, is_video, read_frames



@dataclass
class Item:
    """One picture to predict on: its `source` file, the frame index and timestamp (seconds)
    for a video frame (None for a still image), and the picture itself."""

    source: Path
    image: Image.Image
    frame: int | None = None
    timestamp: float | None = None


@dataclass
class Problem:
    """An input that gave no prediction: its `source`, the frame (video) if it failed midway,
    and `error`, a message that names what is wrong and what to do."""

    source: str
    error: str
    frame: int | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "frame": self.frame, "error": self.error}


def _folder_files(folder: Path) -> list[Path]:
    """The image and video files under `folder`, sorted, leaving out hidden ones (a dot file
    such as macOS's `.DS_Store` and `._x.jpg` copies, or anything in a dot folder such as `.git`)
    as `convert` does: they are no pictures of the camera."""
    return list(walk_files(folder, IMAGE_SUFFIXES | VIDEO_SUFFIXES))


def _literal_root(pattern: str) -> Path:
    """The folder a glob `pattern` searches under: its parts before the first wildcard."""
    parts = Path(pattern).parts
    return Path(*parts[: next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))])


def _glob_parts(raw: str) -> tuple[Path, str]:
    """The folder a glob input `raw` searches under and the pattern to search with. Its leading
    parts that exist as written and hold wildcard characters (a folder `cam[1]`) are names,
    escaped, where glob would take `[1]` for a character class and find nothing; otherwise
    the pattern is `raw` and the folder its parts before the first wildcard."""
    parts = Path(raw).parts
    named = next((i for i in range(len(parts), 0, -1) if Path(*parts[:i]).exists()), 0)
    if any(glob.has_magic(part) for part in parts[:named]):
        root = Path(*parts[:named])
        return root, os.path.join(glob.escape(str(root)), *parts[named:])
    return _literal_root(raw), raw


def misnamed(path: Path) -> Problem:
    """The problem of a file whose path is not valid UTF-8 (`is_utf8`): no record, message or
    console could name it, so it is skipped, named with its odd bytes escaped."""
    shown = shown_name(str(path))
    return Problem(shown, f"{shown}: {MISNAMED}: {MISNAMED_FIX}")


def expand_inputs(inputs: Sequence[str | Path], exclude: Sequence[str | Path] = (),
                  on_problem: Callable[[Problem], None] | None = None) -> list[Path]:
    """Image and video files named by `inputs` (files, folders searched recursively without
    their hidden files, glob patterns), sorted within each input, duplicates removed. A folder
    or glob leaves out what lies under the `exclude` folders (a command's own output inside its
    input folder) unless it lies inside one itself (asked for by name). A file whose path is
    not valid UTF-8 is left out (no record or message could name it), reported to `on_problem`
    (`misnamed`) when given. Raises FileNotFoundError for an input that names nothing, and
    ValueError for a file that is neither image nor video."""
    outputs = [Path(e).resolve() for e in exclude]

    def inside(p: Path) -> bool:
        return any(p.resolve().is_relative_to(o) for o in outputs)

    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = [f for f in _folder_files(path) if inside(path) or not inside(f)]
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES and not is_video(path):
                images, videos = (", ".join(sorted(suffixes)) for suffixes in (IMAGE_SUFFIXES, VIDEO_SUFFIXES))
                raise ValueError(f"{shown_name(str(path))} is neither an image nor a video: loomlens reads images "
                                 f"({images}) and videos ({videos}); convert it to one of those (e.g. PNG) or "
                                 "leave it out")
            files = [path]
        else:
            root, pattern = _glob_parts(str(raw))
            files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"no such file, folder or matching files: {shown_name(str(raw))}")
            files = [f for f in files if inside(root) or not inside(f)]
        found += files
    first: dict[Path, Path] = {}  # one file named two ways (relative, absolute) is predicted once
    for f in found:
        first.setdefault(f.resolve(), f)
    for f in first.values():
        if not is_utf8(str(f)) and on_problem is not None:
            on_problem(misnamed(f))
    return [f for f in first.values() if is_utf8(str(f))]


def count_items(files: Sequence[Path], every: int = 1) -> int:
    """How many items `iter_items` will yield (for a progress bar; videos as declared)."""
    return sum(-(-frame_count(f) // every) if is_video(f) else 1 for f in files)


def read_image(path: Path) -> Image.Image:
    """The image at `path`, fully decoded to RGB. Raises ValueError naming the file for an
    empty, truncated or undecodable one (a truncated file is refused, never padded)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): re-copy or re-export it")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # decodes every pixel: a truncated file fails here
    except Image.DecompressionBombError:
        raise ValueError(too_large(str(path))) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path} cannot be decoded ({exc}): re-copy or re-export it") from None


def iter_items(files: Sequence[Path], every: int = 1,
               on_problem: Callable[[Problem], None] | None = None) -> Iterator[Item]:
    """Each image as one item, each video as every `every`-th frame. With `on_problem`, a file
    that cannot be read is reported to it and skipped, and a video that ends before the frame
    count it declares is reported after the frames it gave; without, the ValueError propagates."""
    for f in files:
        cut_at = None  # the first frame a video cut off before its declared end could not give
        try:
            if is_video(f):
                frames, reader = 0, read_frames(f, every)
                while True:
                    try:
                        frame = next(reader)
                    except StopIteration as end:
                        read = end.value
                        break
                    frames += 1
                    yield Item(f, frame.image, frame.index, frame.timestamp)
                if not frames:
                    raise ValueError(f"{f} holds no frame OpenCV can decode: re-copy or re-encode it")
                declared = frame_count(f)
                if ends_short(read, declared):
                    cut_at = read
                    raise ValueError(f"{f} ends at frame {read} of the {declared} it declares (cut off or "
                                     "damaged): the frames before it were read, the rest were not; re-copy "
                                     "the file (or re-encode it) and predict again")
            else:
                yield Item(f, read_image(f))
        except (ValueError, OSError) as exc:
            if on_problem is None:
                raise
            message = str(exc) if str(f) in str(exc) else f"{f}: {exc}"
            on_problem(Problem(str(f), message, cut_at))
