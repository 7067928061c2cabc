"""Florence-2 answering through onnxruntime: the five ONNX parts `loomlens export` writes
(vision encoder, token embedding, text encoder, and the decoder as the community's pair: a
first step and a step with past key/values) and a greedy search that keeps what a score needs,
as `loomlens.infer.generation.generate` does with torch.

In: an export folder. Out: `OnnxFlorence`, which `generate` dispatches to, so detection,
scoring, tiling and region rules run unchanged on top. The decoder keeps a KV cache, as torch's
`generate` does: `decoder_model` runs once on the decoder-start token and returns every layer's
key/values; each later step feeds `decoder_with_past_model` only the newest token's embedding
and the cache, and gets the next logits and the self-attention cache one position longer (the
cross-attention key/values depend on the encoder states only and are reused as they are).
The search is torch's: greedy (num_beams 1) with `loomlens.infer.generation.generation_settings`
(decoder start, forced `<s>` first and `</s>` at the budget's end, no n-gram ban; a
checkpoint's generation_config never changes an answer), the output rows past the tokenizer's
length masked (`VocabMask`), then any `logits_processor` (the class grammar), in the order
transformers applies them; log-probabilities are read from the raw logits over the
tokenizer's tokens, as the torch path reads them, and each chosen `<loc_N>`'s mean bin and
probability near, and each other token's runners-up, from the same log-probs (`step_readings`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loomlens.infer.generation import (
    ANSWER_START,
    MAX_BOXES,
    Generation,
    StepReadings,
    VocabMask,
    allowed_top,
    decode_generation,
    generation_settings,
    loc_lookup,
    step_readings,
)
from loomlens.infer.pixels import model_inputs

#: The parts an export folder holds, by the names the community's Florence-2 ONNX exports use
#: (onnx-community/Florence-2-base: the split decoder pair optimum's seq2seq runtime loads).
PARTS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model", "decoder_with_past_model")
MANIFEST = "loomlens_export.json"


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("the onnx backend needs onnxruntime: pip install 'loomlens[onnx]'") from exc
    return onnxruntime


def providers(device: str = "cpu") -> list[str]:
    """onnxruntime execution providers for `device`: CUDA first where asked for and present."""
    available = _ort().get_available_providers()
    wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxFlorence:
    """An exported Florence-2, ready to answer.

    Args:
        folder: a folder `loomlens export --format onnx` wrote (the five parts, config.json,
            generation_config.json, the processor and tokenizer files, loomlens_export.json).
        device: cpu, or cuda (the CUDA execution provider where onnxruntime has it).
        int8: use the dynamically quantised parts (`*_int8.onnx`) the export made; the parts
            it left in fp32 (the manifest's `int8_parts` says which) run as they are.
        threads: onnxruntime's threads per part (None: its default, one per physical core).
    Raises FileNotFoundError naming a missing part and the fix.
    """

    def __init__(self, folder: str | Path, *, device: str = "cpu", int8: bool = False, threads: int | None = None):
        from transformers import AutoConfig, GenerationConfig

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} is not an ONNX export (no {MANIFEST}); write one with "
                                    "`loomlens export RUN OUT --format onnx` and pass OUT")
        self.manifest = json.loads(manifest.read_text())
        if not self.manifest.get("kv_cache"):
            raise FileNotFoundError(f"{self.folder} was exported by an older loomlens (a decoder without KV cache, "
                                    "no decoder_with_past_model.onnx); export it again")
        quantised = set(self.manifest.get("int8_parts") or [])
        if int8 and not quantised:
            raise FileNotFoundError(f"{self.folder} has no int8 parts; export again with --int8")
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        chosen = providers(device)
        self.sessions = {}
        for part in PARTS:
            path = self.folder / f"{part}{'_int8' if int8 and part in quantised else ''}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the export is incomplete; export again")
            self.sessions[part] = ort.InferenceSession(str(path), options, providers=chosen)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.device = device
        # The cache's names, in the order the decoders take and give them.
        self.past_names = [i.name for i in self.sessions["decoder_with_past_model"].get_inputs()
                           if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.sessions["decoder_model"].get_outputs()][1:]

    def _run(self, part: str, **feeds: np.ndarray) -> np.ndarray:
        return self.sessions[part].run(None, feeds)[0]

    def encode(self, processor, images: Sequence[Image.Image], prompts: Sequence[str],
               fast_pixels: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The text encoder's states for images + prompts, and the attention mask."""
        inputs = model_inputs(processor, images, prompts, fast_pixels)
        ids = inputs["input_ids"].numpy()
        mask = inputs["attention_mask"].numpy()
        features = self._run("vision_encoder", pixel_values=inputs["pixel_values"].numpy().astype(np.float32))
        embeds = self._run("embed_tokens", input_ids=ids)
        placeholder = ids == self.config.image_token_id
        embeds[placeholder] = features.reshape(-1, features.shape[-1])  # row-major, as masked_scatter
        return self._run("encoder_model", inputs_embeds=embeds, attention_mask=mask), mask

    def first_step(self, tokens: np.ndarray, states: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict]:
        """`decoder_model`: logits at every position of `tokens` (batch, answer) and the cache,
        `{past_key_values.L.decoder|encoder.key|value: array}`."""
        out = self.sessions["decoder_model"].run(None, {
            "inputs_embeds": self._run("embed_tokens", input_ids=tokens), "encoder_hidden_states": states,
            "encoder_attention_mask": mask})
        return out[0], {n.replace("present.", "past_key_values."): a for n, a in zip(self.present_names, out[1:])}

    def next_step(self, token: np.ndarray, mask: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """`decoder_with_past_model`: the logits after one more token per row (`token`, shape
        (batch,)) and the cache with the self-attention key/values one position longer."""
        out = self.sessions["decoder_with_past_model"].run(None, {
            "inputs_embeds": self._run("embed_tokens", input_ids=token[:, None]), "encoder_attention_mask": mask,
            **{n: cache[n] for n in self.past_names}})
        names = [o.name for o in self.sessions["decoder_with_past_model"].get_outputs()][1:]
        return out[0], {**cache, **{n.replace("present.", "past_key_values."): a for n, a in zip(names, out[1:])}}

    def generate(self, processor, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int,
                 num_beams: int = 1, logits_processor=None, fast_pixels: bool = True) -> list[Generation]:
        """One `Generation` per (image, prompt), greedy; the contract of
        `loomlens.infer.generation.generate`. Raises ValueError for beam search."""
        from transformers import (
            ForcedBOSTokenLogitsProcessor,
            ForcedEOSTokenLogitsProcessor,
            LogitsProcessorList,
        )

        if num_beams != 1:
            raise ValueError("the onnx backend searches greedily (num_beams 1); use the torch backend for beams")
        tokenizer = processor.tokenizer
        settings = generation_settings(self, tokenizer, max_new_tokens=max_new_tokens, num_beams=1)
        budget, eos, pad = settings["max_new_tokens"], settings["eos_token_id"], settings["pad_token_id"]
        size = len(tokenizer)
        # As transformers builds them: its own processors first, then the caller's.
        rules = LogitsProcessorList([
            ForcedBOSTokenLogitsProcessor(settings["forced_bos_token_id"]),
            ForcedEOSTokenLogitsProcessor(budget + 1, settings["forced_eos_token_id"]),  # max_length: start + budget
            VocabMask(size), *(logits_processor or [])])
        states, mask = self.encode(processor, images, prompts, fast_pixels)
        ids = np.full((len(images), 1), settings["decoder_start_token_id"], dtype=np.int64)
        logits, cache = self.first_step(ids, states, mask)
        done = np.zeros(len(images), dtype=bool)
        logprobs, ends, readings = [], [None] * len(images), [StepReadings() for _ in images]
        lookup = loc_lookup(tokenizer, logits.shape[-1], "cpu")
        for step in range(budget):
            last = logits[:, -1, :].astype(np.float32)
            scores = rules(torch.from_numpy(ids), torch.from_numpy(last.copy())).numpy()
            chosen = np.where(done, pad, scores.argmax(-1))
            real = np.full_like(last, -np.inf)  # log-softmax over the tokenizer's tokens, as torch reads it
            shifted = last[:, :size] - last[:, :size].max(-1, keepdims=True)
            real[:, :size] = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            logprobs.append(real[np.arange(len(images)), chosen])
            step_readings(step, torch.from_numpy(real), allowed_top(torch.from_numpy(scores)), torch.from_numpy(chosen),
                          lookup, readings)
            if step == ANSWER_START:
                ends = real[:, eos].tolist()
            ids = np.concatenate([ids, chosen[:, None]], axis=1)
            done |= chosen == eos
            if done.all() or step == budget - 1:
                break
            logits, cache = self.next_step(chosen, mask, cache)
        generated = ids[:, 1:].tolist()
        scores_by_row = np.stack(logprobs, axis=1).tolist()
        return [decode_generation(tokenizer, row, lp, end_logprob=end, readings=read)
                for row, lp, end, read in zip(generated, scores_by_row, ends, readings)]


def load_onnx_export(folder: str | Path, *, device: str = "cpu", precision: str = "auto"):
    """An export folder as a `loomlens.infer.loading.LoadedModel` (what `Predictor` runs):
    the ONNX model, its processor, and what its run said (classes, tasks, tile size, region
    rules). `precision` int8 takes the quantised parts; auto and fp32 the fp32 ones.
    Raises FileNotFoundError for a folder that is no export, ValueError for a bad precision."""
    from loomlens.infer.loading import LoadedModel
    from loomlens.model.loader import load_processor
    from loomlens.model.runtime import keep_freed_memory

    if precision not in ("auto", "fp32", "int8"):
        raise ValueError(f"the onnx backend runs fp32 or int8 parts (precision auto | fp32 | int8), not {precision!r}")
    if str(device).startswith("cpu"):
        keep_freed_memory()  # the pixels, logits and numpy buffers around onnxruntime's own arena
    folder = Path(folder)
    net = OnnxFlorence(folder, device=device, int8=precision == "int8")
    m = net.manifest
    rules = folder / "regions.yaml"
    return LoadedModel(net, load_processor(str(folder)), str(folder), adapter=None,
                       run=Path(m["run"]) if m.get("run") else None, classes=list(m.get("classes", [])),
                       trained_tasks=frozenset(m.get("trained_tasks", [])), tile_size=m.get("tile_size"),
                       views=tuple(m.get("views", [""])), max_boxes=m.get("max_boxes", MAX_BOXES),
                       precision="int8" if precision == "int8" else "fp32", rules=rules if rules.is_file() else None)
