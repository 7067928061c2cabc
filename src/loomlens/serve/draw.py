"""Draw a prediction (as `results.prediction_json` gives it) onto a copy of the image."""

from __future__ import annotations

import hashlib

from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 176, 0), (200, 64, 255),
            (0, 200, 200), (255, 96, 176), (160, 160, 0)]
_KNOWN = {"drop": 0, "wrinkle": 1, "broken-weft": 2}


def label_colour(label: str) -> tuple[int, int, int]:
    index = _KNOWN.get(label)
    if index is None:
        index = int(hashlib.md5(label.encode()).hexdigest(), 16) % len(_PALETTE)
    return _PALETTE[index]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


def draw_result(image: Image.Image, result: dict) -> Image.Image:
    out = image.convert("RGB").copy()
    width, height = out.size
    line = max(2, round(min(width, height) / 300))
    font = _font(max(12, round(min(width, height) / 40)))
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    for polygon in result["polygons"]:
        points = [tuple(p) for p in polygon["points"]]
        if len(points) >= 3:
            fill.polygon(points, fill=(*label_colour(polygon["label"]), 80))
    out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")
    pen = ImageDraw.Draw(out)
    for polygon in result["polygons"]:
        points = [tuple(p) for p in polygon["points"]]
        colour = label_colour(polygon["label"])
        if len(points) >= 2:
            pen.line([*points, points[0]], fill=colour, width=line)
        if points:
            _tag(pen, points[0][0], points[0][1], polygon["label"], colour, font)
    for det in result["detections"]:
        x1, y1, x2, y2 = det["box"]
        colour = label_colour(det["label"])
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = det["label"] if det["score"] is None else f"{det['label']} {det['score']:.2f}"
        _tag(pen, x1, y1, text, colour, font)
    return out


def _tag(pen: ImageDraw.ImageDraw, x: float, y: float, text: str, colour, font) -> None:
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    w, h = right - left + 6, bottom - top + 4
    ty = y - h if y - h >= 0 else y
    pen.rectangle([x, ty, x + w, ty + h], fill=colour)
    pen.text((x + 3, ty + 2 - top), text, fill=(0, 0, 0), font=font)
