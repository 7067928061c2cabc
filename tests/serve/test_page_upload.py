"""The page's upload reaches the model as the file that was uploaded (no browser, no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from loomlens.serve.images import decode_image
from loomlens.serve.page import build_page


def test_page_passes_a_16_bit_grey_frame_through_unchanged(tmp_path):
    """A 16-bit grey PNG (industrial cameras) went through Gradio's RGB conversion, which clips
    every value over 255 to white: the page found nothing where the API found the defect."""
    import gradio as gr
    from gradio.data_classes import ImageData

    ramp = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    page = build_page(service=None, examples=[])
    upload = next(b for b in page.blocks.values() if isinstance(b, gr.Image) and b.elem_id == "input-image")
    given = upload.preprocess(ImageData(path=str(path), orig_name="grey16.png"))
    image, size = decode_image(Path(given).read_bytes())
    assert size == (64, 32)
    assert np.asarray(image.convert("L")).std() > 20  # the ramp survived, not a white frame


def test_a_48_bit_colour_upload_is_the_picture_predict_reads(tmp_path):
    """A 12-bit colour PNG or TIFF in 48 bits reached the model nearly black: PIL keeps each
    sample's top byte, where predict, eval and training read it scaled as a 16-bit grey one."""
    import pytest

    from loomlens.data.sanitize import read_rgb

    cv2 = pytest.importorskip("cv2")
    ramp = np.linspace(0, 4095, 64 * 32).reshape(32, 64).astype(np.uint16)
    for suffix in (".png", ".tif"):
        path = tmp_path / f"colour48{suffix}"
        cv2.imwrite(str(path), np.stack([ramp // 3, ramp // 2, ramp], axis=-1))  # BGR: red the brightest
        image, size = decode_image(path.read_bytes())
        assert size == (64, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(read_rgb(path))) and np.asarray(image).max() == 255



def test_a_bomb_is_refused_naming_the_servers_limit_only(monkeypatch):
    import pytest

    from loomlens.serve.errors import InputError

    from .helpers import png_bomb

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)  # what `set_pil_limit` gives the server
    with pytest.raises(InputError) as caught:
        decode_image(png_bomb(), max_pixels=50_000_000)
    assert caught.value.status == 413 and caught.value.message == "the image has more pixels than the limit of 50 MP"
