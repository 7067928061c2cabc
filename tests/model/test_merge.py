"""A merged model is plain transformers and computes what base + adapter computes."""

import pytest
import torch
import yaml

from loomlens.model.lora import LoraSettings, apply_lora, load_adapter
from loomlens.model.merge import merge_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from loomlens.model.tiny import build_tiny

    model, processor, _ = build_tiny(seed=0)
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def fake_run(base_dir, run, dora: bool):
    """A run folder whose best/ adapter (seed preset: lm_head included) has non-zero updates."""
    from loomlens.model import load_model

    model, _ = load_model(str(base_dir))
    peft_model = apply_lora(model, LoraSettings(targets="seed", r=4, dora=dora))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(run / "checkpoints" / "best", save_embedding_layers=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base_dir), "data": "d"}))
    (run / "classes.txt").write_text("drop\nwrinkle\n")


@pytest.mark.parametrize("dora", [False, True])
def test_merged_folder_loads_with_plain_transformers_and_matches(base_dir, tmp_path, dora):
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from loomlens.model import load_model

    fake_run(base_dir, tmp_path / "run", dora)
    out = merge_adapter(tmp_path / "run", tmp_path / "merged", dtype="fp32")

    merged = Florence2ForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text=["<OD>"], images=[Image.new("RGB", (90, 50), (30, 60, 90))], return_tensors="pt")
    decoder = torch.tensor([[2, 0, 40, 900, 1600, 1700]])
    base, _ = load_model(str(base_dir))
    reference = load_adapter(base, tmp_path / "run" / "checkpoints" / "best")
    with torch.no_grad():
        expected = reference(**inputs, decoder_input_ids=decoder).logits
        got = merged(**inputs, decoder_input_ids=decoder).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

    plain, _ = load_model(str(base_dir))
    assert torch.equal(merged.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    assert not torch.allclose(merged.lm_head.weight, plain.lm_head.weight)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    assert (out / "classes.txt").exists() and (out / "tokenizer.json").exists()


def test_merge_refuses_to_replace_a_folder_that_is_not_a_merged_model(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"precious already exists and is not empty: it is not a merged model"):
        merge_adapter(tmp_path / "run", tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").exists()


def test_merge_takes_an_empty_folder_as_export_does(base_dir, tmp_path):
    fake_run(base_dir, tmp_path / "run", dora=False)
    (tmp_path / "ready").mkdir()
    assert (merge_adapter(tmp_path / "run", tmp_path / "ready") / "model.safetensors").is_file()
    # A folder holding only what a file manager hides counts as empty, and keeps what it held.
    (tmp_path / "shared" / ".git").mkdir(parents=True)
    (tmp_path / "shared" / "Thumbs.db").write_bytes(b"x")
    assert (merge_adapter(tmp_path / "run", tmp_path / "shared") / "model.safetensors").is_file()
    assert (tmp_path / "shared" / ".git").is_dir() and (tmp_path / "shared" / "Thumbs.db").is_file()


def test_merge_stores_half_precision_by_default_with_every_checkpoint_file(base_dir, tmp_path):
    from safetensors import safe_open
    from transformers import Florence2ForConditionalGeneration

    from loomlens.model.merge import MIN_TRANSFORMERS, REQUIRED_FILES

    fake_run(base_dir, tmp_path / "run", dora=False)
    out = merge_adapter(tmp_path / "run", tmp_path / "merged")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    assert all((out / name).exists() for name in REQUIRED_FILES)
    readme = (out / "README.md").read_text()
    assert MIN_TRANSFORMERS in readme
    snippet = readme.split("```python\n")[1].split("```")[0]  # what a user pastes loads the folder
    scope = {"FOLDER": str(out)}
    exec(snippet, scope)  # noqa: S102 - the README's own code, on the folder just written
    assert type(scope["processor"].image_processor).__name__ == "CLIPImageProcessorPil"
    bf16 = merge_adapter(tmp_path / "run", tmp_path / "merged-bf16", dtype="bf16")
    assert Florence2ForConditionalGeneration.from_pretrained(bf16).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16, bf16, fp32"):
        merge_adapter(tmp_path / "run", tmp_path / "merged-x", dtype="int8")


def test_a_merged_folder_keeps_its_classes_and_a_remerge_replaces_it_whole(base_dir, tmp_path, monkeypatch):
    from loomlens.infer.loading import load_for_inference
    from loomlens.model import merge

    fake_run(base_dir, tmp_path / "run", dora=False)
    out = merge_adapter(tmp_path / "run", tmp_path / "merged", dtype="fp32")
    # predict, eval and watch --model MERGED decode through the run's classes, as with --adapter RUN
    assert load_for_inference(model=str(out)).classes == ["drop", "wrinkle"]
    assert load_for_inference(model=str(base_dir)).classes == []
    # ... and tiles, mirrors, box budget, tasks and region rules as the run did
    (tmp_path / "run" / "data_summary.json").write_text(
        '{"tile": 512, "flip": true, "splits": {"train": {"most_boxes": 31}, "val": {"most_boxes": 4}}}')
    (tmp_path / "run" / "regions.yaml").write_text("min_score: 0.5\n")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": str(base_dir), "tasks": ["od", "caption"]}))
    by_run = load_for_inference(adapter=tmp_path / "run")
    by_merge = load_for_inference(model=str(merge_adapter(tmp_path / "run", tmp_path / "again", dtype="fp32")))
    kept = ("classes", "tile_size", "views", "max_boxes", "trained_tasks")
    assert [getattr(by_merge, k) for k in kept] == [getattr(by_run, k) for k in kept]
    assert (by_merge.tile_size, by_merge.views, by_merge.max_boxes) == (512, ("", "h"), 31)
    assert by_merge.rules.read_text() == "min_score: 0.5\n"
    # A kill between the two renames of a re-merge: the earlier merge is set aside, not lost.
    renames = []

    def killed_after_the_first(tmp, path):
        path.rename(path.parent / f".{path.name}.old")
        renames.append(tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "swap_in_folder", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(tmp_path / "run", out, dtype="bf16")
    assert not out.exists() and renames
    monkeypatch.undo()
    merge_adapter(tmp_path / "run", out, dtype="bf16")  # puts the earlier one back, then replaces it whole
    assert '"dtype": "bf16"' in (out / "loomlens_merge.json").read_text()
    assert not list(tmp_path.glob(".merged.*"))


def test_merge_refuses_a_file_for_out_and_a_base_other_than_the_runs(base_dir, tmp_path):
    fake_run(base_dir, tmp_path / "run", dora=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        merge_adapter(tmp_path / "run", tmp_path / "afile")
    with pytest.raises(ValueError, match="trained on base .* not 'tiny'.*Drop --model"):
        merge_adapter(tmp_path / "run", tmp_path / "merged", base="tiny")
    # The same base named another way, or a recorded base that is not on this machine, is taken.
    assert merge_adapter(tmp_path / "run", tmp_path / "merged", base=f"{base_dir}/../{base_dir.name}").exists()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": "/elsewhere/florence", "data": "d"}))
    assert merge_adapter(tmp_path / "run", tmp_path / "m2", base=str(base_dir), dtype="fp32").exists()
    # A hub id recorded: another hub id is refused (before anything loads), a local copy is taken.
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": "microsoft/Florence-2-base-ft", "data": "d"}))
    with pytest.raises(ValueError, match="not 'microsoft/Florence-2-large'"):
        merge_adapter(tmp_path / "run", tmp_path / "m3", base="microsoft/Florence-2-large")
    assert merge_adapter(tmp_path / "run", tmp_path / "m3", base=str(base_dir), dtype="fp32").exists()


def test_a_damaged_merge_record_is_named_with_the_fix(tmp_path):
    from loomlens.model.merge import MARKER, read_merge_record

    (tmp_path / MARKER).write_text('{"base": "tiny", "run": {"tasks": []}}')
    with pytest.raises(ValueError, match=r"loomlens_merge.json cannot be read .*lacks.*merge the run again"):
        read_merge_record(tmp_path)
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        read_merge_record(tmp_path)
    assert read_merge_record(tmp_path / "elsewhere") == {}


def test_an_out_folder_below_a_file_is_refused_naming_the_file(tmp_path):
    # It failed after the base loaded with "[Errno 17] File exists: 'afile'", naming neither
    # the output folder nor the fix.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=r"afile is a file, so .*afile/merged cannot be made.*another folder"):
        merge_adapter(tmp_path / "norun", tmp_path / "afile" / "merged")  # refused before the run is read
