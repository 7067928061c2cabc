"""The pretraining recipe's parts: soft loc loss, dense targets, spatial prior, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loomlens.data.shapes import SHAPE_CLASSES, make_scene
from loomlens.model.tiny import TinyShape, build_tiny
from loomlens.model.tokenizer import loc_token_ids
from loomlens.config import PretrainConfig
from loomlens.train.pretrain import draw_scenes, main, pretrain, progress, scene_classes, seq_loss
from loomlens.train.spatial_loss import dense_targets, pointer_loss, pointer_mask, pointer_targets

LOC0 = 100  # a fake vocabulary: 100 text tokens, then 1000 loc tokens


def _logits_peaked_at(bins: list[int], vocab: int = 1100) -> torch.Tensor:
    logits = torch.zeros(1, len(bins), vocab)
    for i, b in enumerate(bins):
        logits[0, i, LOC0 + b] = 10.0
    return logits


def test_soft_loc_loss_rewards_near_misses() -> None:
    labels = torch.tensor([[LOC0 + 500]])
    near, _ = seq_loss(_logits_peaked_at([505]), labels, LOC0, sigma=10.0)
    far, _ = seq_loss(_logits_peaked_at([900]), labels, LOC0, sigma=10.0)
    assert near < far


def test_soft_loc_loss_with_tiny_sigma_is_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1100)
    labels = torch.tensor([[LOC0 + 3, 5, -100], [7, LOC0 + 999, LOC0]])
    loss, loc_nll = seq_loss(logits, labels, LOC0, sigma=1e-3)
    logp = torch.log_softmax(logits, -1)
    picks = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    expected = -sum(logp[b, t, labels[b, t]] for b, t in picks) / len(picks)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    loc = [(0, 0), (1, 1), (1, 2)]
    assert math.isclose(loc_nll.item(), (-sum(logp[b, t, labels[b, t]] for b, t in loc) / 3).item(), rel_tol=1e-5)


def test_dense_targets_peak_at_each_object_centre() -> None:
    scene = make_scene(np.random.default_rng(3), 256, max_objects=3, empty_fraction=0.0)
    heat, reg, mask = dense_targets([scene], grid=16, size=256, classes=SHAPE_CLASSES)
    assert mask.sum() == len(scene.boxes)
    for box in scene.boxes:
        gx, gy = int((box.x1 + box.x2) / 2 / 16), int((box.y1 + box.y2) / 2 / 16)
        assert heat[0, SHAPE_CLASSES.index(box.label), gy, gx] == 1.0
        assert math.isclose(math.exp(reg[0, 2, gy, gx]) * 16, box.width, rel_tol=1e-4)


def test_spatial_prior_maps_a_cell_position_to_its_loc_bins() -> None:
    """The projector's position code of column c scores <loc_N> near c's centre highest."""
    model, processor, shape = build_tiny(TinyShape(), seed=0)
    projector = model.model.multi_modal_projector.image_position_embed
    loc = torch.tensor(loc_token_ids(processor.tokenizer))
    embeddings = model.get_input_embeddings().weight[loc]
    half = projector.column_embeddings.weight.shape[1]
    for column in (0, 5, 15):
        code = projector.column_embeddings.weight[column]
        scores = embeddings[:, :half] @ code
        centre_bin = (column + 0.5) / shape.grid * 1000
        assert abs(int(scores.argmax()) - centre_bin) < 1000 / shape.grid / 2


SMALL = {"vision_dims": [16, 32, 64], "vision_heads": [1, 2, 4], "vision_depths": [1, 1, 1], "d_model": 64,
         "ffn_dim": 128}


@pytest.mark.parametrize("fabric_share", [0.0, 0.5])
def test_pretrain_resumes_exactly(tmp_path, fabric_share) -> None:
    common = dict(batch_size=2, eval_every=1000, eval_images=2, save_every=1, one_object_steps=1,
                  fabric_share=fabric_share, shape={**TinyShape().__dict__, **SMALL})
    straight = pretrain(PretrainConfig(out=str(tmp_path / "a"), steps=3, **common), log=lambda *_: None)
    # Interrupted after its first step, then resumed; the data of each step comes from workers.
    first = pretrain(PretrainConfig(out=str(tmp_path / "b"), steps=3, stop_at=1, **common), log=lambda *_: None)
    assert first["step"] == 1 and not first["done"]
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "b"), steps=3, workers=2, **common), log=lambda *_: None)
    assert resumed["done"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert "map50" in lines[-1] and "loc_nll_shuffled" in lines[-1]


def test_pointer_targets_follow_each_coordinate_edge() -> None:
    # one box: x1=100, y1=300, x2=400, y2=500 bins on a 4x4 grid -> cols 0..1, rows 1..2
    labels = torch.tensor([[0, 5, LOC0 + 100, LOC0 + 300, LOC0 + 400, LOC0 + 500, 2, -100]])
    targets = pointer_targets(labels, LOC0, grid=4)
    assert targets == [
        (0, 2, [1 + 1 * 4 + 0, 1 + 2 * 4 + 0]),  # x1: left column, rows 1..2
        (0, 3, [1 + 1 * 4 + 0, 1 + 1 * 4 + 1]),  # y1: top row, cols 0..1
        (0, 4, [1 + 1 * 4 + 1, 1 + 2 * 4 + 1]),  # x2: right column
        (0, 5, [1 + 2 * 4 + 0, 1 + 2 * 4 + 1]),  # y2: bottom row
    ]


def test_shipped_uint8_pixels_normalise_to_the_processors_input() -> None:
    from loomlens.train.pretrain import Batcher, make_batch, normalize_pixels

    _, processor, shape = build_tiny(TinyShape(), seed=0)
    cfg = PretrainConfig(batch_size=3, one_object_steps=0)
    batch = make_batch(cfg, 5, shape=shape, batcher=Batcher(processor), loc_start=loc_token_ids(processor.tokenizer)[0])
    assert batch["pixel_values"].dtype == torch.uint8
    rng = np.random.default_rng([cfg.seed, 5])
    images = [make_scene(rng, shape.image_size, max_objects=cfg.max_objects).image for _ in range(3)]
    expected = processor(text=["<OD>"] * 3, images=images, return_tensors="pt").pixel_values
    assert torch.allclose(normalize_pixels(batch["pixel_values"], processor.image_processor), expected, atol=1e-6)


def test_pointer_mask_marks_exactly_the_target_cells() -> None:
    labels = torch.tensor([[0, 5, LOC0 + 100, LOC0 + 300, LOC0 + 400, LOC0 + 500, 2, -100]])
    mask = pointer_mask(labels, LOC0, grid=4, encoder_length=20)
    assert mask.shape == (1, 8, 20)
    marked = {(b, t, c) for b, t, c in mask.nonzero().tolist()}
    assert marked == {(b, t, c) for b, t, cells in pointer_targets(labels, LOC0, 4) for c in cells}


def test_pointer_loss_is_low_when_attention_sits_on_the_target() -> None:
    mask = torch.zeros(1, 3, 6)
    mask[0, 1, [3, 4]] = 1.0
    on = torch.zeros(1, 2, 3, 6)
    on[0, :, 1, 3] = 1.0
    off = torch.zeros(1, 2, 3, 6)
    off[0, :, 1, 0] = 1.0
    assert pointer_loss(on, mask) < 1e-5 < pointer_loss(off, mask)
    assert pointer_loss(off, torch.zeros(1, 3, 6)) == 0.0


def test_a_time_budget_paces_the_schedule_as_fine_tuning_does() -> None:
    from loomlens.train.schedule import GRACE

    cfg = PretrainConfig(steps=1000, time_budget=100.0)
    grace = GRACE * 100.0
    assert math.isclose(progress(cfg, 100, elapsed=50.0), (50.0 - grace) / (100.0 - grace))  # time leads
    assert progress(cfg, 700, elapsed=10.0) == 0.7
    assert progress(cfg, 10, elapsed=500.0) == 1.0
    assert progress(PretrainConfig(steps=1000), 250, elapsed=1e9) == 0.25


def test_finished_pretraining_exports_a_plain_transformers_model(tmp_path) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from loomlens.train.pretrain import finish_pretraining

    cfg = PretrainConfig(out=str(tmp_path / "work"), steps=1, batch_size=2, eval_images=2, device="cpu",
                         shape={**TinyShape().__dict__, "vision_dims": [16, 32, 64], "vision_heads": [1, 2, 4],
                                "vision_depths": [1, 1, 1], "d_model": 64, "ffn_dim": 128})
    result = pretrain(cfg, log=lambda *_: None)
    figures = finish_pretraining(result, cfg, tmp_path / "asset")
    assert {"pretrained", "random_init"} <= set(figures)
    model = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "asset")
    processor = AutoProcessor.from_pretrained(tmp_path / "asset")
    assert processor.image_processor.image_seq_length == 257
    assert json.loads((tmp_path / "asset" / "pretrain_config.json").read_text())["steps"] == 1
    trained = result["model"].state_dict()
    assert all(torch.allclose(v.float(), trained[k].half().float()) for k, v in model.state_dict().items())


def test_the_maintainer_command_validates_its_settings(tmp_path, capsys) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown device"):
        main(["--work", str(tmp_path / "w"), "--device", "gpu"])
    with pytest.raises(ValidationError, match="steps"):
        main(["--work", str(tmp_path / "w"), "--steps", "0"])
    assert not (tmp_path / "w").exists()


def test_an_old_pickled_state_is_refused(tmp_path) -> None:
    from loomlens.train.checkpoint import UnsafeCheckpointError

    (tmp_path / "state.pt").write_bytes(b"not read")
    with pytest.raises(UnsafeCheckpointError, match="state.pt.*pickle"):
        pretrain(PretrainConfig(out=str(tmp_path), steps=1), log=lambda *_: None)


def test_fabric_share_mixes_the_families_from_the_seed_alone() -> None:
    from loomlens.data.fabric_scenes import FABRIC_CLASSES

    a, _ = draw_scenes([0, 7], 24, size=96, max_objects=3, fabric_share=0.5)
    b, _ = draw_scenes([0, 7], 24, size=96, max_objects=3, fabric_share=0.5)
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    labels = {box.label for s in a for box in s.boxes}
    assert labels & set(FABRIC_CLASSES) and labels & set(SHAPE_CLASSES)
    # No fabric: exactly the generic scenes a run drew before fabric existed.
    generic, _ = draw_scenes([0, 7], 4, size=96, max_objects=3, fabric_share=0.0)
    rng = np.random.default_rng([0, 7])
    assert [s.image.tobytes() for s in generic] == [make_scene(rng, 96, max_objects=3).image.tobytes() for _ in range(4)]
    assert scene_classes(PretrainConfig()) == SHAPE_CLASSES
    assert scene_classes(PretrainConfig(fabric_share=0.5)) == SHAPE_CLASSES + FABRIC_CLASSES


def test_a_warm_started_fabric_run_at_a_larger_size_exports_and_reloads(tmp_path) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from loomlens.train.pretrain import finish_pretraining

    quick = dict(steps=1, batch_size=2, eval_images=2, one_object_steps=0)
    first = PretrainConfig(out=str(tmp_path / "w64"), shape={**SMALL, "image_size": 64}, **quick)
    finish_pretraining(pretrain(first, log=lambda *_: None), first, tmp_path / "at64")
    cfg = PretrainConfig(out=str(tmp_path / "w96"), shape={**SMALL, "image_size": 96}, fabric_share=0.5,
                         init=str(tmp_path / "at64"), **quick)
    logs: list[str] = []
    result = pretrain(cfg, log=logs.append)
    assert any("warm start" in line and "left at init: nothing" in line for line in logs)
    figures = finish_pretraining(result, cfg, tmp_path / "at96")
    assert {"pretrained", "random_init", "pretrained_generic", "pretrained_fabric"} <= set(figures)
    model = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "at96")
    processor = AutoProcessor.from_pretrained(tmp_path / "at96")
    assert processor.image_processor.image_seq_length == 6 * 6 + 1
    record = json.loads((tmp_path / "at96" / "pretrain_config.json").read_text())
    assert record["init"] == str(tmp_path / "at64") and record["fabric_share"] == 0.5
    assert model.config.text_config.max_position_embeddings >= 6 * 6 + 1 + 64


@pytest.mark.parametrize("script", ["pretrain-gpu.sh", "pretrain-fabric.sh"])
def test_the_gpu_scripts_pass_only_options_the_command_has(script) -> None:
    """A misspelt flag would fail the GPU run only once the machine is paid for."""
    import re
    from pathlib import Path

    from loomlens.train.pretrain import command_line

    text = (Path(__file__).resolve().parents[2] / "scripts" / script).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    passed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", code))
    known = {option for action in command_line()._actions for option in action.option_strings}
    assert passed and passed <= known, passed - known
