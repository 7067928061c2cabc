"""`loomlens export RUN OUT --format onnx`: the merged model as the ONNX parts the
community's Florence-2 exports use (onnx-community/Florence-2-base), for a factory PC that runs
onnxruntime.

OUT holds `vision_encoder.onnx` (pixels -> projected image features), `embed_tokens.onnx`
(token ids -> embeddings), `encoder_model.onnx` (embeddings with the image features in place
of the image tokens -> encoder states), and the decoder as the community's split pair with a
KV cache: `decoder_model.onnx` (the first step: answer embeddings + encoder states -> logits
and `present.{layer}.{decoder,encoder}.{key,value}`) and `decoder_with_past_model.onnx` (each
later step: the newest token's embedding + `past_key_values.{layer}.{decoder,encoder}.{key,value}`
-> logits and the grown `present.{layer}.decoder.*`). The community also ships
`decoder_model_merged.onnx` (both in one graph behind an If on `use_cache_branch`, what
transformers.js loads); the split pair is what optimum's seq2seq runtime loads, and int8
quantisation does not reach into an If's branches. With `--int8` also `*_int8.onnx` (dynamic
quantisation); beside them config.json, generation_config.json, the processor and tokenizer
files, the run's regions.yaml, and loomlens_export.json (what was exported, from which run).

The export checks itself before it counts: on N synthetic loom frames, onnxruntime must find
the same boxes as torch (each coordinate within `box_bins` location bins) with scores within
`score_tol`; the comparison is returned (and printed by the CLI), and a failed check raises
ExportCheckFailed. Everything is written to a temporary folder beside OUT and renamed to OUT
only once complete and checked, so a failed export never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loomlens.data.atomic import holds_files, keep_unseen
from loomlens.data.records import Box
from loomlens.infer.detection import detect_with_details
from loomlens.infer.generation import Generation, generation_settings
from loomlens.infer.loading import load_for_inference
from loomlens.infer.onnx_runtime import MANIFEST, PARTS, OnnxFlorence
from loomlens.run import check_output_folder


class ExportCheckFailed(RuntimeError):
    """onnxruntime's answers differ from torch's beyond the tolerance; nothing was written."""


@dataclass
class FrameCheck:
    """One check frame: boxes by torch and by onnxruntime, the largest coordinate difference in
    location bins and score difference, whether they agree within the tolerance, and for a frame
    that does not, `why` (`departure`: where the answers part and by what margins)."""

    frame: int
    parts: str
    torch_boxes: int
    onnx_boxes: int
    max_bins: float
    max_score_diff: float
    ok: bool
    why: str = ""


class _Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.model.get_image_features(pixel_values).pooler_output


class _Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.get_input_embeddings()(input_ids)


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask):
        return self.model.model.language_model.encoder(inputs_embeds=inputs_embeds,
                                                       attention_mask=attention_mask).last_hidden_state


def _present(cache, layers: int, encoder: bool) -> list[torch.Tensor]:
    """A transformers `EncoderDecoderCache` as the flat list the community's decoders output:
    per layer decoder key, decoder value (and encoder key, encoder value)."""
    flat = []
    for i in range(layers):
        flat += [cache.self_attention_cache.layers[i].keys, cache.self_attention_cache.layers[i].values]
        if encoder:
            flat += [cache.cross_attention_cache.layers[i].keys, cache.cross_attention_cache.layers[i].values]
    return flat


class _Decoder(torch.nn.Module):
    """The first decoder step (`decoder_model.onnx`): the answer's embeddings so far (in
    practice the decoder-start token) + the encoder states -> logits at every position and the
    key/values of every layer, self-attention (`decoder`) and cross-attention (`encoder`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.text_config.decoder_layers

    def forward(self, inputs_embeds, encoder_hidden_states, encoder_attention_mask):
        out = self.model.model.language_model.decoder(
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, use_cache=True)
        return (self.model.lm_head(out.last_hidden_state), *_present(out.cache, self.layers, encoder=True))


class _DecoderWithPast(torch.nn.Module):
    """Every later step (`decoder_with_past_model.onnx`): the newest token's embedding + the
    past key/values -> its logits and the self-attention key/values grown by one position.
    The cross-attention key/values are the first step's, reused as they are (they depend on
    the encoder states only), so they are inputs here and no outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.text_config.decoder_layers

    def forward(self, inputs_embeds, encoder_attention_mask, *past):
        from transformers import EncoderDecoderCache

        cache = EncoderDecoderCache(tuple(tuple(past[4 * i:4 * i + 4]) for i in range(self.layers)))
        # The decoder reads the encoder states' shape (batch, length, width) for the cross
        # mask; their values are never used again once the cache holds their key/values. A
        # view of the first cached encoder key has that shape, so no input is needed for it.
        shaped = past[2].transpose(1, 2).flatten(2)
        out = self.model.model.language_model.decoder(
            inputs_embeds=inputs_embeds, encoder_hidden_states=shaped, encoder_attention_mask=encoder_attention_mask,
            cache=cache, use_cache=True)
        return (self.model.lm_head(out.last_hidden_state), *_present(out.cache, self.layers, encoder=False))


def _export_parts(model, processor, folder: Path, opset: int) -> None:
    """The five parts of `model` (merged, fp32, eval) as ONNX files in `folder`."""
    from PIL import Image

    from loomlens.infer.pixels import model_inputs

    size = processor.image_processor.size
    inputs = model_inputs(processor, [Image.new("RGB", (size["width"], size["height"]))], ["<OD>"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    # Traced with one padded position: an all-ones mask would let transformers skip the mask
    # and the traced graph would then ignore padding for good.
    mask[:, -1] = 0
    embed = _Embed(model)
    layers = model.config.text_config.decoder_layers
    with torch.no_grad():
        features = _Vision(model)(inputs["pixel_values"])
        embeds = embed(ids).masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), features)
        states = _Encoder(model)(embeds, mask)
        # The first step is traced over two answer tokens (so its graph keeps the causal mask)
        # and the later step over a past of two.
        answer = embed(torch.tensor([[model.generation_config.decoder_start_token_id, 0]]))
        past = _Decoder(model)(answer, states, mask)[1:]
        newest = embed(torch.tensor([[0]]))
    batch_seq = {0: "batch", 1: "sequence"}
    present = [f"present.{i}.{kind}.{t}" for i in range(layers) for kind in ("decoder", "encoder") for t in ("key", "value")]
    past_names = [n.replace("present.", "past_key_values.") for n in present]
    length = {"decoder": "past_sequence", "encoder": "encoder_sequence"}
    specs = {
        "vision_encoder": (_Vision(model), (inputs["pixel_values"],), ["pixel_values"], ["image_features"],
                           {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}),
        "embed_tokens": (embed, (ids,), ["input_ids"], ["inputs_embeds"],
                         {"input_ids": batch_seq, "inputs_embeds": batch_seq}),
        "encoder_model": (_Encoder(model), (embeds, mask), ["inputs_embeds", "attention_mask"], ["last_hidden_state"],
                          {"inputs_embeds": batch_seq, "attention_mask": batch_seq, "last_hidden_state": batch_seq}),
        "decoder_model": (_Decoder(model), (answer, states, mask),
                          ["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask"], ["logits", *present],
                          {"inputs_embeds": {0: "batch", 1: "answer"},
                           "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                           "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"},
                           "logits": {0: "batch", 1: "answer"},
                           **{n: {0: "batch", 2: "answer" if ".decoder." in n else "encoder_sequence"} for n in present}}),
        "decoder_with_past_model": (
            _DecoderWithPast(model), (newest, mask, *past),
            ["inputs_embeds", "encoder_attention_mask", *past_names],
            ["logits", *[n for n in present if ".decoder." in n]],
            {"inputs_embeds": {0: "batch"}, "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"},
             "logits": {0: "batch"},
             **{n: {0: "batch", 2: length[n.split(".")[2]]} for n in past_names},
             **{n: {0: "batch", 2: "past_sequence + 1"} for n in present if ".decoder." in n}}),
    }
    for name, (module, args, input_names, output_names, axes) in specs.items():
        torch.onnx.export(module, args, str(folder / f"{name}.onnx"), input_names=input_names,
                          output_names=output_names, dynamic_axes=axes, opset_version=opset, dynamo=False)


#: What `--int8` quantises (weights int8, activations quantised on the fly), part by part; the
#: rest stays fp32. Measured on the tiny model + the demo's adapter (docs/line.md, int8): along
#: torch's own answers, the vision encoder in int8 (its convolutions, or its MatMuls alone) and
#: `lm_head` in int8 (its rows are the 1000 `<loc_N>` tokens, neighbours whose logits are close
#: by design) each flipped 3-4 of 69 answer tokens; the token embedding (a Gather: rounding a
#: row is all it does) and the encoder's and decoder's other MatMuls, per output channel,
#: together moved log-probs about as much as bf16 weights do and flipped 1.
INT8_RECIPE: dict[str, dict] = {
    "embed_tokens": {"op_types_to_quantize": ["Gather"]},
    "encoder_model": {"op_types_to_quantize": ["MatMul"], "per_channel": True},
    "decoder_model": {"op_types_to_quantize": ["MatMul"], "per_channel": True, "keep": "lm_head"},
    "decoder_with_past_model": {"op_types_to_quantize": ["MatMul"], "per_channel": True, "keep": "lm_head"},
}


def lm_head_nodes(path: Path) -> list[str]:
    """The MatMul nodes of a decoder part that compute its `logits` output (the lm_head)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "logits" in n.output]


def _quantize(folder: Path) -> list[str]:
    """`PART_int8.onnx` beside each part `INT8_RECIPE` names; returns those parts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for part, recipe in INT8_RECIPE.items():
        options = {k: v for k, v in recipe.items() if k != "keep"}
        source = folder / f"{part}.onnx"
        if recipe.get("keep") == "lm_head":
            kept = lm_head_nodes(source)
            if not kept:
                raise RuntimeError(f"{source.name}: no MatMul computes `logits`; the lm_head cannot be kept in fp32")
            options["nodes_to_exclude"] = kept
        quantize_dynamic(str(source), str(folder / f"{part}_int8.onnx"), weight_type=QuantType.QInt8, **options)
    return list(INT8_RECIPE)


def compare(reference: list[list[Box]], candidate: list[list[Box]], sizes: list[tuple[int, int]], *,
            parts: str, box_bins: float, score_tol: float) -> list[FrameCheck]:
    """Frame by frame: the same boxes (count, order, labels; coordinates within `box_bins`
    location bins of 1/1000 of the frame) with scores within `score_tol`."""
    checks = []
    for i, (ref, got, (w, h)) in enumerate(zip(reference, candidate, sizes, strict=True)):
        bins = scores = 0.0
        same = len(ref) == len(got) and all(a.label == b.label for a, b in zip(ref, got))
        for a, b in zip(ref, got):
            bins = max(bins, abs(a.x1 - b.x1) * 1000 / w, abs(a.x2 - b.x2) * 1000 / w,
                       abs(a.y1 - b.y1) * 1000 / h, abs(a.y2 - b.y2) * 1000 / h)
            scores = max(scores, abs((a.score or 0.0) - (b.score or 0.0)))
        ok = same and bins <= box_bins + 1e-6 and scores <= score_tol
        checks.append(FrameCheck(i, parts, len(ref), len(got), round(bins, 3), round(scores, 5), ok))
    return checks


def _real_logprobs(logits: np.ndarray, size: int) -> np.ndarray:
    shifted = logits[:size].astype(np.float64) - logits[:size].max()
    return shifted - np.log(np.exp(shifted).sum())


def torch_next_logprobs(model, processor, image, prefix: list[int]) -> np.ndarray:
    """Log-probabilities (over the tokenizer's tokens) a torch model gives the token after
    `prefix` (decoder ids, the decoder-start first) for `<OD>` on `image`."""
    from loomlens.infer.pixels import model_inputs

    inputs = model_inputs(processor, [image], ["<OD>"])
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"].to(dtype), decoder_input_ids=torch.tensor([prefix]))
    return _real_logprobs(out.logits[0, -1].float().numpy(), len(processor.tokenizer))


def onnx_next_logprobs(exported: OnnxFlorence, processor, images, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities (batch, tokenizer's tokens) an export gives the token after each row of
    `ids` (batch, steps; the decoder-start first) for `<OD>` on `images`, run as one batch
    through its two decoder parts and their cache, as its search runs."""
    states, mask = exported.encode(processor, images, ["<OD>"] * len(images))
    logits, cache = exported.first_step(ids[:, :1], states, mask)
    for step in range(1, ids.shape[1]):
        logits, cache = exported.next_step(ids[:, step], mask, cache)
    return np.stack([_real_logprobs(row, len(processor.tokenizer)) for row in logits[:, -1]])


def departure(model, exported, processor, images, references: list[Generation], candidates: list[Generation],
              row: int) -> str:
    """Why the export's answer for `images[row]` differs from torch's: the first answer token
    where they part, and by how much each preferred its own token there (log-probabilities,
    torch's answer fed up to that token), or, where the tokens are the same, how far their
    log-probabilities (the scores) moved. `images` and `candidates` are the batch the export
    answered together: dynamic int8 quantises activations per tensor, over the whole batch, so
    its answer for one frame depends on the others. A part that prefers the other token by more
    than torch's own margin is what moves a box; a margin near 0 is a model undecided there."""
    tokenizer = processor.tokenizer
    ours, theirs = references[row].token_ids, candidates[row].token_ids
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        moved = max((abs(a - b) for a, b in zip(references[row].token_logprobs, candidates[row].token_logprobs)),
                    default=0.0)
        return f"the same {len(ours)} answer tokens; their log-probabilities moved by up to {moved:.3f}"
    settings = generation_settings(model, tokenizer, max_new_tokens=1, num_beams=1)
    start, pad = settings["decoder_start_token_id"], settings["pad_token_id"]
    torch_lp = torch_next_logprobs(model, processor, images[row], [start, *ours[:k]])
    # The batch as the export's search fed it up to token k: each row its own answer, a row
    # that had finished padded (this row's own answer is torch's up to k).
    ids = np.array([[start, *(c.token_ids + [pad] * k)[:k]] for c in candidates], dtype=np.int64)
    onnx_lp = onnx_next_logprobs(exported, processor, images, ids)[row]
    a, b = ours[k], theirs[k]
    name = tokenizer.convert_ids_to_tokens
    return (f"answer token {k}: torch prefers {name(a)} to {name(b)} by {torch_lp[a] - torch_lp[b]:.3f} "
            f"(log-probability), the export {name(b)} by {onnx_lp[b] - onnx_lp[a]:.3f}")


def check_frames(count: int, size: tuple[int, int] = (768, 432)):
    """`count` synthetic loom frames with defects (the demo's camera), for the self-check."""
    from loomlens.data.synth import render_frame

    return [render_frame(0, i, size, negative=False)[0] for i in range(count)]


def write_export(loaded, folder: Path, *, opset: int = 17, int8: bool = False,
                 log: Callable[[str], None] = print) -> None:
    """Write the export of `loaded` (a `LoadedModel` in fp32, adapter merged) into `folder`: the
    parts (and with `int8` the quantised ones), the processor, config and generation config,
    the run's region rules and the manifest. Unchecked: `export_onnx` checks it against torch
    before it counts (the benchmark writes int8 parts with it to time them even where the
    check would refuse them)."""
    log(f"exporting {loaded.base}{' + ' + str(loaded.adapter) if loaded.adapter else ''} (merged, fp32) "
        f"to ONNX opset {opset}")
    # Traced on transformers' own SDPA path (its masks trace); the reference answers of the
    # check run on the kernels `loomlens predict` uses.
    attention = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("sdpa")
    try:
        _export_parts(loaded.model, loaded.processor, folder, opset)
    finally:
        loaded.model.set_attn_implementation(attention)
    loaded.processor.save_pretrained(folder)
    loaded.model.config.save_pretrained(folder)
    loaded.model.generation_config.save_pretrained(folder)
    if loaded.rules is not None:
        shutil.copy2(loaded.rules, folder / "regions.yaml")
    quantised = []
    if int8:
        log("quantising to int8 (dynamic): " + ", ".join(INT8_RECIPE) + "; vision encoder and lm_head kept fp32")
        quantised = _quantize(folder)
    (folder / MANIFEST).write_text(json.dumps({
        "format": "onnx", "parts": list(PARTS), "kv_cache": True, "opset": opset, "int8": int8,
        "int8_parts": quantised,
        "base": loaded.base, "adapter": str(loaded.adapter) if loaded.adapter else None,
        "run": str(loaded.run) if loaded.run else None, "classes": list(loaded.classes),
        "trained_tasks": sorted(loaded.trained_tasks), "tile_size": loaded.tile_size,
        "views": list(loaded.views), "max_boxes": loaded.max_boxes,
        "versions": {"torch": torch.__version__, "onnxruntime": _ort_version()},
    }, indent=2) + "\n")


def export_onnx(*, run: str | Path | None, out: str | Path, model: str | None = None, checkpoint: str = "best",
                opset: int = 17, int8: bool = False, frames: int = 4, max_boxes: int = 6, box_bins: float = 1.0,
                score_tol: float = 0.01, log: Callable[[str], None] = print) -> list[FrameCheck]:
    """Export base + the run's adapter, merged, as ONNX parts in `out`, checked against torch.

    Args:
        run: a run, checkpoint or adapter folder (None: the base alone).
        out: the export folder; new, or an empty one (as `loomlens merge` takes).
        model: the base (default: the run's).
        opset: the ONNX opset the parts are written in.
        int8: also write dynamically quantised parts, checked the same way.
        frames: synthetic frames the check runs on (at least 1).
        max_boxes, box_bins, score_tol: the check's answer budget and tolerances.
        log: where progress lines go.
    Returns:
        the check, one row per frame and set of parts.
    Raises:
        FileExistsError when `out` is a file or a folder that is not empty; ValueError for a bad
        opset or frame count; ExportCheckFailed when onnxruntime and torch disagree (nothing is left at `out`).
    """
    out = Path(out)
    check_output_folder(out, "the export folder", "choose an empty or new folder, or remove it (an export never "
                        "writes over one)")
    if not 14 <= opset <= 20:
        raise ValueError(f"--opset must be 14..20 (scaled dot-product attention needs 14), got {opset}")
    if frames < 1:
        raise ValueError(f"--check-frames must be at least 1, got {frames}")
    loaded = load_for_inference(model=model, adapter=run, checkpoint=checkpoint, precision="fp32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_export(loaded, tmp, opset=opset, int8=int8, log=log)
        images = check_frames(frames)
        sizes = [im.size for im in images]
        batch = 4
        options = {"max_boxes": max_boxes, "batch_size": batch, "classes": loaded.classes}
        reference = detect_with_details(loaded.model, loaded.processor, images, **options)
        checks = []
        for quantised in [False, True] if int8 else [False]:
            exported = OnnxFlorence(tmp, int8=quantised)
            got = detect_with_details(exported, loaded.processor, images, **options)
            found = compare([d.boxes for d in reference], [d.boxes for d in got], sizes,
                            parts="int8" if quantised else "fp32", box_bins=box_bins, score_tol=score_tol)
            for c in found:
                if not c.ok:  # diagnosed in the batch it was answered in
                    first = c.frame - c.frame % batch
                    chunk = slice(first, first + batch)
                    c.why = departure(loaded.model, exported, loaded.processor, images[chunk],
                                      [d.generation for d in reference[chunk]], [d.generation for d in got[chunk]],
                                      c.frame - first)
            checks += found
        if not all(c.ok for c in checks):
            bad = [c for c in checks if not c.ok]
            verdict = ""
            if all(c.parts == "int8" for c in bad):
                verdict = (" The fp32 parts agree with torch on every frame; the int8 parts do not: where the "
                           "answers part, int8's rounding outweighs torch's own margin between two tokens (a "
                           "margin near 0 is a model undecided there, which any lower precision may flip). Export "
                           "without --int8 (docs/line.md, int8).")
            raise ExportCheckFailed(
                f"onnxruntime differs from torch on {len(bad)} of {len(checks)} checks (tolerance: {box_bins:g} "
                f"location bin(s), score {score_tol:g}): " + "; ".join(
                    f"{c.parts} frame {c.frame}: {c.torch_boxes} vs {c.onnx_boxes} boxes, {c.max_bins:g} bins, "
                    f"score {c.max_score_diff:g} ({c.why})" for c in bad[:5]) + f".{verdict} Nothing was written "
                f"to {out}.")
        if out.is_dir():
            if not holds_files(out):  # the empty folder given: what a file manager hides there stays
                keep_unseen(out, tmp)
            out.rmdir()  # one filled since the check fails here, untouched
        tmp.rename(out)
        return checks
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
