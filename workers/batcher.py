"""Dynamic batching for one engine: merge concurrent requests, run once, split back.

Like Triton's dynamic batcher: a request waits at most ``max_queue_delay_us`` for
others; a batch is sent as soon as it reaches ``max_batch`` rows (or a preferred
batch size). At most ``slots`` batches run at once (one execution context each).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from workers.tensors import batch_rows

Feeds = dict[str, np.ndarray]
log = logging.getLogger("forward-fleet.batcher")


@dataclass(frozen=True)
class BatchingOptions:
    max_batch: int = 64
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    enabled: bool = True


@dataclass
class EngineStats:
    """Cumulative per-engine numbers, Triton's names (``nv_inference_*``)."""

    success: int = 0
    failure: int = 0
    inference_count: int = 0  # rows
    exec_count: int = 0  # engine runs (batches)
    queue_us: float = 0.0
    compute_us: float = 0.0  # per engine run
    request_compute_us: float = 0.0  # each request charged its run's time (Triton's compute_infer)
    last_inference_ms: int = 0  # wall clock of the last run's end, ms since the epoch
    batch_sizes: Counter = field(default_factory=Counter)
    rejected: int = 0  # refused because the engine's queue was full (max_queue_size)
    batch_compute_us: Counter = field(default_factory=Counter)  # per batch size
    warmup_runs: int = 0  # the model's warm-up requests run before its engines took traffic (not counted above)

    def ran(self, requests: int, rows: int, compute_s: float) -> None:
        """One engine run of ``requests`` requests and ``rows`` rows that took ``compute_s`` (under the caller's lock)."""
        self.success += requests
        self.exec_count += 1
        self.inference_count += rows
        self.batch_sizes[rows] += 1
        self.compute_us += compute_s * 1e6
        self.request_compute_us += compute_s * 1e6 * requests
        self.batch_compute_us[rows] += compute_s * 1e6
        self.last_inference_ms = int(time.time() * 1000)

    def to_dict(self) -> dict:
        return {
            "success": self.success, "failure": self.failure, "rejected": self.rejected,
            "inference_count": self.inference_count, "warmup_runs": self.warmup_runs,
            "exec_count": self.exec_count, "queue_us": self.queue_us, "compute_us": self.compute_us,
            "request_compute_us": self.request_compute_us, "last_inference_ms": self.last_inference_ms,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "batch_compute_us": {str(k): v for k, v in sorted(self.batch_compute_us.items())},
        }


@dataclass
class _Pending:
    feeds: Feeds
    rows: int
    future: Future
    enqueued: float
    out: Feeds | None = None  # where the engine may write this request's outputs, if it runs alone


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[Feeds], Feeds],
        options: BatchingOptions,
        slots: int,
        stats: EngineStats | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._run = run
        self.options = options
        self.stats = stats or EngineStats()
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        # One thread per slot takes the batches; a token in ``_free`` is a slot with nothing to do. Both
        # queues are C (queue.SimpleQueue): a hand-off is two calls that hold the GIL for microseconds,
        # where a Semaphore and a ThreadPoolExecutor took Python-level locks, a Future and a work item.
        self._free: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._batches: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        for _ in range(slots):
            self._free.put(True)
        self._stats_lock = threading.Lock()
        self._closed = False
        self._runners = [threading.Thread(target=self._serve, name=f"batch_{i}", daemon=True) for i in range(slots)]
        for runner in self._runners:
            runner.start()
        self._collector = threading.Thread(target=self._collect, name="batch-collector", daemon=True)
        self._collector.start()

    def submit(self, feeds: Feeds, out: Feeds | None = None) -> Feeds:
        """Run one request (at most max_batch rows) through the batcher; blocks for its outputs."""
        return self.submit_nowait(feeds, out).result()

    def submit_nowait(self, feeds: Feeds, out: Feeds | None = None) -> Future:
        """Queue one request (at most max_batch rows); the future gets its outputs.

        For callers on an event loop (the worker's HTTP server), which must not block.
        ``out``: arrays the engine may write outputs into when this request runs alone
        (``Engine.infer``'s ``out``); merged with others, its outputs are split as usual.
        """
        pending = _Pending(feeds, batch_rows(feeds), Future(), self._clock(), out)
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._collector.join()
        for _ in self._runners:  # after every batch the collector handed over
            self._batches.put(None)
        for runner in self._runners:
            runner.join()

    # ---- collector thread ------------------------------------------------------
    def _collect(self) -> None:
        delay = self.options.max_queue_delay_us / 1e6
        preferred = set(self.options.preferred_batch_sizes)
        # Aim for the largest preferred size (Triton's rule); past the delay, take up to max_batch.
        target = min(max(preferred), self.options.max_batch) if preferred else self.options.max_batch
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                deadline = self._queue[0].enqueued + delay
                batch: list[_Pending] = []
                rows = 0
                while True:
                    late = self._clock() >= deadline or self._closed
                    limit = self.options.max_batch if late else target
                    while self._queue and rows + self._queue[0].rows <= limit:
                        item = self._queue.popleft()
                        batch.append(item)
                        rows += item.rows
                    if not batch:  # the head request alone is larger than the target: send it
                        item = self._queue.popleft()
                        batch.append(item)
                        rows += item.rows
                    blocked = bool(self._queue) and rows + self._queue[0].rows > limit
                    if late or rows >= limit or blocked or (rows in preferred and not self._queue):
                        break
                    self._cond.wait(deadline - self._clock())
            self._free.get()  # while we wait for a free slot, the next batch keeps filling
            self._batches.put(batch)
            batch = item = None  # type: ignore[assignment]  # not held while waiting: see _serve

    def _serve(self) -> None:
        """One slot: run the batches it is handed until close()."""
        while (batch := self._batches.get()) is not None:
            try:
                self._execute(batch)
            except BaseException:  # e.g. a caller cancelled its future: the slot lives on
                log.exception("a batch's results could not be handed back")
            # Not held while this slot waits for the next: the requests' inputs view their HTTP bodies,
            # and a body still viewed cannot be read into again (a new one, 4 MB zeroed, holding the GIL).
            batch = None

    def _execute(self, batch: list[_Pending]) -> None:
        try:
            started = self._clock()
            try:
                if len(batch) == 1:
                    alone = batch[0]
                    outputs = [self._run(alone.feeds, alone.out) if alone.out else self._run(alone.feeds)]
                else:
                    merged = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
                    result = self._run(merged)
                    bounds = np.cumsum([p.rows for p in batch])[:-1]
                    split = {name: np.split(array, bounds) for name, array in result.items()}
                    outputs = [{name: parts[i] for name, parts in split.items()} for i in range(len(batch))]
            except BaseException as exc:  # every request of the batch gets the error
                with self._stats_lock:
                    self.stats.failure += len(batch)
                for p in batch:
                    p.future.set_exception(exc)
                return
            finished = self._clock()
            with self._stats_lock:
                self.stats.ran(len(batch), sum(p.rows for p in batch), finished - started)
                self.stats.queue_us += sum((started - p.enqueued) * 1e6 for p in batch)
            for p, out in zip(batch, outputs):
                p.future.set_result(out)
        finally:
            self._free.put(True)
