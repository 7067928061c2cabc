"""loomlens: fine-tune Florence-2 with LoRA to find fabric defects, and run it on the line."""

__version__ = "0.1.0"
