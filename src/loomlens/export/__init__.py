"""Exports of a trained model for other runtimes: ONNX parts for onnxruntime (`export/onnx.py`)."""

from loomlens.export.onnx import (
    ExportCheckFailed,
    FrameCheck,
    export_onnx,
    write_export,
)

__all__ = ["ExportCheckFailed", "FrameCheck", "export_onnx", "write_export"]
