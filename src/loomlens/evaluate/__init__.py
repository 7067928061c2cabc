"""Evaluation: generation with scores, score-aligned parsing, COCO metrics, plots, the report."""

from loomlens.evaluate.detection import Detection, detect, detect_with_details
from loomlens.evaluate.generation import Generation, generate
from loomlens.evaluate.metrics import coco_metrics
from loomlens.evaluate.report import evaluate_jsonl, write_report

__all__ = [
    "Detection", "Generation", "coco_metrics", "detect", "detect_with_details", "evaluate_jsonl", "generate",
    "write_report",
]
