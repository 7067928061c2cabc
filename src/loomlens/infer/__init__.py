"""Inference: one image's way from pixels to scored boxes, between `model` and its users.

Owns a model made ready to answer (`loading`: base + a run's adapter, merged, cast; `attention`:
kernels per call shape), images to pixels (`pixels`), generation with per-token log-probs
(`generation`), answers parsed into boxes with the tokens they came from (`parsing`), box scores
(`scoring`), the `<OD>` class grammar (`grammar`), batched scored detection (`detection`), a
batch's halves at once on a CPU (`streams`) and tiled detection on large frames (`tiling`).
Imports `data`, `model`, `run` and `config` only; `evaluate` and `predict` call it.
"""

from loomlens.infer.detection import Detection, detect, detect_with_details
from loomlens.infer.generation import Generation, generate
from loomlens.infer.loading import LoadedModel, load_for_inference

__all__ = ["Detection", "Generation", "LoadedModel", "detect", "detect_with_details", "generate", "load_for_inference"]
