"""One engine in service: its dynamic batcher, its concurrency slots and its numbers.

``LoadedEngine.submit`` runs one request of any size through the batcher (split into
max-batch chunks when larger), or straight on a slot for engines that cannot batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from workers.batcher import DynamicBatcher, EngineStats
from workers.engines import Engine
from workers.errors import IncompatibleArtifact, Overloaded
from workers.manifest import Manifest
from workers.messages import LoadOptions
from workers.tensors import batch_rows

Feeds = dict[str, np.ndarray]


def _gather(parts: list[Future], combine: Callable[[list], object]) -> Future:
    """One future for several: the combined results, or the first failure."""
    result: Future = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                result.set_result(combine([p.result() for p in parts]))
            except BaseException as exc:
                result.set_exception(exc)

    for part in parts:
        part.add_done_callback(done)
    return result


def _concatenate(results: list[Feeds]) -> Feeds:
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def _fill(whole: Feeds, starts: range, results: list[Feeds]) -> Feeds:
    """``whole``, with any chunk whose outputs landed elsewhere (merged with other requests by the
    batcher, which splits them as usual) copied into its rows."""
    for start, result in zip(starts, results):
        for name, array in result.items():
            target = whole[name][start:start + len(array)]
            if not np.may_share_memory(array, target):
                target[...] = array
    return whole


@dataclass
class LoadedEngine:
    """One engine in service, its dynamic batcher and its numbers."""

    manifest: Manifest
    engine: Engine
    options: LoadOptions
    batcher: DynamicBatcher | None  # None when an input or output has no batch dimension
    slots: threading.Semaphore
    stats: EngineStats
    measured_bytes: int | None = None

    slot_count: int = 1

    def __post_init__(self) -> None:
        self._stats_lock = threading.Lock()

    def admit(self, in_flight: int) -> None:
        """Overloaded at once when ``max_queue_size`` requests already wait beyond the running ones
        (``in_flight``: requests given to this engine and not finished, counted by the runner's ledger)."""
        bound = self.options.max_queue_size
        if bound and in_flight >= self.slot_count + bound:
            with self._stats_lock:
                self.stats.rejected += 1
            raise Overloaded(f"{self.manifest.model} version {self.manifest.version} has {in_flight} requests "
                             f"in hand ({bound} waiting is its max_queue_size); try again in a moment")

    def submit(self, feeds: Feeds, out: Feeds | None, executor: ThreadPoolExecutor) -> Future:
        """Run one request of any size (admitted already), its outputs written into ``out`` where it
        has them (see ``Engine.run``; a request cut into chunks: each chunk into its rows of them)."""
        max_batch = self.options.max_batch_for(self.manifest.max_batch)
        if self.batcher is None:
            return executor.submit(self._run_alone, feeds, out)
        rows = batch_rows(feeds)
        if rows <= max_batch:
            return self.batcher.submit_nowait(feeds, out)
        starts = range(0, rows, max_batch)
        whole = self._output_arrays(rows, out or {})
        if whole is None:
            parts = [self.batcher.submit_nowait({k: v[s:s + max_batch] for k, v in feeds.items()}) for s in starts]
            return _gather(parts, _concatenate)
        # Each chunk's outputs go straight into its rows of one array per output (ONNX Runtime and
        # TensorRT write there): concatenating the chunks after was a second copy of every output
        # byte (64 MB for a part of 4,096 rows x 4,096 floats), and the worker's largest cost on wide rows.
        parts = [self.batcher.submit_nowait({k: v[s:s + max_batch] for k, v in feeds.items()},
                                            {k: a[s:s + max_batch] for k, a in whole.items()}) for s in starts]
        return _gather(parts, lambda results: _fill(whole, starts, results))

    def _output_arrays(self, rows: int, given: Feeds) -> Feeds | None:
        """Outputs for ``rows`` rows: those ``given`` (e.g. in a client's shared memory: the chunks land
        there, not in new memory copied there after), empty arrays for the rest; None when an output's
        size is not known before it runs."""
        arrays = {}
        for spec in self.engine.outputs:
            if spec.datatype == "BYTES" or any(d < 0 for d in spec.shape[1:]):
                return None
            shape = (rows, *spec.shape[1:])
            target = given.get(spec.name)
            usable = target is not None and target.shape == shape and target.dtype == spec.numpy_dtype
            arrays[spec.name] = target if usable else np.empty(shape, spec.numpy_dtype)
        return arrays

    def _run_alone(self, feeds: Feeds, out: Feeds | None) -> Feeds:
        with self.slots:
            started = time.perf_counter()
            try:
                outputs = self.engine.run(feeds, out)
            except BaseException:
                with self._stats_lock:
                    self.stats.failure += 1
                raise
            with self._stats_lock:
                self.stats.ran(1, batch_rows(feeds), time.perf_counter() - started)
            return outputs

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.engine.deactivate()


def warm_up(engine: Engine, manifest: Manifest) -> None:
    """One run at max batch with zeros (skipped for models with string inputs)."""
    feeds = {}
    for spec in manifest.inputs:
        if spec.optional:
            continue
        if spec.datatype == "BYTES" or any(d < 0 for d in spec.shape[1:]):
            return
        shape = tuple(manifest.max_batch if d < 0 else d for d in spec.shape)
        feeds[spec.name] = np.zeros(shape, spec.numpy_dtype)
    engine.run(feeds)


def check_engine_io(engine: Engine, manifest: Manifest) -> None:
    """IncompatibleArtifact unless the engine's own inputs and outputs are the manifest's (names and
    types): a plan imported with the inputs its Triton configuration declared is checked here, on load."""
    for kind, own, declared in (("inputs", engine.inputs, manifest.inputs), ("outputs", engine.outputs, manifest.outputs)):
        have = {(s.name, s.datatype) for s in own}
        want = {(s.name, s.datatype) for s in declared if not s.optional}
        if not want <= have or kind == "outputs" and have != want:
            raise IncompatibleArtifact(
                f"the artifact of {manifest.model} version {manifest.version} ({manifest.target.describe()}) has "
                f"{kind} {sorted(have)}, its manifest says {sorted(want)}; import or build it again")
