"""The tiny model, loaded once for the evaluation tests (placeholder weights: contracts only)."""

import pytest


@pytest.fixture(scope="session")
def tiny():
    """`(model, processor)` of the embedded tiny Florence-2."""
    from loomlens.model import load_model

    return load_model("tiny")
