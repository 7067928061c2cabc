"""`tiny-hr` by name: found where the maintainer puts it, a clear error (folder and command)
where it is not, and the CLI takes `--model tiny-hr` as it takes `--model tiny`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.model import ModelLoadError, load_model, loader
from loomlens.model.tiny import TinyShape, build_tiny

SMALL = dict(vision_dims=[16, 32, 64], vision_heads=[1, 2, 4], vision_depths=[1, 1, 1], d_model=64, ffn_dim=128)


@pytest.fixture()
def absent(monkeypatch, tmp_path):
    """`tiny-hr` pointed at a folder that does not exist, whatever the checkout ships."""
    folder = tmp_path / "tiny-hr-florence2"
    monkeypatch.setitem(loader.EMBEDDED, "tiny-hr", replace(loader.EMBEDDED["tiny-hr"], folder=folder))
    return folder


@pytest.fixture(scope="module")
def small_hr(tmp_path_factory):
    """A small 96 px model folder laid out as the pretraining exports one."""
    folder = tmp_path_factory.mktemp("tiny-hr-florence2")
    model, processor, _ = build_tiny(TinyShape(image_size=96, **SMALL), seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "pretrain_config.json").write_text(json.dumps({"task_mix": {"od": 1.0}}))
    return folder


@pytest.fixture()
def present(monkeypatch, small_hr):
    monkeypatch.setitem(loader.EMBEDDED, "tiny-hr", replace(loader.EMBEDDED["tiny-hr"], folder=small_hr))
    return small_hr


def test_an_absent_tiny_hr_names_its_folder_and_the_command_that_makes_it(absent) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model("tiny-hr")
    assert str(absent) in str(err.value) and "scripts/pretrain-fabric.sh" in str(err.value)


def test_a_present_tiny_hr_loads_by_name_with_its_own_input_size(present) -> None:
    from loomlens.infer.loading import base_tasks

    model, processor = load_model("tiny-hr")
    assert not model.training and processor.image_processor.size["height"] == 96
    assert base_tasks("tiny-hr") == frozenset({"od"})  # an embedded model: its pretraining record


def test_predict_takes_model_tiny_hr(present, tmp_path) -> None:
    Image.new("RGB", (120, 80), (90, 90, 90)).save(tmp_path / "im.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(out), "--model", "tiny-hr",
                                      "--max-boxes", "2", "--no-draw"])
    assert result.exit_code == 0, result.output
    assert (out / "predictions.jsonl").exists()


def test_predict_says_where_an_absent_tiny_hr_should_be(absent, tmp_path) -> None:
    Image.new("RGB", (120, 80)).save(tmp_path / "im.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "im.png"), "--out", str(tmp_path / "out"),
                                      "--model", "tiny-hr"])
    assert result.exit_code == 1 and "tiny-hr-florence2" in result.output, result.output


def test_the_shipped_tiny_hr_reads_384_px_and_finds_held_out_shapes(caplog) -> None:
    """The asset in the package: plain transformers loads every weight, it reads 384 px as a
    24 x 24 grid, shares the tiny's tokenizer (so the tiny's class-word checks hold), and it
    looks: on held-out generic scenes of its own size it finds the shapes (its card: 0.83)."""
    import logging

    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from loomlens.data.shapes import SHAPE_CLASSES
    from loomlens.evaluate.metrics import coco_metrics
    from loomlens.infer import detect
    from loomlens.train.pretrain import draw_scenes

    folder = loader.EMBEDDED["tiny-hr"].folder
    with caplog.at_level(logging.WARNING):
        model = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
    noisy = [r.getMessage() for r in caplog.records if "newly initialized" in r.getMessage() or "missing" in r.getMessage().lower()]
    assert not noisy, noisy
    assert processor.image_processor.size["height"] == 384 and processor.image_processor.image_seq_length == 577
    _, tiny = load_model("tiny")
    assert processor.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    scenes, _ = draw_scenes([123_456, 0], 24, size=384, max_objects=4, fabric_share=0.0)
    found = detect(model, processor, [s.image for s in scenes], max_boxes=6, batch_size=8)
    assert coco_metrics([s.boxes for s in scenes], found, list(SHAPE_CLASSES))["map50"] > 0.5
