"""Exports of a trained model for other runtimes: ONNX parts for onnxruntime (`export/onnx.py`)."""

from loomlens.export.onnx import ExportCheckFailed, FrameCheck, export_onnx

__all__ = ["ExportCheckFailed", "FrameCheck", "export_onnx"]
