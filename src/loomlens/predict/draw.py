"""Draw a prediction onto a copy of its image: each box, polygon and label exactly once (the
seed drew every box twice, once per drawing library it used)."""

from __future__ import annotations

import zlib

from PIL import Image, ImageDraw, ImageFont

from loomlens.data.tasks import get_task
from loomlens.predict.predictor import Prediction

#: The longest side a JPEG holds (libjpeg's limit); a line-scan strip can be longer.
JPEG_MAX_SIDE = 65500

PALETTE = [(255, 70, 70), (255, 210, 0), (0, 220, 255), (120, 255, 80), (255, 120, 255), (255, 150, 40),
           (150, 130, 255), (60, 255, 190)]


def colour(label: str) -> tuple[int, int, int]:
    """A stable colour per label (the same in every image and every run)."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def fit_jpeg(image: Image.Image) -> Image.Image:
    """`image` as it can be saved as a JPEG: itself when no side is over `JPEG_MAX_SIDE`, else
    a copy shrunk to fit (aspect kept). In: a picture to look at (drawn, an event's frame);
    out: one whose save never fails on its size, where a longer strip's would raise OSError."""
    if max(image.size) <= JPEG_MAX_SIDE:
        return image
    scale = JPEG_MAX_SIDE / max(image.size)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def draw_prediction(image: Image.Image, prediction: Prediction) -> Image.Image:
    """A copy of `image` with the prediction's polygons, boxes, labels and scores drawn, and
    the answer of a text task (caption, OCR) written along the bottom."""
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    # By the shorter side: on a long line-scan strip the longer one would make labels and
    # lines tall enough to hide the small defects they mark.
    scale = min(out.width, out.height) / 1000
    line = max(1, round(2 * scale))
    font = ImageFont.load_default(size=max(10, round(14 * scale)))

    def tag(x: float, y: float, text: str, fill) -> None:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="lb")
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=fill)
        draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor="lb")

    for label, points in prediction.polygons:
        draw.polygon([tuple(p) for p in points], outline=colour(label), width=line)
        tag(points[0][0], points[0][1], label, colour(label))
    for box in prediction.boxes:
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=colour(box.label), width=line)
        tag(box.x1, box.y1, box.label if box.score is None else f"{box.label} {box.score:.2f}", colour(box.label))
    if prediction.text and get_task(prediction.task).answer == "text":
        tag(4, out.height - 4, prediction.text[:200], (255, 255, 255))
    return out
