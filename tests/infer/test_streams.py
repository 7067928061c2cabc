"""A batch's halves at once on a CPU: the same results in the same order as one call, errors
raised, each worker on its share of torch's threads, and the caller's own count left alone."""

import threading

import pytest
import torch
from PIL import Image, ImageDraw

from loomlens.infer import detection
from loomlens.infer.detection import detect_with_details
from loomlens.infer.streams import STREAMS, in_streams, stream_count


@pytest.fixture
def two_threads():
    """torch on two threads for the test (what a 2-core machine runs), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 16])
def test_results_come_back_in_order_from_parts_of_near_equal_size(count, two_threads):
    seen: list[tuple[str, list[int]]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append((threading.current_thread().name, items))
        return [10 * i for i in items]

    assert in_streams(fn, range(count), streams=2) == [10 * i for i in range(count)]
    sizes = sorted(len(items) for _, items in seen)
    assert sizes == ([count] if count < 2 else [count // 2, count - count // 2])
    on_workers = [name.startswith("loomlens-stream") for name, _ in seen]
    assert all(on_workers) if count >= 2 else not any(on_workers)  # one part runs in the caller


@pytest.mark.parametrize("streams", [0, -2])
def test_a_stream_count_below_one_is_refused(streams):
    with pytest.raises(ValueError, match="streams must be 1 or more"):
        in_streams(lambda items: items, [1, 2], streams=streams)


def test_an_error_in_a_part_is_raised_after_every_part_has_finished(two_threads):
    finished = []

    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("bad image 0")
        finished.append(items)
        return items

    with pytest.raises(ValueError, match="bad image 0"):
        in_streams(fn, [0, 1, 2, 3], streams=2)
    assert finished == [[2, 3]]


def test_a_part_that_splits_again_runs_whole_instead_of_waiting_on_its_own_pool(two_threads):
    def inner(items: list[int]) -> list[str]:
        return [threading.current_thread().name for _ in items]

    names = in_streams(lambda items: in_streams(inner, items, streams=2), [0, 1, 2, 3], streams=2)
    assert len(names) == 4 and all(name.startswith("loomlens-stream") for name in names)


def test_a_part_with_a_result_missing_is_refused(two_threads):
    with pytest.raises(ValueError, match=r"returned \[1, 2\] results for parts of \[2, 2\] items"):
        in_streams(lambda items: items[1:] if 0 in items else items, [0, 1, 2, 3], streams=2)


def test_workers_run_on_their_share_of_threads_and_the_callers_count_stays(two_threads):
    counts = in_streams(lambda items: [torch.get_num_threads() for _ in items], [0, 1], streams=2)
    assert counts == [1, 1]
    assert torch.get_num_threads() == 2
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [2]  # a thread started later gets the caller's count, not a worker's


def test_stream_count_follows_the_device_and_threads(tiny, two_threads):
    model, _ = tiny
    assert stream_count(model) == STREAMS
    torch.set_num_threads(1)
    assert stream_count(model) == 1
    assert stream_count(object()) == 1  # an exported model's runtime: its own threads


def test_detection_in_halves_equals_one_call(tiny, two_threads, monkeypatch):
    """On a CPU a batch's halves run on the workers, and each is the computation it would be
    alone: the same boxes, scores and tokens as one call."""
    model, processor = tiny
    callers: list[tuple[str, int]] = []
    real_generate = detection.generate

    def generate(model, processor, images, *args):
        callers.append((threading.current_thread().name.split("_")[0], len(images)))
        return real_generate(model, processor, images, *args)

    monkeypatch.setattr(detection, "generate", generate)
    frames = []
    for i in range(5):
        frame = Image.new("RGB", (320, 200), (40 + 10 * i, 40, 40))
        ImageDraw.Draw(frame).rectangle([30 + 30 * i, 40, 150 + 20 * i, 170], fill=(230, 230, 230))
        frames.append(frame)
    assert stream_count(model) == 2
    halves = detect_with_details(model, processor, frames, max_boxes=3, batch_size=5)
    assert sorted(callers) == [("loomlens-stream", 2), ("loomlens-stream", 3)]
    callers.clear()
    whole = detect_with_details(model, processor, frames, max_boxes=3, batch_size=5, streams=1)
    assert callers == [("MainThread", 5)]
    assert any(d.boxes for d in whole)
    for a, b in zip(halves, whole, strict=True):
        assert a.generation.token_ids == b.generation.token_ids
        assert [x.label for x in a.boxes] == [x.label for x in b.boxes]
        # Edges sit at mean bins (`expected_bins`): a batch's size moves the logits' last bits.
        assert [c for x in a.boxes for c in (x.x1, x.y1, x.x2, x.y2)] == pytest.approx(
            [c for x in b.boxes for c in (x.x1, x.y1, x.x2, x.y2)], abs=1e-3)
        assert [x.score for x in a.boxes] == pytest.approx([x.score for x in b.boxes], abs=1e-4)
