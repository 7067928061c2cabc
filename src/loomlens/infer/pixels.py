"""Images to model inputs for a batch of images and prompts: the processor's text, and its
pixels made faster where its image path is plain resize -> rescale -> normalize.

In: a processor, PIL images, prompts. Out: `input_ids`, `attention_mask`, `pixel_values`.
Florence-2's image processor (CLIP's, PIL backend) converts every image to float numpy arrays
and rescales, normalises and transposes each one in turn, a noticeable share of a whole `<OD>`
answer. `model_inputs` resizes each image with PIL exactly as the processor would (same size,
same filter), lets the processor build the prompts and turn the uint8 pixels into a tensor (no
float work), and rescales and normalises the whole batch at once in torch: the same uint8
pixels, values within 1e-6 (timings in docs/benchmarks.md). transformers' own faster processor
needs torchvision, which loomlens avoids; where torchvision is installed and a processor uses
that backend (it resizes with torchvision's own kernel), `model_inputs` runs the processor's own
path, so inference sees the pixels training saw (`processor.image_processor`, data/dataset.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from loomlens.data.sanitize import to_rgb

__all__ = ["fast_pixels_apply", "model_inputs"]


def fast_pixels_apply(image_processor) -> bool:
    """Whether `image_processor` is PIL-backed and only resizes to a fixed height x width,
    rescales and normalises (Florence-2's configs do): the case `model_inputs` speeds up with
    PIL's resize. A torchvision-backed processor resizes differently and keeps its own path."""
    from transformers.image_processing_backends import PilBackend

    size = getattr(image_processor, "size", None)
    return (
        isinstance(image_processor, PilBackend)
        and getattr(image_processor, "do_resize", False) is True
        and isinstance(getattr(image_processor, "resample", None), int)
        and bool(getattr(size, "height", None)) and bool(getattr(size, "width", None))
        and not getattr(image_processor, "do_center_crop", False)
        and not getattr(image_processor, "do_pad", False)
        and getattr(image_processor, "do_rescale", False) is True
        and getattr(image_processor, "do_normalize", False) is True
    )


def model_inputs(processor, images: Sequence[Image.Image], prompts: Sequence[str], fast: bool = True) -> dict:
    """`processor(text=prompts, images=images)` as tensors (`input_ids`, `attention_mask`,
    `pixel_values` in fp32), padded to the longest prompt. `fast=False`, or an image processor
    `fast_pixels_apply` rejects, runs the processor's own image path."""
    rgb = [im if im.mode == "RGB" else to_rgb(im) for im in images]  # an RGB image needs no copy
    ip = processor.image_processor
    if not (fast and fast_pixels_apply(ip)):
        return processor(text=list(prompts), images=rgb, return_tensors="pt", padding=True)
    resized = [im.resize((ip.size.width, ip.size.height), Image.Resampling(ip.resample)) for im in rgb]
    inputs = processor(text=list(prompts), images=resized, return_tensors="pt", padding=True,
                       do_resize=False, do_rescale=False, do_normalize=False)
    mean = torch.tensor(ip.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(ip.image_std).view(1, -1, 1, 1)
    inputs["pixel_values"] = inputs["pixel_values"].float().mul_(ip.rescale_factor).sub_(mean).div_(std)
    return inputs
