"""Checks every annotation reader shares: finding images safely inside the dataset root,
reading their size, and turning raw coordinates into clean boxes. Each check returns a
`Problem` instead of raising, so the caller can skip one file and go on."""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from loomlens.data.florence_text import LabelError, validate_label
from loomlens.data.records import Box, ImageRecord, Problem

CLIP_TOLERANCE = 0.5  # pixels
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` in forward-slash form (both resolved), for messages and
    records; a path outside `root` is returned as given."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def iter_files(root: Path, suffix: str | Collection[str], skip: Sequence[Path] = ()) -> Iterator[Path]:
    """Files under `root` ending in `suffix` (any case; one, or a collection of them), sorted,
    leaving out the folders in `skip` (a conversion's own output inside its source), hidden
    folders such as `.git`, the temporary files `atomic_open` leaves while writing, and files
    whose path is not valid UTF-8 (`misnamed_files` reports those: no record could name them)."""
    return (path for path in walk_files(root, suffix, skip) if is_utf8(path.relative_to(root).as_posix()))


def visible(rel_parts: Sequence[str], suffixes: Collection[str]) -> bool:
    """Whether a file at `rel_parts` (its path's parts below the folder looked in) is one to
    take: its name ends in one of `suffixes` (lower case) and no part is hidden (a leading dot:
    `.git`, macOS's `._x.jpg`, the temporary files `atomic_open` writes)."""
    return Path(rel_parts[-1]).suffix.lower() in suffixes and not any(p.startswith(".") for p in rel_parts)


def walk_files(root: Path, suffix: str | Collection[str], skip: Sequence[Path] = ()) -> Iterator[Path]:
    """`iter_files`' files, whatever their names (a caller that reports the misnamed ones itself)."""
    suffixes = {suffix} if isinstance(suffix, str) else set(suffix)
    skipped = [s.resolve() for s in skip]
    for path in sorted(root.rglob("*")):
        if (
            visible(path.relative_to(root).parts, suffixes)
            and path.is_file()
            and not any(path.resolve().is_relative_to(s) for s in skipped)
        ):
            yield path


def is_utf8(name: str) -> bool:
    """Whether the file name `name` is valid UTF-8: Python keeps the bytes of one that is not
    (a Latin-1 `\\xd6` from an old Windows share) as lone surrogates, which no JSON file,
    message or console can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(name: str) -> str:
    """The file name `name` printable: the bytes Python kept as surrogates since they are not
    UTF-8 written as escapes (`\\xd6`), any other lone surrogate (from JSON) as `\\ud800`."""
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("utf-8", errors="backslashreplace").decode("utf-8") for c in name)


#: The suffixes of the files a dataset is made of: its images and every annotation format's.
DATASET_SUFFIXES = IMAGE_SUFFIXES | {".xml", ".json", ".txt", ".yaml", ".yml"}
#: What is said of a file whose name is not UTF-8, and the fix: convert's and predict's words.
MISNAMED = "file name is not valid UTF-8 (shown with its odd bytes as \\xNN); skipped"
MISNAMED_FIX = "rename it (e.g. with convmv -f latin1 -t utf8)"


def misnamed_files(root: Path, skip: Sequence[Path] = ()) -> list[Problem]:
    """One problem for each image or annotation file under `root` (not under `skip`) whose path
    is not valid UTF-8, named with its bytes escaped: `iter_files` leaves them out, and this
    says so rather than let an image vanish from the data unnoticed."""
    names = [path.relative_to(root).as_posix() for path in walk_files(root, DATASET_SUFFIXES, skip)]
    return [Problem(file=shown_name(name), message=MISNAMED, fix=MISNAMED_FIX) for name in names if not is_utf8(name)]


def read_text(path: Path) -> str:
    """An annotation text file as labelling tools on any system write it: UTF-8 with or without
    a byte-order mark, or UTF-16 with one (what Windows PowerShell's `>` writes); bytes that do
    not decode become U+FFFD, so the line that holds them is reported, not the whole file."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


#: A path written absolute on some machine: `/home/...`, `C:/...` (backslashes already turned), `//server/...`.
FOREIGN_ABSOLUTE = re.compile(r"/|[A-Za-z]:/")


def find_image(
    root: Path, name: str, search_dirs: Sequence[Path], file: str, line: int | None = None
) -> tuple[Path | None, Problem | None]:
    """Resolve the image `name` an annotation refers to: absolute, or relative to each of
    `search_dirs` in turn; failing that, the one image there with the same name but for its
    case or extension (older LabelImg writes `<filename>` with no extension, Windows keeps
    `A.JPG` for `a.jpg`). An absolute path (POSIX or Windows) that is not there, as labelling
    tools write them on the labeller's machine, is looked for by its file name in `search_dirs`.
    Only a path inside `root` is accepted, so `../../etc/passwd` or an absolute path elsewhere
    is rejected, and so is a name that is not valid UTF-8 (lone surrogates in JSON, `\\udcd6`).
    Returns (the resolved path, None) or (None, problem)."""
    name = name.strip().replace("\\", "/")  # LabelImg on Windows writes backslashes
    if not is_utf8(name):
        return None, Problem(file=file, line=line, message=f"image name {shown_name(name)!r} is not valid UTF-8; "
                             "annotation skipped", fix="write the image's name as text, as the file is named")
    root = root.resolve()
    candidates = [Path(name)] if Path(name).is_absolute() else [d / name for d in search_dirs]
    inside = [c.resolve() for c in candidates if c.resolve().is_relative_to(root)]
    if FOREIGN_ABSOLUTE.match(name) and not any(p.is_file() for p in inside):
        here = [p for d in search_dirs if (p := (d / PurePosixPath(name).name).resolve()).is_file()
                and p.is_relative_to(root)]
        if here:
            return here[0], None
    if not inside:
        return None, Problem(
            file=file,
            line=line,
            message=f"image path {name!r} points outside the dataset root; rejected",
            fix="use a path inside the dataset folder, relative to it",
        )
    for path in inside:
        if path.is_file():
            return path, None
    for path in inside:
        alike = [p for p in _same_image_name(path) if p.resolve().is_relative_to(root)]
        if len(alike) == 1:
            return alike[0], None
        if alike:
            return None, Problem(
                file=file, line=line, fix="name the image with its extension",
                message=f"image {name!r} not found, and {', '.join(p.name for p in alike)} all could be it; "
                "annotation skipped",
            )
    return None, Problem(
        file=file,
        line=line,
        message=f"image {name!r} not found; annotation skipped",
        fix="put the image beside the annotation or in images/, or delete the annotation",
    )


def _same_image_name(path: Path) -> list[Path]:
    """The images in `path`'s folder named as `path` but for case and image extension."""
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.casefold() == stem.casefold() and p.is_file())


class BadImage(OSError):
    """An image file PIL cannot open or decode: empty, truncated, not an image at all."""


class ImageTooLarge(BadImage):
    """An image over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`): likely a decompression bomb,
    a small file that would unpack to gigabytes."""


#: The environment variable that raises (or lowers) the pixel limit, in megapixels: a line-scan
#: camera's frames can be larger than PIL's default of ~89 MP, a bomb's limit, not a camera's.
PIXEL_LIMIT_ENV = "LOOMLENS_MAX_MEGAPIXELS"


def apply_pixel_limit() -> None:
    """Set PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, process-wide) from `PIXEL_LIMIT_ENV`
    when it is set; the command line calls this once before any command. Raises ValueError for
    a value that is not a positive number."""
    given = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not given:
        return
    try:
        megapixels = float(given)
    except ValueError:
        megapixels = 0.0
    if not math.isfinite(megapixels) or megapixels <= 0:
        raise ValueError(f"{PIXEL_LIMIT_ENV} must be a positive number of megapixels, e.g. 300; got {given!r}")
    Image.MAX_IMAGE_PIXELS = int(megapixels * 1e6)


def too_large(what: str) -> str:
    """The message for an image over the pixel limit, with how to raise the limit."""
    limit = (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (f"{what} is over the limit of {limit:.0f} megapixels (a decompression bomb? a real frame: "
            f"set {PIXEL_LIMIT_ENV} above its size)")


# What PIL's decoders raise on hostile bytes besides OSError (a bad PNG CRC is a SyntaxError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


@contextmanager
def open_image(path: Path, decode: bool = False) -> Iterator[Image.Image]:
    """The image at `path`, open: its header read, and with `decode` all of its pixels too
    (`load_pixels`; a truncated file passes the header and fails only here). Raises
    `ImageTooLarge` for any image over `Image.MAX_IMAGE_PIXELS` (PIL only warns up to twice
    that, then raises an error that is no OSError) and `BadImage` for anything else wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(too_large(repr(path.name))) from None
    except _DECODE_ERRORS as err:
        raise BadImage(f"cannot open {path.name!r}: {err}") from err
    with im:
        if decode:
            try:
                load_pixels(im)
            except _DECODE_ERRORS as err:
                raise BadImage(f"cannot decode {path.name!r}: {err}") from err
        yield im


def load_pixels(image: Image.Image) -> None:
    """Decode every pixel of the open `image` (PIL's `load`). A 48- or 64-bit colour one then
    holds `to_rgb`'s 8-bit picture, in place so its format, EXIF and tags stay, not PIL's top
    bytes: what is cut, mirrored or turned from it matches what `read_rgb` reads."""
    colour = deep_colour(image)
    image.load()
    if colour is not None:
        image.paste(Image.fromarray(_to_8_bits(colour[..., :3], False)))


_ORIENTATION = 0x0112  # the EXIF tag
_TURNED = {5, 6, 7, 8}  # EXIF orientations that turn the picture a quarter: width and height swap
#: What a viewer that obeys each EXIF orientation does to the stored picture (EXIF 2.3, tag 0x0112).
_SHOWN = {2: "mirrored left to right", 3: "turned 180 degrees", 4: "mirrored top to bottom",
          5: "mirrored and turned a quarter", 6: "turned a quarter clockwise", 7: "mirrored and turned a quarter",
          8: "turned a quarter anticlockwise"}


def orientation_problem(image: Image.Image, name: str, file: str) -> Problem | None:
    """A report (nothing skipped) when `image` (the file `name`, annotated in `file`) carries
    an EXIF orientation that turns or mirrors it, else None. loomlens reads every picture as
    stored, as LabelImg shows it; a web labelling tool (Label Studio, CVAT, Roboflow) shows it
    turned, so boxes drawn there would land in the wrong place, and when the turn keeps the
    width and height (180 degrees, a mirror) nothing else gives that away."""
    orientation = image.getexif().get(_ORIENTATION, 1)
    if orientation not in _SHOWN:
        return None
    return Problem(
        file=file,
        message=f"image {name} carries EXIF orientation {orientation}, which a viewer shows "
        f"{_SHOWN[orientation]}; loomlens reads and trains it as stored, as LabelImg shows it, but a web "
        "labelling tool (Label Studio, CVAT, Roboflow) shows it turned, and boxes drawn there are in the wrong place",
        fix="if it was labelled in such a tool, save it upright (e.g. `mogrify -auto-orient`, or PIL's "
        "ImageOps.exif_transpose), label it again and convert again; if its boxes fit the picture as stored, "
        "nothing to do",
    )


#: Bit depths a grey camera image may fill inside a 16- or 32-bit file, smallest first.
_DEPTHS = (8, 10, 12, 14, 16)


def is_deep(image: Image.Image) -> bool:
    """Whether `image` holds more than 8 bits a channel (PIL modes I;16*, I, F)."""
    return image.mode.startswith("I") or image.mode == "F"


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, the form the model and every drawing take. A deep grey image (PIL
    modes I;16*, I, F: 16-bit PNG and TIFF from machine-vision cameras) or a deep colour one
    not yet decoded (`deep_colour`) is scaled down from the smallest depth of `_DEPTHS` bits
    that holds its brightest pixel (a float image within 0..1 from 1), where PIL's own
    conversion would clip grey to white and keep only the top byte of colour (12 bits: black)."""
    if not is_deep(image):
        colour = deep_colour(image)
        return image.convert("RGB") if colour is None else Image.fromarray(_to_8_bits(colour[..., :3], False))
    return Image.fromarray(_to_8_bits(np.asarray(image), image.mode == "F")).convert("RGB")


def _to_8_bits(values: np.ndarray, floating: bool) -> np.ndarray:
    """`values` (any shape) as uint8, scaled from the smallest depth of `_DEPTHS` bits that
    holds the largest of them; `floating` values within 0..1 from 1."""
    values = np.clip(values.astype(np.float64), 0, None)
    top = float(values.max(initial=0))
    if floating and top <= 1:
        full = 1.0
    else:
        full = next((2.0**d - 1 for d in _DEPTHS if top <= 2**d - 1), top)
    return np.clip(values * (255 / full) + 0.5, 0, 255).astype(np.uint8)


#: How to read the other byte of a 16-bit sample than the one PIL's RGB(A) unpacker keeps.
_OTHER_BYTE = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def deep_colour(image: Image.Image) -> np.ndarray | None:
    """The (H, W, channels) uint16 samples of `image` when it is a 48- or 64-bit colour PNG or
    TIFF not yet decoded, else None. PIL has no 16-bit colour mode: it opens one as RGB(A) and
    keeps each sample's top byte, so the file is decoded a second time with the byte order
    swapped (`_OTHER_BYTE`) to get the low bytes too; once decoded, those are gone."""
    rawmodes = [t.args[0] if isinstance(t.args, tuple) else t.args for t in getattr(image, "tile", ())]
    deep = {f"{image.mode};16{order}" for order in _OTHER_BYTE}
    if image.format not in ("PNG", "TIFF") or not rawmodes or not deep.issuperset(rawmodes):
        return None
    with Image.open(image.filename or image.fp) as low:
        low.tile = [t._replace(args=_swapped(t.args)) for t in low.tile]
        low_bytes = np.asarray(low)
    return np.asarray(image).astype(np.uint16) << 8 | low_bytes


def _swapped(args: str | tuple) -> str | tuple:
    """A tile's decoder `args` (the rawmode, alone or first) with `_OTHER_BYTE`'s rawmode."""
    rawmode = args[0] if isinstance(args, tuple) else args
    other = rawmode[:-1] + _OTHER_BYTE[rawmode[-1]]
    return (other, *args[1:]) if isinstance(args, tuple) else other


def read_rgb(path: str | Path) -> Image.Image:
    """The picture at `path` as 8-bit RGB (`to_rgb`), its file closed once read: a split or a
    folder of thousands of frames holds no open files until the collector comes."""
    with Image.open(path) as image:
        return to_rgb(image)


def image_size(
    path: Path, declared: tuple[int, int] | None, file: str, line: int | None = None
) -> tuple[tuple[int, int] | None, Problem | None]:
    """The (width, height) of the image at `path` as stored, read from its header only (see
    `open_image`). If the annotation `declared` a non-zero size that differs, the boxes cannot
    be trusted: problem (one that names the EXIF orientation when that is why the sizes swap).
    A damaged or oversized image is a problem too."""
    try:
        with open_image(path) as im:
            size = im.size
            orientation = im.getexif().get(_ORIENTATION, 1)
    except ImageTooLarge as err:
        return None, Problem(
            file=file, line=line, image=str(path), message=f"image {err}; skipped",
            fix=f"a real frame: run again with {PIXEL_LIMIT_ENV} (megapixels) above its size; else remove it",
        )
    except BadImage as err:
        return None, Problem(
            file=file,
            line=line,
            image=str(path),
            message=f"cannot read image: {err}",
            fix="replace the damaged image or delete its annotation",
        )
    if declared and all(declared) and tuple(declared) == size[::-1] and orientation in _TURNED:
        return None, Problem(
            file=file, line=line, image=str(path),
            message=f"annotation says the image is {declared[0]}x{declared[1]}: the picture upright, as its EXIF "
            f"orientation ({orientation}) turns it, but loomlens reads {path.name!r} as stored, "
            f"{size[0]}x{size[1]}; skipped",
            fix="save the image upright (e.g. `mogrify -auto-orient`, or PIL's ImageOps.exif_transpose) and "
            "convert again: the boxes then fit",
        )
    if declared and all(declared) and tuple(declared) != size:
        return None, Problem(
            file=file,
            line=line,
            image=str(path),
            message=f"annotation says the image is {declared[0]}x{declared[1]} "
            f"but {path.name!r} is {size[0]}x{size[1]}; skipped",
            fix="re-annotate the resized image, or restore the original",
        )
    return size, None


def make_box(
    label: str,
    coords: Sequence[float],
    width: int,
    height: int,
    file: str,
    line: int | None = None,
) -> tuple[Box | None, list[Problem]]:
    """Raw (x1, y1, x2, y2) pixels -> a clean `Box`, or None. A label that cannot round-trip
    through Florence-2 text or a non-finite coordinate drops the box; a box reaching outside
    the image is clipped to it (reported when by more than `CLIP_TOLERANCE` pixels); one with no
    area inside it (reversed, or wholly outside) is dropped. Each is reported, once."""
    problems: list[Problem] = []
    try:
        label = validate_label(label)
    except LabelError as err:
        return None, [Problem(file=file, line=line, message=f"{err}; box dropped", fix="rename the class")]
    x1, y1, x2, y2 = coords
    if not all(math.isfinite(c) for c in coords):
        return None, [Problem(
            file=file, line=line, message=f"box {label!r} has a non-numeric coordinate {tuple(coords)}; dropped",
            fix="redraw the box",
        )]
    clipped = (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))
    cx1, cy1, cx2, cy2 = clipped
    if not (cx1 < cx2 and cy1 < cy2):
        outside = x1 < x2 and y1 < y2  # a box, all of it beyond the image: one problem, not clipped and dropped
        return None, [Problem(
            file=file, line=line,
            message=f"box {label!r} {_fmt(coords)} has no area inside the {width}x{height} image"
            f"{' (it lies wholly outside)' if outside else ''}; dropped",
            fix="redraw the box inside the image" if outside else "redraw the box, with xmin < xmax and ymin < ymax",
        )]
    overshoot = max(abs(a - b) for a, b in zip(clipped, coords, strict=True))
    # Under half a pixel out is a writer's rounding (YOLO's 6 decimals), not a mistake: clip quietly.
    if overshoot > CLIP_TOLERANCE:
        problems.append(Problem(
            file=file, line=line,
            message=f"box {label!r} {_fmt(coords)} reaches outside the {width}x{height} image; clipped",
            fix="redraw the box inside the image",
        ))
    return Box(label, cx1, cy1, cx2, cy2), problems


def add_box(record: ImageRecord, label: str, coords: Sequence[float], file: str,
            line: int | None = None) -> list[Problem]:
    """`make_box` in `record`'s image: the clean box is appended to `record.boxes`, a refused
    one counted in `record.dropped` (so an image whose every box was refused is not taken for
    a defect-free one). Returns the problems."""
    box, problems = make_box(label, coords, record.width, record.height, file, line)
    if box is None:
        record.dropped += 1
    else:
        record.boxes.append(box)
    return problems


def rotated_bounds(
    x1: float, y1: float, x2: float, y2: float, degrees: float, pivot: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The axis-aligned bounds of the rectangle (x1, y1)-(x2, y2) turned `degrees` clockwise
    (image y points down) about `pivot`: how a rotated box of CVAT (about its centre) or Label
    Studio (about its top-left corner) becomes a plain box."""
    if not degrees:
        return x1, y1, x2, y2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    px, py = pivot
    xs, ys = [], []
    for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
        xs.append(px + (x - px) * cos - (y - py) * sin)
        ys.append(py + (x - px) * sin + (y - py) * cos)
    return min(xs), min(ys), max(xs), max(ys)


def _fmt(coords: Sequence[float]) -> str:
    return "(" + ", ".join(f"{c:g}" for c in coords) + ")"

