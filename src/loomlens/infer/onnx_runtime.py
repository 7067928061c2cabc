"""Florence-2 answering through onnxruntime: the four ONNX parts `loomlens export` writes
(vision encoder, token embedding, text encoder, decoder) and a greedy search that keeps what a
score needs, as `loomlens.infer.generation.generate` does with torch.

In: an export folder. Out: `OnnxFlorence`, which `generate` dispatches to, so detection,
scoring, tiling and region rules run unchanged on top. The decoder has no KV cache: each step
reruns the decoder over the answer so far (simple and exact; slower per token on long answers).
The search is greedy (num_beams 1) with the generation config's forced BOS/EOS and no-repeat
n-gram rules, then any `logits_processor` (the class grammar); log-probabilities are read from
the raw logits, as the torch path reads them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loomlens.infer.generation import Generation, decode_generation
from loomlens.infer.pixels import model_inputs

#: The parts an export folder holds, by the names the community's Florence-2 ONNX exports use.
PARTS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model")
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
        folder: a folder `loomlens export --format onnx` wrote (the four parts, config.json,
            generation_config.json, the processor and tokenizer files, loomlens_export.json).
        device: cpu, or cuda (the CUDA execution provider where onnxruntime has it).
        int8: use the dynamically quantised parts (`*_int8.onnx`) when the export made them.
    Raises FileNotFoundError naming a missing part and the fix.
    """

    def __init__(self, folder: str | Path, *, device: str = "cpu", int8: bool = False):
        from transformers import AutoConfig, GenerationConfig

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} is not an ONNX export (no {MANIFEST}); write one with "
                                    "`loomlens export RUN OUT --format onnx` and pass OUT")
        self.manifest = json.loads(manifest.read_text())
        suffix = "_int8" if int8 else ""
        if int8 and not self.manifest.get("int8"):
            raise FileNotFoundError(f"{self.folder} has no int8 parts; export again with --int8")
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = providers(device)
        self.sessions = {}
        for part in PARTS:
            path = self.folder / f"{part}{suffix}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the export is incomplete; export again")
            self.sessions[part] = ort.InferenceSession(str(path), options, providers=chosen)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.device = device

    def _run(self, part: str, **feeds: np.ndarray) -> np.ndarray:
        return self.sessions[part].run(None, feeds)[0]

    def _rules(self, max_new_tokens: int):
        """The generation config's own search rules as logits processors (torch's search
        applies the same ones)."""
        from transformers import (ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
                                  LogitsProcessorList, NoRepeatNGramLogitsProcessor)

        g, rules = self.generation_config, LogitsProcessorList()
        if g.no_repeat_ngram_size:
            rules.append(NoRepeatNGramLogitsProcessor(g.no_repeat_ngram_size))
        if g.forced_bos_token_id is not None:
            rules.append(ForcedBOSTokenLogitsProcessor(g.forced_bos_token_id))
        if g.forced_eos_token_id is not None:
            rules.append(ForcedEOSTokenLogitsProcessor(max_new_tokens + 1, g.forced_eos_token_id))
        return rules

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

    def generate(self, processor, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int,
                 num_beams: int = 1, logits_processor=None, fast_pixels: bool = True) -> list[Generation]:
        """One `Generation` per (image, prompt), greedy; the contract of
        `loomlens.infer.generation.generate`. Raises ValueError for beam search."""
        if num_beams != 1:
            raise ValueError("the onnx backend searches greedily (num_beams 1); use the torch backend for beams")
        states, mask = self.encode(processor, images, prompts, fast_pixels)
        start = self.generation_config.decoder_start_token_id
        eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
        rules = self._rules(max_new_tokens)
        if logits_processor is not None:
            rules.extend(logits_processor)
        ids = np.full((len(images), 1), start, dtype=np.int64)
        done = np.zeros(len(images), dtype=bool)
        logprobs = []
        for _ in range(max_new_tokens):
            logits = self._run("decoder_model", input_ids=ids, encoder_hidden_states=states,
                               encoder_attention_mask=mask).astype(np.float32)
            scores = rules(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy() if rules else logits
            chosen = np.where(done, pad, scores.argmax(-1))
            shifted = logits - logits.max(-1, keepdims=True)
            raw = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            logprobs.append(raw[np.arange(len(images)), chosen])
            ids = np.concatenate([ids, chosen[:, None]], axis=1)
            done |= chosen == eos
            if done.all():
                break
        generated = ids[:, 1:].tolist()
        scores_by_row = np.stack(logprobs, axis=1).tolist()
        return [decode_generation(processor.tokenizer, row, lp) for row, lp in zip(generated, scores_by_row)]


def load_onnx_export(folder: str | Path, *, device: str = "cpu", precision: str = "auto"):
    """An export folder as a `loomlens.infer.loading.LoadedModel` (what `Predictor` runs):
    the ONNX model, its processor, and what its run said (classes, tasks, tile size, region
    rules). `precision` int8 takes the quantised parts; auto and fp32 the fp32 ones.
    Raises FileNotFoundError for a folder that is no export, ValueError for a bad precision."""
    from transformers import AutoProcessor

    from loomlens.infer.loading import LoadedModel

    if precision not in ("auto", "fp32", "int8"):
        raise ValueError(f"the onnx backend runs fp32 or int8 parts (precision auto | fp32 | int8), not {precision!r}")
    folder = Path(folder)
    net = OnnxFlorence(folder, device=device, int8=precision == "int8")
    m = net.manifest
    rules = folder / "regions.yaml"
    return LoadedModel(net, AutoProcessor.from_pretrained(folder), str(folder), adapter=None,
                       run=Path(m["run"]) if m.get("run") else None, classes=list(m.get("classes", [])),
                       trained_tasks=frozenset(m.get("trained_tasks", [])), tile_size=m.get("tile_size"),
                       precision="int8" if precision == "int8" else "fp32", rules=rules if rules.is_file() else None)
