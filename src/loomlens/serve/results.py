"""A `loomlens.predict.Prediction` as JSON (the API) and as rows (the page's table)."""

from __future__ import annotations


def _polygon_parts(polygon) -> tuple[str, list[list[float]]]:
    """(label, [[x, y], ...]) from the contract's tuple or a `Polygon(label, points)`."""
    if hasattr(polygon, "points"):
        label, points = polygon.label, polygon.points
    else:
        label, points = polygon
    return str(label), [[round(float(x), 2), round(float(y), 2)] for x, y in points]


def prediction_json(prediction) -> dict:
    boxes = sorted(prediction.boxes, key=lambda b: -(b.score if b.score is not None else 1.0))
    return {
        "task": prediction.task,
        "width": int(prediction.width),
        "height": int(prediction.height),
        "detections": [
            {
                "label": b.label,
                # Unrounded: a client that sends back a score it saw as score_threshold keeps that box.
                "score": None if b.score is None else float(b.score),
                "box": [round(float(v), 2) for v in (b.x1, b.y1, b.x2, b.y2)],
            }
            for b in boxes
        ],
        "polygons": [dict(zip(("label", "points"), _polygon_parts(p), strict=True))
                     for p in prediction.polygons],
        "text": prediction.text or "",
        "trained": bool(getattr(prediction, "trained", True)),
        "tiled": bool(getattr(prediction, "tiled", False)),
        "dropped": int(getattr(prediction, "dropped", 0)),
        "scale": round(float(getattr(prediction, "scale", 1.0)), 4),
        # Unrounded, like the scores: near 1, rounding would tie frames a line ranks by it.
        "answer_probability": getattr(prediction, "answer_probability", None),
    }


TABLE_HEADERS = ["label", "score", "x1", "y1", "x2", "y2", "kind"]


def table_rows(result: dict) -> list[list]:
    rows = [
        [d["label"], "" if d["score"] is None else f"{d['score']:.3f}", *(f"{v:.1f}" for v in d["box"]), "box"]
        for d in result["detections"]
    ]
    for p in result["polygons"]:
        xs = [x for x, _ in p["points"]] or [0.0]
        ys = [y for _, y in p["points"]] or [0.0]
        rows.append([p["label"], "", f"{min(xs):.1f}", f"{min(ys):.1f}", f"{max(xs):.1f}",
                     f"{max(ys):.1f}", f"polygon ({len(p['points'])} points)"])
    return rows
