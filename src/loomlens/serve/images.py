"""Turn uploaded bytes into a decoded RGB image, or a clear `InputError`.

Order matters: the header is read first (`Image.open` decodes no pixels) and the pixel count is
checked against the limit before anything is decompressed, so a small file that claims 200
megapixels (a decompression bomb) costs nothing. Truncated files are rejected, never padded
(PIL's `LOAD_TRUNCATED_IMAGES` stays off). An image larger than the deployment's `max_side`
is downscaled as it is decoded (a JPEG is decoded at a reduced scale directly), so a request
holds at most `max_side`^2 pixels while it waits; the original size is returned with it so the
answer can be given in the uploaded image's pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from loomlens.data.sanitize import load_pixels, to_rgb
from loomlens.serve.errors import InputError

#: Default pixel limit: 50 MP, a dozen times the 2560x1440 loom frames.
DEFAULT_MAX_PIXELS = 50_000_000
#: Default longest side kept after decoding: a 4K camera frame passes untouched.
DEFAULT_MAX_SIDE = 4096
#: EXIF orientations that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)
#: Formats a camera or a person plausibly sends; anything else is "not an image" here.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


def set_pil_limit(max_pixels: int) -> None:
    """Make PIL's own bomb check agree with ours (PIL errors past 2x, warns past 1x)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def header_pixels(data: bytes) -> int | None:
    """The pixel count the image header of `data` claims (nothing is decoded), or None when the
    header cannot be read here (then `decode_image` says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                return image.width * image.height
    except Exception:  # noqa: BLE001 - a malformed header can raise almost anything; decode_image names it
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
                 ) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `data` into an RGB image (EXIF orientation applied, downscaled so its longer side
    is at most `max_side`) and the original (width, height), or raise `InputError`."""
    if not data:
        raise InputError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(413, "image_too_large",
                         f"the image has more pixels than the limit of {max_pixels / 1e6:g} MP") from None
    except UnidentifiedImageError:
        raise InputError(400, "not_an_image",
                         f"the upload is not an image loomlens reads ({', '.join(FORMATS)})") from None
    except Exception as exc:  # a malformed header can raise almost anything
        raise InputError(400, "bad_image", f"cannot read the image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(400, "bad_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(413, "image_too_large",
                         f"the image is {width}x{height} = {width * height / 1e6:.1f} MP; "
                         f"the limit is {max_pixels / 1e6:g} MP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if max_side and max(width, height) > max_side and image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale
            load_pixels(image)  # a 48-bit colour PNG or TIFF as predict reads it, not PIL's top bytes
            # after: a PNG's EXIF may follow its pixels, and PIL decodes them to reach it
            original = (height, width) if image.getexif().get(0x0112, 1) in _TRANSPOSED else (width, height)
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
            if max_side and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower() or "premature" in text.lower():
            raise InputError(400, "truncated_image", f"the image is truncated: {text}") from None
        raise InputError(400, "bad_image", f"cannot decode the image: {text}") from None
    except Exception as exc:
        raise InputError(400, "bad_image", f"cannot decode the image: {exc}") from None
    return image, original


def decode_base64(value) -> bytes:
    """Bytes from a base64 string, with or without a `data:image/...;base64,` prefix."""
    if not isinstance(value, str):
        raise InputError(422, "missing_image",
                         "JSON bodies need an 'image' field holding the image as base64 text")
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", "the 'image' field is not valid base64") from None
