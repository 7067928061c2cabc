"""Shape-aware attention: the math path for wide heads, the kernel timed fastest for the rest,
the same results either way, and the timed choice kept for the machine."""

import json
import threading
import types

import pytest
import torch
from PIL import Image

from loomlens.model import load_model
from loomlens.infer import attention
from loomlens.infer.attention import MARGIN, NAME, shape_aware
from loomlens.infer.loading import ready_for_inference

_real_math = attention._math_attention


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts as a fresh process on a machine that has timed nothing."""
    monkeypatch.setenv("LOOMLENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(attention, "_ON_MATH", {})
    return tmp_path / "cache" / attention.CACHE_FILE


def _fake_kernels(monkeypatch, sdpa_cost: float, math_cost: float) -> list[str]:
    """Each kernel advances a fake clock by its cost and logs its name in the returned list."""
    clock, calls = types.SimpleNamespace(now=0.0), []

    def kernel(name, cost):
        def run(module, query, *args, **kwargs):
            clock.now += cost
            calls.append(name)
            return query.transpose(1, 2), None
        return run

    monkeypatch.setattr(attention.time, "perf_counter", lambda: clock.now)
    monkeypatch.setattr(attention, "sdpa_attention_forward", kernel("sdpa", sdpa_cost))
    monkeypatch.setattr(attention, "_math_attention", kernel("math", math_cost))
    return calls


def _module() -> torch.nn.Module:
    module = torch.nn.Module().eval()
    module.is_causal = False  # as Florence-2's attention modules say
    return module


@pytest.mark.parametrize("head_dim, math_timed_faster, path", [
    (4096, None, "math"),  # a channel-attention "head": never timed
    (16, True, "math"),  # a window head the math path won on this machine
    (16, False, "sdpa"),
])
def test_each_path_computes_attention(head_dim, math_timed_faster, path, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, head_dim) for _ in range(3))
    shape = attention._shape_class(q, k, None)
    monkeypatch.setattr(attention, "_ON_MATH", {} if math_timed_faster is None else {shape: math_timed_faster})
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1).transpose(1, 2)
    used = []
    monkeypatch.setattr(attention, "_math_attention",
                        lambda *a, **kw: used.append("math") or _real_math(*a, **kw))
    out, _ = shape_aware(_module(), q, k, v, None, scaling=0.1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert used == (["math"] if path == "math" else [])
    assert attention._ON_MATH == ({} if math_timed_faster is None else {shape: math_timed_faster})


@pytest.mark.parametrize("causal", [True, False, None])
@pytest.mark.parametrize("queries", [1, 5])
def test_the_math_path_masks_as_sdpa_does(causal, queries):
    """A causal layer given no mask (a decoder's teacher-forced pass) sees no later token on
    either path; `is_causal` passed in the call overrides the module's, as in transformers."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, queries, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    module = _module()
    module.is_causal = True
    kwargs = {} if causal is None else {"is_causal": causal}
    expected, _ = attention.sdpa_attention_forward(module, q, k, v, None, scaling=0.3, **kwargs)
    out, _ = _real_math(module, q, k, v, None, scaling=0.3, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_a_teacher_forced_pass_matches_transformers_sdpa(monkeypatch):
    """The whole model with every attention call on the math path and on transformers' SDPA
    gives the same logits for a forward pass with labels (every decoder position at once)."""
    monkeypatch.setattr(attention, "_math_is_faster", lambda *args: True)
    model, processor = load_model("tiny")
    model.eval()
    inputs = processor(text=["<OD>"], images=[Image.new("RGB", (64, 48), (90, 120, 150))], return_tensors="pt")
    labels = processor.tokenizer(["wrinkle<loc_1><loc_2><loc_3><loc_4>"], return_tensors="pt").input_ids
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(**inputs, labels=labels).logits
        attention.use_shape_aware_attention(model)
        out = model(**inputs, labels=labels).logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sdpa_cost, math_cost, on_math", [
    (3.0, 1.0, True),  # the one-query decoder steps on an AVX512 CPU in bf16
    (MARGIN * 0.9, 1.0, False),  # faster, but within the margin: SDPA stays
    (1.0, 2.0, False),
])
def test_the_faster_kernel_is_timed_once_per_shape_class(sdpa_cost, math_cost, on_math, monkeypatch):
    """The first call of a shape class times both kernels; later calls of the class (keys
    within the same power of two, any batch size) reuse the choice, so an image's answer does
    not depend on what it was batched with."""
    calls = _fake_kernels(monkeypatch, sdpa_cost, math_cost)
    q = torch.zeros(16, 4, 1, 48)
    shape_aware(_module(), q, torch.zeros(16, 4, 70, 48), torch.zeros(16, 4, 70, 48))
    assert calls == ["sdpa"] * 4 + ["math"] * 4 + ["math" if on_math else "sdpa"]
    calls.clear()
    shape_aware(_module(), q, torch.zeros(16, 4, 90, 48), torch.zeros(16, 4, 90, 48))  # 90 keys: still 128
    assert calls == ["math" if on_math else "sdpa"]
    assert len(attention._ON_MATH) == 1
    shape_aware(_module(), q[:3], torch.zeros(3, 4, 70, 48), torch.zeros(3, 4, 70, 48))
    assert calls == ["math" if on_math else "sdpa"] * 2  # another batch size: the same kernel
    assert len(attention._ON_MATH) == 1
    shape_aware(_module(), q, torch.zeros(16, 4, 200, 48), torch.zeros(16, 4, 200, 48))
    assert len(attention._ON_MATH) == 2  # another class: timed anew


def _one_call(calls: list[str]) -> list[str]:
    """The kernels one window-shaped call ran (timing included), the log cleared after."""
    shape_aware(_module(), *(torch.zeros(8, 2, 64, 16) for _ in range(3)))
    ran = list(calls)
    calls.clear()
    return ran


def test_the_choice_is_kept_for_the_next_process_on_the_machine(own_cache, monkeypatch):
    calls = _fake_kernels(monkeypatch, 3.0, 1.0)  # the math path 3x faster: past the margin
    assert _one_call(calls) == ["sdpa"] * 4 + ["math"] * 5
    kept = json.loads(own_cache.read_text())
    assert list(kept) == [attention.machine_signature()]
    assert [timing["math"] for timing in kept[attention.machine_signature()].values()] == [True]
    monkeypatch.setattr(attention, "_ON_MATH", {})  # a new process: nothing timed in memory
    calls = _fake_kernels(monkeypatch, 1.0, 3.0)  # today SDPA would time faster: the kept choice holds
    assert _one_call(calls) == ["math"]


def test_another_machine_or_a_damaged_cache_times_anew(own_cache, monkeypatch):
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text(json.dumps({"another CPU | torch 0": {"x": {"math": True}}}))
    calls = _fake_kernels(monkeypatch, 1.0, 1.0)  # a tie: timed, and SDPA kept
    assert _one_call(calls) == ["sdpa"] * 4 + ["math"] * 4 + ["sdpa"]
    assert len(json.loads(own_cache.read_text())) == 2  # the other machine's choices stay
    own_cache.write_text("{not json")
    monkeypatch.setattr(attention, "_ON_MATH", {})
    assert _one_call(calls) == ["sdpa"] * 4 + ["math"] * 4 + ["sdpa"]
    assert attention.machine_signature() in json.loads(own_cache.read_text())  # rewritten whole


def test_a_cache_folder_that_cannot_be_written_still_chooses(tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("LOOMLENS_CACHE_DIR", str(tmp_path / "a file"))  # no folder can be made there
    calls = _fake_kernels(monkeypatch, 3.0, 1.0)
    assert _one_call(calls) == ["sdpa"] * 4 + ["math"] * 5
    assert _one_call(calls) == ["math"]  # remembered for the process all the same


@torch.no_grad()
def test_ready_model_uses_it_everywhere_and_answers_the_same():
    model, processor = load_model("tiny")
    model.eval()
    inputs = processor(text=["<OD>"], images=[torch.zeros(3, 64, 64)], return_tensors="pt")
    decoder = torch.tensor([[2, 0, 40, 900]])
    expected = model(**inputs, decoder_input_ids=decoder).logits
    ready = ready_for_inference(model, "fp32")
    assert ready.config._attn_implementation == NAME
    assert ready.config.vision_config._attn_implementation == NAME
    torch.testing.assert_close(ready(**inputs, decoder_input_ids=decoder).logits, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_a_batch_that_pads_is_masked_as_sdpa_masks_it():
    """Two prompts of different lengths pad the shorter one: its padding must stay out of the
    encoder's attention and the decoder's cross-attention, as on SDPA."""
    model, processor = load_model("tiny")
    model.eval()
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a broken weft across the loom"]
    inputs = processor(text=prompts, images=[torch.zeros(3, 64, 64)] * 2, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    decoder = torch.tensor([[2, 0, 40, 900]] * 2)
    model.set_attn_implementation("sdpa")
    expected = model(**inputs, decoder_input_ids=decoder).logits
    ready = ready_for_inference(model, "fp32")
    assert ready.config._attn_implementation == NAME
    torch.testing.assert_close(ready(**inputs, decoder_input_ids=decoder).logits, expected, rtol=0, atol=1e-4)


def test_the_choice_does_not_depend_on_the_thread_count(own_cache, monkeypatch):
    """A batch's halves run on fewer threads than a lone image (`infer/streams.py`): both
    must find the same kept choice, or an image's answer would depend on its company."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = attention.machine_signature()
        torch.set_num_threads(1)
        assert attention.machine_signature() == two
    finally:
        torch.set_num_threads(before)


def test_two_streams_meeting_a_new_shape_time_it_once(monkeypatch):
    calls = _fake_kernels(monkeypatch, 3.0, 1.0)
    start = threading.Barrier(2)

    def call():
        start.wait()
        shape_aware(_module(), *(torch.zeros(8, 2, 64, 16) for _ in range(3)))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == sorted(["sdpa"] * 4 + ["math"] * 4 + ["math"] * 2)  # one timing, two calls
    assert len(attention._ON_MATH) == 1
