"""Florence-2 models: the loader (hub id, folder, embedded tiny), the tiny builder, LoRA."""

from loomlens.model.loader import ModelLoadError, load_model

__all__ = ["ModelLoadError", "load_model"]
