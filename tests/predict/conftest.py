"""A tiny-model `Predictor` shared by the prediction tests (placeholder weights: contracts only)."""

import pytest


@pytest.fixture(scope="session")
def predictor():
    from loomlens.predict import Predictor

    # Small budgets: the placeholder weights rarely say </s>, so answers run to the limit.
    return Predictor(model="tiny", max_boxes=2, batch_size=4, text_tokens=12)
