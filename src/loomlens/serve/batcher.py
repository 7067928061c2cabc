"""A bounded request queue in front of the model, drained by one worker thread in small batches.

Every request (API or page) becomes a `Job` on a `queue.Queue(maxsize=max_queue)`. Putting
never blocks: a full queue raises `QueueFull` at once, so the server answers 503 with a
`Retry-After` instead of letting requests pile up. One worker thread owns the model: it takes
a job, waits up to `batch_wait_ms` for more (at most `max_batch`), groups the jobs whose
options are equal and calls `predict` once per group. At most `max_queue` jobs wait and at most
`max_batch` run, so memory and latency stay bounded whatever the load.

Two lanes keep a large upload from holding everyone else up. A job's `cost` is the number of
model inputs it needs (tiles + the whole frame, see `Predictor.model_inputs`); a job costing
more than `large_cost` goes to the large lane (its own small bound, `max_large`) and runs
alone, and after each batch of its tiles the worker serves the waiting small jobs
(`between`), so a normal request waits at most one tile batch for it, not the whole frame. A
job carries a deadline: one still waiting past it is dropped with `TimeoutError`, and the
predictor stops a running one at its next model call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from loomlens.serve.errors import QueueFull
from loomlens.serve.tasks import Options

log = logging.getLogger("loomlens.serve")


@dataclass
class Job:
    """One request on the queue: the decoded image, its options, its cost in model inputs and
    its deadline (`time.monotonic()`, None: none); the future carries the answer."""

    image: object
    options: Options
    cost: int = 1
    deadline: float | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0


#: `predict(images, options, deadline, between) -> list[Prediction]`, one per image, in order;
#: `deadline` is the latest of the jobs' deadlines, `between()` may be called between tile batches.
PredictFn = Callable[[list, Options, "float | None", "Callable[[], None] | None"], list]


class Batcher:
    def __init__(
        self,
        predict: PredictFn,
        max_queue: int = 16,
        max_batch: int = 4,
        batch_wait_ms: float = 5.0,
        large_cost: int = 16,
        max_large: int | None = None,
    ):
        if max_queue < 1 or max_batch < 1 or large_cost < 1:
            raise ValueError("max_queue, max_batch and large_cost must be at least 1")
        self._predict = predict
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.large_cost = large_cost
        self.max_large = max_large or max(1, max_queue // 4)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._large: queue.Queue[Job] = queue.Queue(maxsize=self.max_large)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch_seconds: deque[float] = deque(maxlen=20)
        self.counts = {"accepted": 0, "rejected": 0, "done": 0, "failed": 0, "batches": 0, "large": 0,
                       "expired": 0}
        self.busy = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="loomlens-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)  # wake the worker
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        # Whatever is still queued will never run: tell its callers.
        for lane in (self._queue, self._large):
            while True:
                try:
                    job = lane.get_nowait()
                except queue.Empty:
                    break
                if job is not None and not job.future.done():
                    job.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting ------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue's batches times a recent batch time."""
        with self._lock:
            per_batch = sum(self._batch_seconds) / len(self._batch_seconds) if self._batch_seconds else 1.0
        batches = math.ceil((self._queue.qsize() + 1) / self.max_batch) + 1
        return max(1, min(60, math.ceil(batches * per_batch)))

    def submit(self, image, options: Options, cost: int = 1, deadline: float | None = None) -> Job:
        """Queue one image costing `cost` model inputs, to be done by `deadline`; never blocks.
        Raises `QueueFull` when its lane is full (`max_queue` small or `max_large` large jobs)."""
        if not self.alive:
            raise RuntimeError("the inference worker is not running")
        job = Job(image=image, options=options, cost=cost, deadline=deadline)
        lane, capacity = (self._large, self.max_large) if cost > self.large_cost else (self._queue, self.max_queue)
        try:
            lane.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.counts["rejected"] += 1
            raise QueueFull(self.retry_after(), capacity) from None
        with self._lock:
            self.counts["accepted"] += 1
        return job

    def stats(self) -> dict:
        with self._lock:
            counts = dict(self.counts)
            recent = list(self._batch_seconds)
        return {
            "worker_alive": self.alive,
            "busy": self.busy,
            "queued": self._queue.qsize(),
            "queued_large": self._large.qsize(),
            "max_queue": self.max_queue,
            "max_large": self.max_large,
            "large_cost": self.large_cost,
            "max_batch": self.max_batch,
            "recent_batch_ms": round(1000 * sum(recent) / len(recent), 1) if recent else None,
            **counts,
        }

    # -- the worker ------------------------------------------------------------------------
    def _take_batch(self, wait: float = 0.05) -> list[Job]:
        """Up to `max_batch` small jobs, or else one large job (small ones go first)."""
        try:
            first = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
        except queue.Empty:
            try:
                return [self._large.get_nowait()] if wait else []
            except queue.Empty:
                return []
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            batch.append(job)
        return batch

    def _live(self, batch: list[Job]) -> list[Job]:
        """The jobs still wanted: a cancelled one is dropped, one past its deadline is failed."""
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.deadline is not None and now > job.deadline:
                with self._lock:
                    self.counts["expired"] += 1
                job.future.set_exception(TimeoutError("the request waited past its deadline in the queue"))
                continue
            live.append(job)
        return live

    def _serve_small(self) -> None:
        """Run the small jobs waiting now (called between the tile batches of a large job)."""
        while not self._stop.is_set():
            batch = self._live(self._take_batch(wait=0))
            if not batch:
                return
            self._run_batch(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._live(self._take_batch())
            if not batch:
                continue
            self.busy = True
            try:
                large = batch[0].cost > self.large_cost
                self._run_batch(batch, self._serve_small if large else None)
                if large:
                    with self._lock:
                        self.counts["large"] += 1
            finally:
                self.busy = False

    def _run_batch(self, batch: list[Job], between: Callable[[], None] | None = None) -> None:
        t0 = time.perf_counter()
        groups: dict[Options, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.options, []).append(job)
        for options, jobs in groups.items():
            started = time.perf_counter()
            deadlines = [j.deadline for j in jobs]
            deadline = None if None in deadlines else max(deadlines)
            try:
                results = self._predict([j.image for j in jobs], options, deadline, between)
                if len(results) != len(jobs):
                    raise RuntimeError(f"predict returned {len(results)} results for {len(jobs)} images")
            except BaseException as exc:  # noqa: BLE001 - every caller must hear back
                if isinstance(exc, TimeoutError):
                    log.warning("a batch of %d (%s) ran past its deadline", len(jobs), options.task)
                else:
                    log.exception("prediction failed for a batch of %d (%s)", len(jobs), options.task)
                with self._lock:
                    self.counts["failed"] += len(jobs)
                for job in jobs:
                    job.image = None  # nothing keeps a decoded image past its answer
                    job.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            with self._lock:
                self.counts["done"] += len(jobs)
            for job, result in zip(jobs, results, strict=True):
                job.started, job.finished, job.batch_size = started, finished, len(jobs)
                job.image = None  # nothing keeps a decoded image past its answer
                job.future.set_result(result)
        with self._lock:
            self.counts["batches"] += 1
            self._batch_seconds.append(time.perf_counter() - t0)
