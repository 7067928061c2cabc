"""A bounded request queue in front of the model, drained by one worker thread in small batches.

Every request (API or page) becomes a `Job` on a `queue.Queue(maxsize=max_queue)`. Putting
never blocks: a full queue raises `QueueFull` at once, so the server answers 503 with a
`Retry-After` instead of letting requests pile up. One worker thread owns the model: it takes
a job, waits up to `batch_wait_ms` for more (at most `max_batch`), groups the jobs whose
options are equal and calls `predict` once per group. At most `max_queue` jobs wait and at most
`max_batch` run, so memory and latency stay bounded whatever the load.
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
    image: object
    options: Options
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0


#: `predict(images, options) -> list[Prediction]`, one per image, in order.
PredictFn = Callable[[list, Options], list]


class Batcher:
    def __init__(
        self,
        predict: PredictFn,
        max_queue: int = 16,
        max_batch: int = 4,
        batch_wait_ms: float = 5.0,
        worker_delay_ms: float = 0.0,
    ):
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self._predict = predict
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        #: Test-only: extra sleep per batch so a test can fill the queue deterministically.
        self.worker_delay = worker_delay_ms / 1000.0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch_seconds: deque[float] = deque(maxlen=20)
        self.counts = {"accepted": 0, "rejected": 0, "done": 0, "failed": 0, "batches": 0}
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
        while True:
            try:
                job = self._queue.get_nowait()
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
        return max(1, min(60, math.ceil(batches * (per_batch + self.worker_delay))))

    def submit(self, image, options: Options) -> Job:
        """Queue one image; never blocks. Raises `QueueFull` when `max_queue` jobs wait."""
        if not self.alive:
            raise RuntimeError("the inference worker is not running")
        job = Job(image=image, options=options)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.counts["rejected"] += 1
            raise QueueFull(self.retry_after(), self.max_queue) from None
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
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "recent_batch_ms": round(1000 * sum(recent) / len(recent), 1) if recent else None,
            **counts,
        }

    # -- the worker ------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        try:
            first = self._queue.get(timeout=0.5)
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

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            # A job whose caller gave up (future cancelled) is dropped here.
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.busy = True
            try:
                self._run_batch(batch)
            finally:
                self.busy = False

    def _run_batch(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        if self.worker_delay:
            time.sleep(self.worker_delay)
        groups: dict[Options, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.options, []).append(job)
        for options, jobs in groups.items():
            started = time.perf_counter()
            try:
                results = self._predict([j.image for j in jobs], options)
                if len(results) != len(jobs):
                    raise RuntimeError(f"predict returned {len(results)} results for {len(jobs)} images")
            except BaseException as exc:  # noqa: BLE001 - every caller must hear back
                log.exception("prediction failed for a batch of %d (%s)", len(jobs), options.task)
                with self._lock:
                    self.counts["failed"] += len(jobs)
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            with self._lock:
                self.counts["done"] += len(jobs)
            for job, result in zip(jobs, results, strict=True):
                job.started, job.finished, job.batch_size = started, finished, len(jobs)
                job.future.set_result(result)
        with self._lock:
            self.counts["batches"] += 1
            self._batch_seconds.append(time.perf_counter() - t0)
