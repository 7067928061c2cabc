"""Training's pixels (`processor.image_processor`, as data/dataset.py calls it) equal inference's
(`infer.pixels.model_inputs`) for both image-processor backends transformers offers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from loomlens.infer.pixels import fast_pixels_apply, model_inputs
from loomlens.model.tiny import IMAGENET_MEAN, IMAGENET_STD

BACKENDS = [
    "pil",
    pytest.param("torchvision", marks=pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="torchvision is not installed: transformers' fast (torchvision) image processor cannot be built")),
]


def florence_processor(tiny_processor, backend: str):
    """The tiny processor with a Florence-2 image processor (768 px settings at 96 px) of `backend`."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, Florence2Processor

    kind = {"pil": CLIPImageProcessorPil, "torchvision": CLIPImageProcessor}[backend]
    image_processor = kind(
        do_resize=True, size={"height": 96, "width": 96}, resample=3, do_center_crop=False,
        crop_size={"height": 96, "width": 96}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    image_processor.image_seq_length = tiny_processor.image_processor.image_seq_length
    return Florence2Processor(image_processor=image_processor, tokenizer=tiny_processor.tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_and_inference_see_the_same_pixels(tiny, backend):
    processor = florence_processor(tiny[1], backend)
    rng = np.random.default_rng(1)
    frames = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((240, 320), (50, 70))]
    training = torch.stack([processor.image_processor(images=[im], return_tensors="pt").pixel_values[0]
                            for im in frames])
    inference = model_inputs(processor, frames, ["<OD>"] * len(frames))["pixel_values"]
    assert fast_pixels_apply(processor.image_processor) == (backend == "pil")
    # One uint8 step is 1/255/std ~ 0.017: a different resize kernel would show far above this.
    torch.testing.assert_close(inference.float(), training.float(), rtol=0, atol=1e-5)


def test_loomlens_loads_the_pil_image_processor_everywhere():
    """Where torchvision imports, transformers alone picks its torchvision processor (other
    resize, other pixels); loomlens's loader keeps PIL's on every machine."""
    from transformers import AutoProcessor
    from transformers.image_processing_backends import PilBackend

    from loomlens.model import load_model
    from loomlens.model.loader import load_processor, resolve_model_path

    folder = resolve_model_path("tiny")
    assert isinstance(load_processor(folder).image_processor, PilBackend)
    assert isinstance(load_model("tiny")[1].image_processor, PilBackend)
    plain = AutoProcessor.from_pretrained(folder).image_processor
    assert isinstance(plain, PilBackend) == (importlib.util.find_spec("torchvision") is None)
    assert load_processor(folder).tokenizer.init_kwargs.get("backend") != "pil"  # the tokenizer is left alone
