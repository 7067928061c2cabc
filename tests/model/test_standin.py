"""The faithful stand-in (real tokenizer, configs and generation settings, random weights)
through loomlens's own paths: load, LoRA step, generate -> parse -> score, grammar, merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loomlens.data.florence_text import parse_text
from loomlens.model.standin import save_standin, shared_folder

SHARED = shared_folder(Path(__file__).resolve().parents[2])
pytestmark = pytest.mark.skipif(
    not (SHARED / "README.md").exists(),
    reason=f"the real Florence-2 files are not at {SHARED} (the shared folder beside the repository)",
)
CLASSES = ["broken-weft", "drop"]


def image(width: int, height: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype("uint8"))


def check_paths(folder: Path, tmp_path: Path) -> None:
    """Every loomlens path on the stand-in saved in `folder`."""
    from transformers import Florence2ForConditionalGeneration

    from loomlens.config import LoraSettings
    from loomlens.infer import detect
    from loomlens.infer.detection import detect_with_details
    from loomlens.model import load_model
    from loomlens.model.lora import apply_lora, trainable_by_tower
    from loomlens.model.merge import merge_adapter
    from loomlens.train.loss import LossSpec, batch_loss

    model, processor = load_model(str(folder))
    tok = processor.tokenizer
    assert len(tok) == 51290 and tok.image_token_id == 51289 == model.config.image_token_id
    assert model.lm_head.weight.shape[0] == 51328 > len(tok)  # padded to a multiple of 64
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size) == (3, 3)

    # One LoRA step, `seed` preset: the native names put adapters in both towers and on lm_head.
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4))
    towers = trainable_by_tower(peft_model)
    assert towers["vision"] > 0 and towers["language"] > 0
    assert any("lm_head" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    frame = image(300, 200)
    batch = dict(processor(text=["<OD>"], images=[frame], return_tensors="pt"))
    batch["labels"] = tok(["broken-weft<loc_10><loc_20><loc_300><loc_400>"], return_tensors="pt").input_ids
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss_sum, tokens = batch_loss(peft_model, batch, LossSpec(decoder_start_token_id=2, pad_token_id=tok.pad_token_id))
    (loss_sum / tokens).backward()
    torch.optim.AdamW(trainable, lr=1e-2).step()
    assert torch.isfinite(loss_sum) and any(not torch.equal(a, b) for a, b in zip(before, trainable))
    peft_model.eval()

    # Generate -> parse -> score, free and through the class grammar.
    (free,) = detect_with_details(peft_model, processor, [frame], max_boxes=3, batch_size=1)
    assert all(t < len(tok) for t in free.generation.token_ids)
    (constrained,) = detect_with_details(peft_model, processor, [frame], max_boxes=3, batch_size=1,
                                         constrained=True, classes=CLASSES)
    assert parse_text(constrained.generation.text, 300, 200)[1] == 0  # well-formed: nothing malformed
    assert all(b.label in CLASSES and 0 <= b.score <= 1 for b in constrained.boxes)

    # Save the adapter as a run, merge in fp16, load with plain transformers: the same answer.
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "checkpoints" / "best", save_embedding_layers=False)
    (run / "config.yaml").write_text(f"model: {folder}\ndata: d\n")
    (run / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = merge_adapter(run, tmp_path / "merged")
    merged = Florence2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    inputs = processor(text=["<OD>"], images=[frame], return_tensors="pt")
    decoder = torch.tensor([[2, 0, *tok("broken-weft<loc_10>", add_special_tokens=False).input_ids]])
    with torch.no_grad():
        expected = peft_model(**inputs, decoder_input_ids=decoder).logits
        got = merged(**inputs, decoder_input_ids=decoder).logits
    # fp16 storage: a relative error of about 1e-3 on each weight.
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    kept = detect(peft_model, processor, [frame], max_boxes=3, batch_size=1, constrained=True, classes=CLASSES)[0]
    again = detect(merged, processor, [frame], max_boxes=3, batch_size=1, constrained=True, classes=CLASSES)[0]
    assert [b.label for b in again] == [b.label for b in kept]
    for a, b in zip(again, kept):
        assert max(abs(a.x1 - b.x1), abs(a.y1 - b.y1), abs(a.x2 - b.x2), abs(a.y2 - b.y2)) <= 2 * 300 / 1000
    check_predict_and_serve(run, frame, tmp_path)


def check_predict_and_serve(run: Path, frame: Image.Image, tmp_path: Path) -> None:
    """`loomlens predict` and the HTTP API on the trained run: the run's classes, the same answer."""
    import json

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from loomlens.cli import app
    from loomlens.predict import Predictor
    from loomlens.serve.app import ServeSettings, create_app

    frame.save(tmp_path / "frame.jpg")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "frame.jpg"), "--run", str(run), "--out",
                                      str(tmp_path / "predicted"), "--max-boxes", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (tmp_path / "predicted" / "predictions.jsonl").read_text().splitlines()]
    assert all(b["label"] in CLASSES for b in row["boxes"])
    predictor = Predictor(adapter=run, max_boxes=3, batch_size=1, text_tokens=16)
    with TestClient(create_app(predictor, ServeSettings(page=False))) as client:
        answer = client.post("/v1/predict", files={"image": ("frame.jpg", (tmp_path / "frame.jpg").read_bytes())})
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert (served["task"], served["width"], served["height"]) == ("od", *frame.size)
    # Random weights may answer nothing; whatever they answer, both paths answer the same.
    assert [d["label"] for d in served["detections"]] == [b["label"] for b in row["boxes"]]


def test_shrunk_standin_runs_every_path(tmp_path):
    check_paths(save_standin(SHARED, tmp_path / "standin", shape="shrunk"), tmp_path)


@pytest.mark.slow
def test_base_shaped_standin_runs_every_path(tmp_path):
    folder = save_standin(SHARED, tmp_path / "standin", shape="base")
    from loomlens.model import load_model

    model, processor = load_model(str(folder))
    assert processor.image_processor.size.height == 768 and processor.image_processor.image_seq_length == 577
    assert 0.22e9 < sum(p.numel() for p in model.parameters()) < 0.24e9
    del model
    check_paths(folder, tmp_path)


def test_missing_shared_files_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="real Florence-2 files are missing.*config.json"):
        save_standin(tmp_path, tmp_path / "out")


def test_large_shape_follows_florence2_large_config():
    """Large's widths and depths on meta tensors (no 3 GB of random weights): 0.77 B parameters,
    the real large's count, with base's tokenizer, preprocessor and generation settings."""
    from loomlens.model.standin import build_standin

    with torch.device("meta"):
        model, processor = build_standin(SHARED, shape="large")
    assert model.config.vision_config.embed_dim == [256, 512, 1024, 2048]
    assert (model.config.text_config.d_model, model.config.text_config.encoder_layers) == (1024, 12)
    assert 0.76e9 < sum(p.numel() for p in model.parameters()) < 0.79e9
    assert processor.image_processor.size.height == 768 and model.lm_head.weight.shape[0] == 51328
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size) == (3, 3)


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown stand-in shape 'huge'"):
        save_standin(SHARED, Path("unused"), shape="huge")
