"""Fixtures shared by the test folders: the tiny model, loaded once (placeholder weights: contracts only)."""

import pytest


@pytest.fixture(scope="session")
def tiny():
    """`(model, processor)` of the embedded tiny Florence-2."""
    from loomlens.model import load_model

    return load_model("tiny")
