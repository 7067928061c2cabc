"""Evaluation: matching, COCO and inspection metrics, PR curves, confusion matrix, the report.
The model's answers come from `loomlens.infer`."""

from loomlens.evaluate.metrics import coco_metrics
from loomlens.evaluate.report import evaluate_jsonl, write_report

__all__ = ["coco_metrics", "evaluate_jsonl", "write_report"]
