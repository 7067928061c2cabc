"""Two halves of a batch at once on a CPU, each on half of torch's threads.

In: a function from a list of items to a list of results, and the items (a batch of images).
Out: the function's results for all items, in order, as one call would give them.

A small Florence-2 leaves a CPU's cores idle under intra-op threading alone: its ops are small
(the tiny's first DaViT stage has 32 channels, a decoding step 8-16 rows), and between them
Python runs on one core at a time. torch releases the GIL inside each op, so two Python threads
that each drive half a batch on half the threads keep both busy; on 2 cores, halves of 16
answered ~15 % more images a second than one call of 32 (docs/benchmarks.md, "Inference
speed"). The answers are those of two calls of half the size, one after the other.

torch's intra-op thread count is per thread under OpenMP (`torch.set_num_threads` in a thread
sets that thread's count and the default of threads that have not used theirs yet): the
workers set theirs once when they start, and the default is restored to the caller's before
they are used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["STREAMS", "in_streams", "stream_count"]

T = TypeVar("T")
R = TypeVar("R")

#: Halves on a CPU with two or more threads: three or four ran no faster than two on 2 cores.
STREAMS = 2
#: (streams, threads each) -> the pool whose workers run with that many threads.
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
#: `worker` is set on the pools' threads: a part that splits again runs whole (its pool is busy).
_LOCAL = threading.local()


def stream_count(model) -> int:
    """How many parts a batch for `model` runs in: `STREAMS` for a torch model on the CPU
    with two or more torch threads, else 1 (a GPU queues its own work; an exported model's
    runtime has its own threads)."""
    if not isinstance(model, torch.nn.Module) or next(model.parameters()).device.type != "cpu":
        return 1
    return STREAMS if torch.get_num_threads() >= 2 else 1


def _start_worker(threads: int) -> None:
    """Set this worker's thread count. torch applies a thread's count lazily, from the default
    of the moment, at the thread's first use of it: used here, before the caller restores it."""
    torch.set_num_threads(threads)
    torch.get_num_threads()
    _LOCAL.worker = True


def _pool(streams: int) -> ThreadPoolExecutor:
    """The pool of `streams` workers for the caller's thread count, started: each worker has
    set its own count to an equal share of the caller's, and the caller's default is back."""
    total = torch.get_num_threads()
    key = (streams, max(1, total // streams))
    with _POOLS_LOCK:
        if key not in _POOLS:
            started = threading.Barrier(streams)
            pool = ThreadPoolExecutor(streams, thread_name_prefix="loomlens-stream",
                                      initializer=_start_worker, initargs=(key[1],))
            for done in [pool.submit(started.wait) for _ in range(streams)]:
                done.result()  # every worker started (and set its count) before any real work
            torch.set_num_threads(total)  # a worker's setting also became the default of new threads
            _POOLS[key] = pool
        return _POOLS[key]


def in_streams(fn: Callable[[list[T]], list[R]], items: Sequence[T], *, streams: int) -> list[R]:
    """`fn(items)`, computed as `streams` consecutive parts of `items` (sizes differing by at
    most one) at once, each on its own worker; one part (fewer items than streams, `streams`
    1, or a call from inside a part, whose pool is busy) runs in the caller. An exception in
    any part is raised here once all parts have finished. Raises ValueError for `streams` < 1,
    and when `fn` does not return one result per item (results would pair with other items)."""
    if streams < 1:
        raise ValueError(f"streams must be 1 or more, got {streams}")
    items = list(items)
    parts = min(streams, len(items))
    if parts <= 1 or getattr(_LOCAL, "worker", False):
        return fn(items)
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    pending = [_pool(streams).submit(fn, items[a:b]) for a, b in zip(bounds, bounds[1:])]
    wait(pending)  # no part is left running behind a raised error
    results = [part.result() for part in pending]
    if any(len(r) != b - a for r, a, b in zip(results, bounds, bounds[1:])):
        raise ValueError(f"{fn} returned {[len(r) for r in results]} results for parts of "
                         f"{[b - a for a, b in zip(bounds, bounds[1:])]} items")
    return [result for part in results for result in part]
