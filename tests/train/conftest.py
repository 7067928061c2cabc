"""A very small Florence-2 and dataset for training tests: seconds per run, not minutes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from loomlens.data.florence_text import boxes_to_text
from loomlens.data.records import Box
from loomlens.model.tiny import TinyShape, build_tiny

#: The tiny architecture shrunk further (64 px, 4x4 grid, one layer per side).
SMALL = TinyShape(
    image_size=64, vision_dims=[16, 32, 64], vision_depths=[1, 1, 1], vision_heads=[1, 2, 4], window_size=4,
    d_model=64, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=128, max_target_positions=64,
)
CLASSES = ["drop", "wrinkle"]


@pytest.fixture(autouse=True)
def one_thread():
    """The small model's ops are too small for two threads: on a busy CPU the second one only
    waits (measured: 3-10x slower under load). Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A saved random `SMALL` Florence-2 (model + processor) folder."""
    model, processor, _ = build_tiny(SMALL, seed=0)
    folder = tmp_path_factory.mktemp("small-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _write_split(root: Path, split: str, count: int, rng: random.Random, size: tuple[int, int] = (96, 64)) -> None:
    lines = []
    width, height = size
    for i in range(count):
        name = f"images/{split}_{i}.png"
        image = Image.new("RGB", size, (rng.randrange(200), 120, 80))
        draw = ImageDraw.Draw(image)
        boxes = []
        for _ in range(rng.randrange(3)):
            x, y = rng.randrange(width - 26), rng.randrange(height - 24)
            label = rng.choice(CLASSES)
            draw.rectangle([x, y, x + 20, y + 18], fill=(250, 250, 250) if label == "drop" else (10, 10, 10))
            boxes.append(Box(label, x, y, x + 20, y + 18))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
        base = {"image": name, "width": width, "height": height, "source": name}
        lines.append({**base, "prefix": "<OD>", "suffix": boxes_to_text(boxes, width, height), "task": "od"})
        for label in sorted({b.label for b in boxes}):
            suffix = boxes_to_text([b for b in boxes if b.label == label], width, height)
            lines.append({**base, "prefix": f"<CAPTION_TO_PHRASE_GROUNDING>{label}", "suffix": suffix,
                          "task": "phrase_grounding"})
    (root / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A converted-style dataset folder: 12 train and 4 val images, od + phrase_grounding."""
    root = tmp_path_factory.mktemp("small-data")
    rng = random.Random(0)
    _write_split(root, "train", 12, rng)
    _write_split(root, "val", 4, rng)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "summary.json").write_text(json.dumps({"tile": None, "classes": CLASSES}))
    return root


@pytest.fixture(scope="session")
def strip_data(tmp_path_factory) -> Path:
    """Like `small_data`, but 8 train and 2 val line-scan strips of 192x64: three times the
    small model's 64 px input, so the defect crop shows them a window at a time."""
    root = tmp_path_factory.mktemp("strip-data")
    rng = random.Random(1)
    _write_split(root, "train", 8, rng, size=(192, 64))
    _write_split(root, "val", 2, rng, size=(192, 64))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "summary.json").write_text(json.dumps({"tile": None, "classes": CLASSES}))
    return root


@pytest.fixture(scope="session")
def input_size_data(tmp_path_factory) -> Path:
    """4 train frames of 64x48: no longer than the small model's 64 px input on either side."""
    root = tmp_path_factory.mktemp("input-size-data")
    _write_split(root, "train", 4, random.Random(2), size=(64, 48))
    return root


@pytest.fixture
def make_config(small_data, small_model_dir, tmp_path):
    """`make_config(**settings)` -> a fast `TrainConfig` on the small model and data."""
    from loomlens.config import TrainConfig, load_config

    def make(**settings) -> TrainConfig:
        base = {
            "data": str(small_data), "model": str(small_model_dir), "out": str(tmp_path / "run"),
            "batch_size": 4, "lr": 1e-2, "max_steps": 4, "eval_every": 2, "eval_max_images": 0,
            "progress": False, "tensorboard": False, "lora": {"r": 4, "dropout": 0.1},
            # exact fp32 maths, whatever the CPU: `auto` is bf16 where it has bf16 instructions
            "precision": "fp32",
            # the recipe on a CPU on every machine (`auto` takes CUDA where there is one); CUDA runs
            # are the gpu-marked tests' and bench.gpu_first_contact's
            "device": "cpu",
        }
        return load_config(TrainConfig, base=base, overrides=settings)

    return make


class Killed(BaseException):
    """Stands for the training process being killed (SIGKILL, a power cut). A BaseException,
    so nothing on the way out can take it for an error to handle."""


@pytest.fixture
def train_killed(monkeypatch):
    """`train_killed(cfg, step)`: `train(cfg)` killed right after it saved `last/` at `step`.

    Wraps `recipe.save` to raise `Killed` once that save is on disk, and leaves the run folder
    as the kill does, to be resumed with `train(..., resume=True)`. The run must save at `step`
    (`save_every`, or an evaluation); if it does not, the run finishes and this fails."""
    from loomlens.train import recipe

    def run(cfg, step: int) -> None:
        save = recipe.save

        def save_then_die(s, **kwargs) -> None:
            save(s, **kwargs)
            if s.state.step == step:
                raise Killed(f"killed after the save of step {step}")

        with monkeypatch.context() as patched:
            patched.setattr(recipe, "save", save_then_die)
            with pytest.raises(Killed):
                recipe.train(cfg)

    return run


def assert_same_steps(a: dict, b: dict, *, rtol: float, atol: float, share: float = 1e-3) -> None:
    """Adapter weights `a` and `b` (name -> tensor) of two runs that take the same steps up to
    rounding: each tensor close, but for at most `share` of its elements. Adam divides each
    gradient by its own running size, so an element whose gradient is within rounding of zero
    (a vocabulary row of lm_head no answer uses) may move by a whole step one way in one run and
    the other way in the other; a wrong step moves most elements."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        off = ~torch.isclose(a[key], b[key], rtol=rtol, atol=atol)
        assert off.float().mean().item() <= share, (key, int(off.sum()), off.numel())
