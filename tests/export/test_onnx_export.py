"""`loomlens export --format onnx` on the tiny model: the five parts (the decoder as a first
step and a step with past key/values) and the processor files, checked against torch;
`--backend onnx` answers as torch does, token for token, with the cache; `--int8` quantises
what it says and its check says why it fails on the tiny model; a failed check or an existing
folder leaves nothing that looks like an export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.export import ExportCheckFailed, export_onnx
from loomlens.export.onnx import (
    INT8_RECIPE,
    _quantize,
    check_frames,
    departure,
    lm_head_nodes,
    torch_next_logprobs,
)
from loomlens.infer.onnx_runtime import MANIFEST, PARTS, OnnxFlorence

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    result = CliRunner().invoke(app, ["export", "tiny", str(out), "--check-frames", "2"])
    assert result.exit_code == 0, result.output
    assert "check against torch" in result.output and "DIFFERS" not in result.output
    return out


@pytest.fixture(scope="module")
def torch_tiny():
    from loomlens.infer.loading import load_for_inference

    return load_for_inference(model="tiny", precision="fp32")


@pytest.fixture(scope="module")
def net(exported) -> OnnxFlorence:
    return OnnxFlorence(exported)


def test_export_writes_the_parts_and_the_processor(exported) -> None:
    for part in PARTS:
        assert (exported / f"{part}.onnx").stat().st_size > 1000
    for name in ("config.json", "generation_config.json", "tokenizer.json", MANIFEST):
        assert (exported / name).is_file(), name
    assert not [p for p in exported.parent.iterdir() if p.name.endswith(".partial")]
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["kv_cache"] is True and manifest["int8_parts"] == []
    assert manifest["views"] == [""]  # a bare model learnt no mirrors: the line PC looks once
    assert manifest["max_boxes"] == 20  # no run data to say more


def test_the_line_pc_looks_through_the_mirrors_the_export_records(exported, tmp_path) -> None:
    from loomlens.predict import Predictor

    folder = tmp_path / "mirrored"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "views": ["", "h"], "max_boxes": 31}))  # a run's
    assert Predictor(model=str(folder), backend="onnx").views == ("", "h")
    assert Predictor(model=str(folder), backend="onnx").max_boxes == 31  # as --adapter RUN reads its crowded frames
    assert Predictor(model=str(folder), backend="onnx", tta="off").views == ("",)


def test_the_decoder_parts_have_the_community_names(net) -> None:
    past = net.sessions["decoder_with_past_model"]
    assert [i.name for i in past.get_inputs()][:2] == ["inputs_embeds", "encoder_attention_mask"]
    assert net.past_names == [f"past_key_values.{i}.{kind}.{t}" for i in range(2) for kind in ("decoder", "encoder")
                              for t in ("key", "value")]
    assert net.present_names == [n.replace("past_key_values.", "present.") for n in net.past_names]
    assert [o.name for o in past.get_outputs()] == ["logits", *[n for n in net.present_names if ".decoder." in n]]


def test_with_past_steps_give_the_no_cache_logits(net, torch_tiny) -> None:
    """Step by step through the cache = the whole answer at once through the first-step part
    (no cache) = torch, at every position; in a batch whose prompts pad differently."""
    import torch

    from loomlens.infer.pixels import model_inputs

    processor = torch_tiny.processor
    tok = processor.tokenizer
    images = check_frames(2, size=(384, 216))
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a broken weft across the loom"]
    answer = [tok.eos_token_id, tok.bos_token_id, *tok("drop", add_special_tokens=False).input_ids,
              *tok.convert_tokens_to_ids(["<loc_12>", "<loc_400>", "<loc_87>", "<loc_655>"]), tok.eos_token_id]
    ids = np.array([answer, answer], dtype=np.int64)
    states, mask = net.encode(processor, images, prompts)
    assert (mask == 0).any(), "the two prompts pad differently"
    whole, _ = net.first_step(ids, states, mask)
    logits, cache = net.first_step(ids[:, :1], states, mask)
    stepped = [logits[:, -1]]
    for step in range(1, ids.shape[1]):
        logits, cache = net.next_step(ids[:, step], mask, cache)
        stepped.append(logits[:, -1])
        assert cache["past_key_values.1.decoder.key"].shape[2] == step + 1
    stepped = np.stack(stepped, axis=1)
    assert np.abs(stepped - whole).max() < 1e-4
    inputs = model_inputs(processor, images, prompts)
    with torch.no_grad():
        reference = torch_tiny.model(**inputs, decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(stepped - reference).max() < 1e-3


def test_onnx_backend_answers_as_torch(exported) -> None:
    from loomlens.predict import Predictor

    frame = Image.new("RGB", (512, 288), (90, 80, 70))
    ImageDraw.Draw(frame).rectangle([200, 100, 260, 150], fill=(250, 250, 250))
    torch_boxes = Predictor(model="tiny", max_boxes=4, precision="fp32").predict([frame])[0].boxes
    onnx = Predictor(model=str(exported), backend="onnx", max_boxes=4)
    assert onnx.info()["backend"] == "onnx" and onnx.precision == "fp32"
    onnx_boxes = onnx.predict([frame])[0].boxes
    assert torch_boxes, "the tiny model finds the bright rectangle"
    assert [b.label for b in onnx_boxes] == [b.label for b in torch_boxes]
    for a, b in zip(torch_boxes, onnx_boxes):
        assert (a.x1, a.y1, a.x2, a.y2) == pytest.approx((b.x1, b.y1, b.x2, b.y2), abs=0.6)
        assert a.score == pytest.approx(b.score, abs=0.01)
    with pytest.raises(ValueError, match="greedily"):
        onnx.loaded.model.generate(onnx.loaded.processor, [frame], ["<OD>"], 8, num_beams=3)


def test_the_cached_search_answers_as_torch_token_for_token(net, torch_tiny) -> None:
    """Greedy with the cache writes torch's tokens with torch's log-probs: unconstrained and
    through the class grammar, and in a batch whose prompts pad differently."""
    from loomlens.infer.detection import detect_with_details
    from loomlens.infer.generation import generate

    processor = torch_tiny.processor
    images = check_frames(3, size=(512, 288))
    for options in ({}, {"constrained": True, "classes": ["drop", "broken-weft", "wrinkle"]}):
        ours = detect_with_details(torch_tiny.model, processor, images, max_boxes=4, **options)
        theirs = detect_with_details(net, processor, images, max_boxes=4, **options)
        for a, b in zip(ours, theirs, strict=True):
            assert a.generation.token_ids == b.generation.token_ids
            assert np.allclose(a.generation.token_logprobs, b.generation.token_logprobs, atol=1e-4)
            assert a.generation.answer_probability == pytest.approx(b.generation.answer_probability, abs=1e-4)
            assert [x.label for x in a.boxes] == [x.label for x in b.boxes]
            # Edges at the mean bins near the chosen ones (`expected_bins`), read from each backend's logits.
            assert np.allclose([(x.x1, x.y1, x.x2, x.y2) for x in a.boxes], [(x.x1, x.y1, x.x2, x.y2) for x in b.boxes],
                               atol=1e-3)
            assert a.generation.loc_near.keys() == b.generation.loc_near.keys() == a.generation.loc_bins.keys()
            assert np.allclose(list(a.generation.loc_near.values()), list(b.generation.loc_near.values()), atol=1e-4)
            # The tokens ranked next beside each word, which name a box's other classes (`other_labels`).
            assert a.generation.runners_up.keys() == b.generation.runners_up.keys()
            assert np.allclose([lp for v in a.generation.runners_up.values() for _, lp in v],
                               [lp for v in b.generation.runners_up.values() for _, lp in v], atol=1e-4)
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a broken weft across the loom", "<CAPTION>"]
    ours = generate(torch_tiny.model, processor, images, prompts, 24)
    theirs = generate(net, processor, images, prompts, 24)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


def test_a_saved_generation_config_changes_no_answer(exported, net, torch_tiny, tmp_path) -> None:
    """As with torch, the search settings are loomlens's: a generation_config.json with an n-gram
    ban, another decoder start and no forced `<s>` (what a re-saved checkpoint may carry) leaves
    every answer as it was."""
    from loomlens.infer.detection import detect_with_details

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(no_repeat_ngram_size=1, decoder_start_token_id=0, forced_bos_token_id=None)
    (copy / "generation_config.json").write_text(json.dumps(config))
    images = check_frames(2, size=(512, 288))
    before = detect_with_details(net, torch_tiny.processor, images, max_boxes=4)
    after = detect_with_details(OnnxFlorence(copy), torch_tiny.processor, images, max_boxes=4)
    assert [d.generation.token_ids for d in before] == [d.generation.token_ids for d in after]
    assert any(len(set(d.generation.token_ids)) < len(d.generation.token_ids) for d in before), \
        "an answer repeats a token, which the 1-gram ban would have changed"


def test_departure_names_the_token_and_both_margins(net, torch_tiny) -> None:
    """A frame whose answer parts from torch's is explained by the first token they part at and
    each side's log-probability margin there, fed torch's answer up to it."""
    from loomlens.infer.detection import detect_with_details
    from loomlens.infer.generation import Generation

    processor = torch_tiny.processor
    tok = processor.tokenizer
    images = check_frames(2, size=(512, 288))
    reference = [d.generation for d in detect_with_details(torch_tiny.model, processor, images, max_boxes=4)]
    k = 3
    start = [tok.eos_token_id, *reference[1].token_ids[:k]]
    torch_lp = torch_next_logprobs(torch_tiny.model, processor, images[1], start)
    runner_up = int(np.argsort(torch_lp)[-2])
    assert runner_up != reference[1].token_ids[k]
    parted = Generation("", [*reference[1].token_ids[:k], runner_up], [0.0] * (k + 1))
    why = departure(torch_tiny.model, net, processor, images, reference, [reference[0], parted], row=1)
    a, b = tok.convert_ids_to_tokens([reference[1].token_ids[k], runner_up])
    margin = torch_lp[reference[1].token_ids[k]] - torch_lp[runner_up]
    assert why.startswith(f"answer token {k}: torch prefers {a} to {b} by {margin:.3f}")
    assert why.endswith(f"the export {b} by {-margin:.3f}"), why  # the fp32 export agrees with torch
    same = departure(torch_tiny.model, net, processor, images, reference, reference, row=0)
    assert same.startswith(f"the same {len(reference[0].token_ids)} answer tokens")


def test_int8_quantises_the_recipe_and_keeps_vision_and_lm_head_fp32(exported, tmp_path) -> None:
    import onnx

    folder = tmp_path / "int8"
    shutil.copytree(exported, folder)
    assert _quantize(folder) == list(INT8_RECIPE)
    assert not (folder / "vision_encoder_int8.onnx").exists()
    for part in INT8_RECIPE:
        assert (folder / f"{part}_int8.onnx").stat().st_size < (folder / f"{part}.onnx").stat().st_size
    for part in ("decoder_model", "decoder_with_past_model"):
        graph = onnx.load(str(folder / f"{part}_int8.onnx")).graph
        ops = [n.op_type for n in graph.node]
        assert "MatMulInteger" in ops and "ConvInteger" not in ops
        assert lm_head_nodes(folder / f"{part}_int8.onnx") == lm_head_nodes(folder / f"{part}.onnx") != []
        weights = {i.name: i for i in graph.initializer}
        (head,) = [n for n in graph.node if "logits" in n.output]
        assert head.op_type == "MatMul" and weights[head.input[1]].data_type == onnx.TensorProto.FLOAT


def test_int8_moves_log_probs_less_than_onnxruntimes_defaults(exported, torch_tiny, tmp_path) -> None:
    """Along torch's own answers, the recipe's parts move the log-probs of torch's tokens less
    than quantising every part with onnxruntime's defaults (what --int8 did first)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from loomlens.infer.detection import detect_with_details
    from loomlens.infer.pixels import model_inputs

    recipe, defaults = tmp_path / "recipe", tmp_path / "defaults"
    for folder in (recipe, defaults):
        shutil.copytree(exported, folder)
    manifest = json.loads((exported / MANIFEST).read_text())
    (recipe / MANIFEST).write_text(json.dumps({**manifest, "int8_parts": _quantize(recipe)}))
    for part in PARTS:
        quantize_dynamic(str(defaults / f"{part}.onnx"), str(defaults / f"{part}_int8.onnx"),
                         weight_type=QuantType.QInt8)
    (defaults / MANIFEST).write_text(json.dumps({**manifest, "int8_parts": list(PARTS)}))
    processor = torch_tiny.processor
    size = len(processor.tokenizer)
    images = check_frames(2, size=(512, 288))
    answers = [[processor.tokenizer.eos_token_id, *d.generation.token_ids]
               for d in detect_with_details(torch_tiny.model, processor, images, max_boxes=3)]

    def log_softmax(logits):
        shifted = logits[:, :size] - logits[:, :size].max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    def torch_along(image, answer):  # every step of torch's answer, fed its own tokens
        inputs = model_inputs(processor, [image], ["<OD>"])
        with torch.no_grad():
            out = torch_tiny.model(**inputs, decoder_input_ids=torch.tensor([answer[:-1]]))
        return log_softmax(out.logits[0].numpy())

    def onnx_along(quantised, image, answer):  # the same through the two decoder parts and the cache
        states, mask = quantised.encode(processor, [image], ["<OD>"])
        logits, cache = quantised.first_step(np.array([answer[:1]]), states, mask)
        rows = [logits[0, -1]]
        for token in answer[1:-1]:
            logits, cache = quantised.next_step(np.array([token]), mask, cache)
            rows.append(logits[0, -1])
        return log_softmax(np.stack(rows))

    errors = {}
    for name, folder in (("recipe", recipe), ("defaults", defaults)):
        quantised = OnnxFlorence(folder, int8=True)
        moved = []
        for image, answer in zip(images, answers):
            steps, chosen = np.arange(len(answer) - 1), answer[1:]
            ours, theirs = torch_along(image, answer), onnx_along(quantised, image, answer)
            moved += list(np.abs(theirs[steps, chosen] - ours[steps, chosen]))
        errors[name] = float(np.mean(moved))
    assert errors["recipe"] < 0.75 * errors["defaults"], errors


def test_int8_on_the_tiny_model_fails_its_check_saying_why(tmp_path) -> None:
    """The tiny model's answers hang on near ties (torch's two best tokens a few hundredths of a
    log-probability apart); int8 flips them, the check refuses, and says so: the fp32 parts
    agree, and at which token each side preferred what."""
    out = tmp_path / "int8"
    result = CliRunner().invoke(app, ["export", "tiny", str(out), "--int8", "--check-frames", "2"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "int8 frame" in text and "fp32 frame" not in text
    assert "torch prefers" in text and "the export" in text
    assert "The fp32 parts agree with torch on every frame; the int8 parts do not" in text
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ExportCheckFailed, match="Nothing was written"):
        export_onnx(run=None, out=out, frames=1, score_tol=-1.0, log=lambda _: None)  # no answer can pass
    assert list(tmp_path.iterdir()) == []


def test_refusals(exported, tmp_path) -> None:
    runner = CliRunner()
    again = runner.invoke(app, ["export", "tiny", str(exported)])
    assert again.exit_code == 1 and "already exists" in again.output
    assert (exported / MANIFEST).is_file()  # the earlier export is untouched
    assert runner.invoke(app, ["export", "tiny", str(tmp_path / "x"), "--format", "tflite"]).exit_code == 1
    assert "opset" in runner.invoke(app, ["export", "tiny", str(tmp_path / "y"), "--opset", "9"]).output
    typo = runner.invoke(app, ["export", str(tmp_path / "rnu1"), str(tmp_path / "z"), "--model", "tiny"])
    assert typo.exit_code == 1 and "no run folder at" in typo.output  # never the untrained base, quietly
    assert not (tmp_path / "z").exists()
    from loomlens.predict import Predictor

    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        Predictor(model=str(tmp_path), backend="onnx")
    with pytest.raises(FileNotFoundError, match="--int8"):
        Predictor(model=str(exported), backend="onnx", precision="int8")
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "kv_cache": False}))
    with pytest.raises(FileNotFoundError, match="older loomlens.*export it again"):
        OnnxFlorence(old)


def test_the_onnx_backend_on_a_cpu_keeps_freed_memory(exported, monkeypatch) -> None:
    """As the torch path does (`infer/loading.py`): the buffers around onnxruntime's arena."""
    from loomlens.infer.onnx_runtime import load_onnx_export
    from loomlens.model import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("kept") or True)
    load_onnx_export(exported)
    assert calls == ["kept"]


def test_an_out_folder_below_a_file_is_refused_before_the_model_loads(tmp_path) -> None:
    # It failed once the model had loaded with "[Errno 17] File exists: 'afile'".
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=r"afile is a file, so .*afile/sub cannot be made.*another folder"):
        export_onnx(run=None, out=tmp_path / "afile" / "sub", model="/no/such/model", log=lambda _: None)


def test_an_empty_out_folder_is_taken_as_merge_takes_one_and_a_full_one_refused(tmp_path) -> None:
    # Export refused a folder made ready for it (mkdir, a mounted share) that merge accepted.
    out = tmp_path / "ready"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"x")  # what a file manager hides counts as empty, and stays
    export_onnx(run=None, out=out, model="tiny", frames=1, log=lambda _: None)
    assert (out / MANIFEST).is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (out / ".DS_Store").read_bytes() == b"x"
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"full already exists and is not empty.*empty or new folder"):
        export_onnx(run=None, out=full, model="/no/such/model", log=lambda _: None)  # before the model loads
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
