"""The engines of one device: the engine table, its ledger, and the one inference path.

vLLM's Worker/ModelRunner split: the actor (``workers/actor.py``) is the process's
face to the fleet, this runner owns what runs. Every request, whichever way it came
(the worker's own HTTP endpoint, a Ray call from the ingress or the batch job), goes
through ``submit`` (``workers/request_path.py``, the runner's request half): find the
engine and mark it in use, read inputs from shared memory, check the inputs once, run
through the engine's dynamic batcher, write outputs to shared memory, release.

Concurrency: one lock guards the ledger and the engine table. An engine in use
(``in_flight > 0``) or still loading is never evicted or unloaded, and each engine
admits at most ``slots`` concurrent runs (DESIGN.md rules 3 and 4).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.batcher import DynamicBatcher, EngineStats
from workers.cpus import usable_cpus
from workers.custom_ops import LibraryFile
from workers.loaded import LoadedEngine, check_engine_io, warm_up
from workers.engines import Engine, executes_on_cpu, open_engine
from workers.device_faults import is_sticky_cuda_error
from workers.errors import DeviceFailed, IncompatibleArtifact, NoCapacity
from workers.ledger import Ledger, format_bytes
from workers.manifest import Manifest
from workers.messages import LoadOptions, WorkerHealth
from workers.request_path import RequestPath
from workers.shm import SharedMemoryRegistry
from workers.targets import WorkerCaps, can_run
from workers.trust import check_trusted
from workers.warmup import run_warmup


def freeze_heap() -> None:
    """Move everything alive now (Ray, ONNX Runtime, the engines) out of the garbage collector's
    reach: a full collection walking that heap stalled requests for tens of ms (p99 37 -> 8 ms
    at c=32 in docs/performance.md). Ray Serve's throughput mode does the same."""
    gc.collect()
    gc.freeze()


class EngineRunner(RequestPath):
    def __init__(
        self,
        caps: WorkerCaps,
        budget_bytes: int,
        *,
        slots: int = 4,
        intra_op_threads: int = 0,
        shm: SharedMemoryRegistry | None = None,
        memory_probe: Callable[[], "int | None"] | None = None,
        engine_factory: Callable[..., Engine] = open_engine,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``memory_probe``: the device's used bytes (NVML) on a real GPU, to measure each load;
        ``engine_factory``: ``open_engine``, or one bound to other TensorRT/CUDA modules."""
        self.caps = caps
        self.device = caps.device
        self.ledger = Ledger(max(0, budget_bytes), clock=clock, device_name=self.device.describe())
        self.slots = slots
        self.intra_op_threads = intra_op_threads
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self._probe = memory_probe
        self._open_engine = engine_factory
        self._lock = threading.Condition()
        self._engines: dict[str, LoadedEngine] = {}
        self._by_model: dict[str, dict[str, str]] = {}  # model -> version -> engine key
        self._defaults: dict[str, str] = {}  # model -> version for unversioned requests (else: latest loaded)
        self._loading: dict[str, threading.Event] = {}
        self._warmups: dict[str, int] = {}  # engine key -> warm-up runs of the load under way
        # Per engine key, kept across evictions so exported counters never go backwards.
        self._stats: dict[str, tuple[Manifest, EngineStats]] = {}
        self.counters = {"loads": 0, "evictions": 0, "unloads": 0, "inferences": 0, "failures": 0}
        self._measure_lock = threading.Lock()  # one load at a time is measured on a real GPU
        self._executor = ThreadPoolExecutor(max_workers=max(4, 2 * slots), thread_name_prefix="engine")
        self.broken: str | None = None  # a sticky CUDA error happened: this process computes no more
        self.gpu_unhealthy: str | None = None  # NVML reports the GPU itself bad: no restart helps
        self._simulated_fault: str | None = None

    @property
    def worker_id(self) -> str:
        return self.caps.worker_id

    # ---- what is here ------------------------------------------------------
    def health(self) -> WorkerHealth:
        with self._lock:
            return WorkerHealth(self.ledger.budget_bytes, self.ledger.used_bytes, frozenset(self._engines),
                                dict(self.counters), self.broken, self.gpu_unhealthy)

    @property
    def out_of_service(self) -> str | None:
        """Why this worker takes no more work (its context is broken or its GPU is unhealthy), or None."""
        return self.broken or self.gpu_unhealthy

    def mark_gpu_unhealthy(self, reason: str) -> None:
        self.gpu_unhealthy = self.gpu_unhealthy or reason

    def simulate_device_fault(self, message: str) -> None:
        """Make the next run fail as a broken GPU context would, with ``message``: for simulated
        devices only, where the fleet's handling of a real CUDA fault is tested without the hardware."""
        if not self.device.simulated:
            raise IncompatibleArtifact(f"{self.device.describe()} is real: faults are simulated on simulated devices only")
        self._simulated_fault = message

    def _device_failed(self) -> DeviceFailed:
        if self.broken:
            return DeviceFailed(f"worker {self.worker_id}: the GPU context of {self.device.describe()} is broken "
                                f"({self.broken}); the fleet restarts this worker, try again")
        return DeviceFailed(f"worker {self.worker_id}: {self.gpu_unhealthy}; the fleet routes around "
                            f"{self.device.describe()}, try again")

    def ledger_snapshot(self) -> dict:
        with self._lock:
            return self.ledger.snapshot()

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._engines)

    def engine_stats(self) -> dict:
        with self._lock:
            return {
                key: {"model": m.model, "version": m.version, "precision": m.precision, "loaded": key in self._engines,
                      "batching": key in self._engines and self._engines[key].batcher is not None,
                      "slots": self._engines[key].slot_count if key in self._engines else 0, **stats.to_dict()}
                for key, (m, stats) in self._stats.items()
            }

    # ---- load / unload ---------------------------------------------------
    def load(self, manifest: Manifest, artifact: str | Path, options: LoadOptions | None = None,
             libraries: tuple[LibraryFile, ...] = ()) -> dict:
        """Load the artifact file (verified by the caller: ``workers.artifacts.ArtifactCache``, as are the
        custom-op ``libraries`` the manifest names), evicting idle LRU engines if needed. Returns its
        ledger entry."""
        options = options or LoadOptions()
        if self.out_of_service:
            raise self._device_failed()
        self.check_loadable(manifest, options)
        key = manifest.engine_key
        entry, evicted = self._reserve(manifest)
        if entry is not None:
            return entry
        engine: Engine | None = None
        try:
            for loaded in evicted:
                loaded.close()
            engine, measured = self._open(manifest, Path(artifact), options, libraries)
            entry = self._install(manifest, engine, options, measured)
            freeze_heap()
            return entry
        except BaseException as exc:
            if engine is not None:
                engine.deactivate()
            with self._lock:
                self.ledger.remove(key)
            if is_sticky_cuda_error(exc):
                self.broken = self.broken or str(exc).splitlines()[0][:300]
                raise self._device_failed() from exc
            raise
        finally:
            with self._lock:
                self._loading.pop(key).set()
                self._lock.notify_all()

    def check_loadable(self, manifest: Manifest, options: LoadOptions) -> None:
        """IncompatibleArtifact unless this device may run it (DESIGN.md rule 2)."""
        check_trusted(manifest, options)  # host code loads only when pinned by its sha256
        verdict = can_run(manifest, self.caps)
        if not verdict:
            raise IncompatibleArtifact(
                f"worker {self.worker_id} on {self.device.describe()} refuses "
                f"{manifest.model} built for {manifest.target.describe()}: {verdict.reason}"
            )

    def _reserve(self, manifest: Manifest) -> "tuple[dict | None, list[LoadedEngine]]":
        """Reserve the footprint, evicting idle LRU engines: (None, the evicted). When the engine is
        loaded already: (its ledger entry, []). Waits while another thread loads the same engine."""
        key = manifest.engine_key
        while True:
            with self._lock:
                if key in self._engines:
                    entry = self.ledger.get(key)
                    entry.last_used = time.monotonic()  # type: ignore[union-attr]
                    return entry.to_dict(), []  # type: ignore[union-attr]
                pending = self._loading.get(key)
                if pending is None:
                    victims = self.ledger.plan_admission(key, manifest.footprint_bytes)
                    evicted = [self._remove(v) for v in victims]
                    self.ledger.add(key, manifest.footprint_bytes, loading=True)
                    self._loading[key] = threading.Event()
                    self.counters["evictions"] += len(evicted)
                    return None, evicted
            pending.wait()

    def _open(self, manifest: Manifest, path: Path, options: LoadOptions,
              libraries: tuple[LibraryFile, ...] = ()) -> tuple[Engine, int | None]:
        """Open, activate and warm the engine; on a real GPU, measure what it took (NVML)."""
        with self._measure_lock if self._probe else contextlib.nullcontext():
            before = self._probe() if self._probe else None
            with self._lock:
                allowed = self.ledger.free_bytes + manifest.footprint_bytes  # reserved plus free
            # only models with libraries pass them: engine factories bound for tests need not know the keyword
            extra = {"custom_ops": libraries} if manifest.custom_ops else {}
            engine = self._open_engine(
                path, manifest.target, device_id=self.device.cuda_ordinal or 0, slots=self._slots(manifest, options),
                intra_op_threads=self._intra_op_threads(manifest, options), lean=not self._has_full_tensorrt(),
                gpu_mem_limit=allowed, footprint_bytes=manifest.footprint_bytes, allow_tf32=options.allow_tf32, **extra)
            try:
                engine.activate()
                check_engine_io(engine, manifest)
                warm_up(engine, manifest)  # allocates the activations a max batch needs, so we measure them
                # the model's own warm-up requests, before the engine takes traffic
                self._warmups[manifest.engine_key] = run_warmup(engine.run, manifest.model, options.warmup)
            except BaseException:
                engine.deactivate()
                raise
            after = self._probe() if self._probe else None
        measured = max(1, (after or before) - before) if before is not None else None
        return engine, measured

    def _install(self, manifest: Manifest, engine: Engine, options: LoadOptions, measured: int | None) -> dict:
        """Put the engine in service; its ledger entry, read under the same lock (another load may
        evict it the moment the lock is released)."""
        key = manifest.engine_key
        with self._lock:
            if measured:
                self.ledger.update_footprint(key, measured)  # NoCapacity if it really does not fit
            stats = self._stats.setdefault(key, (manifest, EngineStats()))[1]
            stats.warmup_runs += self._warmups.pop(key, 0)
            slots = self._slots(manifest, options)
            batching = options.batching(manifest.max_batch)
            batcher = DynamicBatcher(engine.run, batching, slots, stats) if batching.enabled and manifest.batched else None
            self._engines[key] = LoadedEngine(manifest, engine, options, batcher, threading.Semaphore(slots), stats,
                                              measured, slot_count=slots)
            self._by_model.setdefault(manifest.model, {})[manifest.version] = key
            self.ledger.mark_loaded(key)
            self.counters["loads"] += 1
            return self.ledger.get(key).to_dict()  # type: ignore[union-attr]

    def _remove(self, key: str) -> LoadedEngine:
        """Take an idle engine out of service and off the ledger (under the lock); the caller closes it."""
        loaded = self._out_of_service(key)
        self.ledger.remove(key)
        return loaded

    def _out_of_service(self, key: str) -> LoadedEngine:
        """No new request can start on this engine from now on (under the lock)."""
        loaded = self._engines.pop(key)
        versions = self._by_model.get(loaded.manifest.model, {})
        if versions.get(loaded.manifest.version) == key:
            del versions[loaded.manifest.version]
        return loaded

    def _has_full_tensorrt(self) -> bool:
        return any(r.backend == "tensorrt" and not r.lean for r in self.caps.runtimes)

    def _slots(self, manifest: Manifest, options: LoadOptions) -> int:
        """Concurrent runs of one engine: the model's own count (Triton's instance count), else the
        fleet's, and then on the CPU no more than there are cores (runs beyond that only take turns
        on the same cores)."""
        if options.slots:
            return options.slots
        if executes_on_cpu(manifest.target):
            return max(1, min(self.slots, usable_cpus()))
        return self.slots

    def _intra_op_threads(self, manifest: Manifest, options: LoadOptions) -> int:
        """ONNX Runtime threads per run. On the CPU by default the cores divided among the slots:
        several single-threaded runs beat one run on every core with its threads spinning
        between the HTTP work (cnn-small at max batch over HTTP: +24 % on 2 cores)."""
        if self.intra_op_threads or not executes_on_cpu(manifest.target):
            return self.intra_op_threads
        return max(1, usable_cpus() // self._slots(manifest, options))

    @contextlib.contextmanager
    def build_reservation(self, what: str, nbytes: int, wait_s: float):
        """Hold ``nbytes`` of this device's budget while a build runs (``what`` names it), so loads and
        routing see it taken. A build never evicts an engine: without room it waits for some (up to
        ``wait_s``), then fails with NoCapacity naming the numbers."""
        key = f"build:{what}"
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                if nbytes > self.ledger.budget_bytes or (nbytes > self.ledger.free_bytes and time.monotonic() >= deadline):
                    raise NoCapacity(
                        f"building {what} needs {format_bytes(nbytes)} of {self.device.describe()}, which has "
                        f"{format_bytes(self.ledger.free_bytes)} free of {format_bytes(self.ledger.budget_bytes)}; "
                        f"a build never pushes a loaded engine out (waited {wait_s:.0f} s for room): unload a model "
                        f"there, or build on a device with room")
                if nbytes <= self.ledger.free_bytes:
                    self.ledger.add(key, nbytes, loading=True)  # never evicted, as an engine still loading
                    break
                self._lock.wait(min(1.0, max(0.01, deadline - time.monotonic())))
        try:
            yield
        finally:
            with self._lock:
                self.ledger.remove(key)
                self._lock.notify_all()

    def unload(self, key: str) -> bool:
        """Unload one engine after its in-flight inferences finish. False if not loaded."""
        with self._lock:
            if key not in self._engines:
                return False
            loaded = self._out_of_service(key)
            while (entry := self.ledger.get(key)) is not None and entry.in_flight:
                self._lock.wait()
            self.ledger.remove(key)
            self.counters["unloads"] += 1
            self._lock.notify_all()  # a build waiting for room
        loaded.close()
        return True

    def close(self) -> None:
        """Unload everything (waiting for in-flight work), then stop the runner's threads."""
        for key in self.loaded_keys():
            self.unload(key)
        self._executor.shutdown(wait=True)
