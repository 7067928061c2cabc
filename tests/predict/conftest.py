"""A tiny-model `Predictor` shared by the prediction tests (placeholder weights: contracts only)."""

import pytest


@pytest.fixture(scope="session")
def predictor():
    from loomlens.predict import Predictor

    # Small budgets: the placeholder weights rarely say </s>, so answers run to the limit.
    return Predictor(model="tiny", max_boxes=2, batch_size=4, text_tokens=12)


@pytest.fixture()
def fixed_detections(predictor, monkeypatch):
    """`fixed_detections(boxes)`: from then on, within the test, every whole image `predictor`
    detects on answers `boxes` (pixels of that image), so what follows the model is tested on
    known boxes instead of on whatever the tiny weights happen to say."""

    from loomlens.infer.detection import Detection
    from loomlens.infer.generation import Generation

    def found(boxes) -> Detection:  # what detect_with_details returns, fixed
        return Detection(list(boxes), 0, Generation(text="", token_ids=[], token_logprobs=[]))

    def fix(boxes):
        monkeypatch.setattr(predictor, "_detect", lambda spec, images, text, after_batch=None, reread_upto=None: [found(boxes) for _ in images])

    return fix
