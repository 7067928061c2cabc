"""`model_inputs` gives what the processor gives, faster: same prompts, same pixels."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from loomlens.model import load_model
from loomlens.infer.pixels import fast_pixels_apply, model_inputs


@pytest.fixture(scope="module")
def processor():
    return load_model("tiny")[1]


def images():
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: (rng.random((h, w, c)) * 255).astype("uint8")  # noqa: E731
    return [
        Image.fromarray(noise(288, 512, 3)),                 # a loom frame, downscaled
        Image.fromarray(noise(100, 61, 3)),                  # odd sizes, upscaled
        Image.fromarray(noise(256, 256, 4), mode="RGBA"),    # alpha dropped
        Image.fromarray(noise(90, 140, 1)[..., 0], mode="L"),  # grey to RGB
    ]


def test_same_prompts_and_pixels_as_the_processor(processor):
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>broken-weft", "<CAPTION>", "<OD>"]
    assert fast_pixels_apply(processor.image_processor)
    expected = processor(text=prompts, images=[im.convert("RGB") for im in images()], return_tensors="pt",
                         padding=True)
    got = model_inputs(processor, images(), prompts)
    assert set(got) == set(expected)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["pixel_values"].dtype == torch.float32
    # One uint8 step is 1/255/std ~ 0.017: any resize difference would show far above 1e-5.
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)


def test_other_image_paths_go_through_the_processor(processor):
    cropping = copy.deepcopy(processor)
    cropping.image_processor.do_center_crop = True
    assert not fast_pixels_apply(cropping.image_processor)
    expected = cropping(text=["<OD>"], images=images()[:1], return_tensors="pt")
    got = model_inputs(cropping, images()[:1], ["<OD>"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    slow = model_inputs(processor, images()[:1], ["<OD>"], fast=False)
    assert torch.equal(slow["pixel_values"], processor(text=["<OD>"], images=images()[:1],
                                                       return_tensors="pt")["pixel_values"])
