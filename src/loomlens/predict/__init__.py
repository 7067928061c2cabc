"""Prediction: the `Predictor` (every Florence-2 task, batched, tiled), region rules, video,
drawing, and writing results for files."""

from loomlens.predict.predictor import Prediction, Predictor
from loomlens.predict.regions import RegionRules, load_rules, save_rules

__all__ = ["Prediction", "Predictor", "RegionRules", "load_rules", "save_rules"]
