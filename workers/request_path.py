"""The worker's request path: one request from its engine's lookup to its answer.

``RequestPath`` is the inference half of ``workers.runner.EngineRunner`` (which loads and
unloads the engines): which engine serves (model, version), admission (``max_queue_size``),
shared memory in and out, and the answer handed back, to a thread-safe future (``submit``)
or straight to an event loop (``submit_async``: per request, one hop less). It works on the
runner's state: ``_lock`` (a Condition), ``_engines``, ``_by_model``, ``_defaults``, ``ledger``,
``counters``, ``shm``, ``_executor`` and its device-fault fields.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from workers.device_faults import is_sticky_cuda_error
from workers.engines.base import check_feeds
from workers.errors import EngineNotHere, Overloaded
from workers.kserve.codec import InferRequest, ShmWritten, check_finite
from workers.kserve.shm_io import shm_feeds, shm_output_arrays, write_shm_outputs
from workers.loaded import Feeds, LoadedEngine
from workers.manifest import Manifest, version_sort_key
from workers.tensors import batch_rows


@dataclass
class InferResult:
    manifest: Manifest  # of the engine that served the request
    outputs: "dict[str, np.ndarray | ShmWritten]"


class RequestPath:
    def engine_key(self, model: str, version: str | None = None) -> str | None:
        """The loaded engine serving (model, version); None: the latest loaded version."""
        with self._lock:
            return self._key_for(model, version)

    def _key_for(self, model: str, version: str | None) -> str | None:
        versions = self._by_model.get(model)
        if not versions:
            return None
        if version is None:
            default = self._defaults.get(model)
            if default is not None:  # the fleet's rollout decided (a version may be held but not yet the default)
                return versions.get(default)
            return versions[max(versions, key=version_sort_key)]
        return versions.get(version)

    def set_default_versions(self, defaults: dict[str, str]) -> None:
        """Model -> the version this worker serves requests naming no version with (the fleet's rollout)."""
        with self._lock:
            self._defaults = dict(defaults)

    def _begin(self, model: str, version: str | None) -> LoadedEngine:
        """The engine for (model, version), marked in use (never evicted while in use)."""
        if self.out_of_service:
            raise self._device_failed()
        with self._lock:
            key = self._key_for(model, version)
            if key is None:
                which = f"model '{model}'" + (f" version {version}" if version else "")
                raise EngineNotHere(f"{which} is not loaded on worker {self.worker_id}")
            loaded = self._engines[key]
            in_flight = self.ledger.begin_use(key)
            try:
                loaded.admit(in_flight)  # max_queue_size: a 503 now rather than a long wait
            except Overloaded:
                self._end(key, False)
                raise
            return loaded

    def _end(self, key: str, ok: bool) -> None:
        with self._lock:
            self.counters["inferences" if ok else "failures"] += 1
            self.ledger.end_use(key)
            self._lock.notify_all()

    def submit(self, request: InferRequest, model: str, version: str | None = None) -> "Future[InferResult]":
        """Start one request; the future gets its InferResult. Never waits for the engine.

        Inputs in shared memory are read in place; outputs wanted there are written there (by
        the engine itself when the request runs alone). EngineNotHere when no engine of the
        model is loaded, or the request names a region this worker has not mapped."""
        result: Future = Future()
        self._submit(request, model, version, result.set_result, result.set_exception)
        return result

    def submit_async(self, request: InferRequest, model: str, version: str | None = None) -> "asyncio.Future[InferResult]":
        """``submit`` for a caller on an event loop (the HTTP and gRPC endpoints): the answer comes back
        to the loop in one hop, with no thread-safe future in between (this is per request)."""
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self._submit(request, model, version,
                     lambda value: loop.call_soon_threadsafe(_settle, result, value, None),
                     lambda exc: loop.call_soon_threadsafe(_settle, result, None, exc))
        return result

    def _submit(self, request: InferRequest, model: str, version: str | None,
                on_result: Callable[[InferResult], object], on_error: Callable[[BaseException], object]) -> None:
        loaded = self._begin(model, version)
        key = loaded.manifest.engine_key
        release: Callable[[], None] = _nothing
        regions = request.regions() if request.shm_inputs or request.outputs else _NO_REGIONS
        try:
            if regions:
                missing = regions - self.shm.names()
                if missing:  # another host's region: the ingress knows which worker mapped it
                    raise EngineNotHere(f"shared memory region(s) {', '.join(sorted(missing))} are not mapped on "
                                        f"worker {self.worker_id}")
                release = self.shm.hold(regions)
                feeds = shm_feeds(request, self.shm)
            else:
                feeds = request.inputs
            check_feeds(loaded.manifest.inputs, feeds)
            if loaded.options.reject_non_finite:
                check_finite(feeds)
            out = self._output_targets(loaded, request, feeds) if regions else None
            inner = loaded.submit(feeds, out, self._executor) if not self._simulated_fault else self._failed_run()
        except BaseException:
            release()
            self._end(key, False)
            raise

        def finish(done: Future) -> None:
            try:
                outputs = done.result()
                if regions:
                    outputs = write_shm_outputs(request, outputs, self.shm)
            except BaseException as exc:
                release()
                self._end(key, False)
                if is_sticky_cuda_error(exc):
                    self.broken = self.broken or str(exc).splitlines()[0][:300]
                    exc = self._device_failed()
                on_error(exc)
                return
            release()
            self._end(key, True)
            on_result(InferResult(loaded.manifest, outputs))

        inner.add_done_callback(finish)

    def _failed_run(self) -> Future:
        failed: Future = Future()
        failed.set_exception(RuntimeError(self._simulated_fault))
        return failed

    def infer(self, request: InferRequest, model: str, version: str | None = None) -> InferResult:
        """``submit`` and wait for the result."""
        return self.submit(request, model, version).result()

    def _output_targets(self, loaded: LoadedEngine, request: InferRequest, feeds: Feeds) -> Feeds | None:
        """Arrays in shared memory where the engine can write ``request``'s outputs itself: only
        through the batcher, whose models have the batch as their one dynamic dimension."""
        if loaded.batcher is None or not any(o.shm for o in request.outputs or ()):
            return None
        return shm_output_arrays(request, self.shm, loaded.manifest.outputs, batch_rows(feeds)) or None


_NO_REGIONS: frozenset[str] = frozenset()


def _nothing() -> None:
    pass


def _settle(future: "asyncio.Future", value: object, error: BaseException | None) -> None:
    if future.cancelled():  # the client went away; nothing waits for it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
