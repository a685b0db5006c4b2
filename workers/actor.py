"""The worker: one process, one device, the engines loaded on it.

``FleetWorker`` is plain Python (unit-testable without Ray); the cluster wraps it
with ``ray.remote`` and pins it to one device. Lifecycle verbs the controller
calls by name: ``describe``, ``load``, ``unload``, ``infer``, ``build``,
``health``, ``shutdown``; and the system shared memory regions clients on this
host registered (``register_shm``, ``unregister_shm``, ``infer_request``).

Concurrency: Ray runs the actor's methods on a thread pool. One lock guards the
ledger and the engine table; an engine in use (``in_flight > 0``) is never
evicted or unloaded, and each engine admits at most ``slots`` concurrent runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from workers.batcher import BatchingOptions, DynamicBatcher, EngineStats, batch_rows
from workers.build import BuildRequest, build_artifact
from workers.devices import CudaHostPinner, Device, discover_devices, nvml_used_bytes
from workers.engines.base import Engine, check_feeds
from workers.engines.onnxruntime import OnnxRuntimeEngine, cuda_provider_available
from workers.errors import IncompatibleArtifact, NotReady
from workers.ledger import Ledger
from workers.manifest import Manifest, verify_artifact, version_sort_key
from workers.protocol import InferRequest, ShmWritten, shm_feeds, shm_output_arrays, write_shm_outputs
from workers.shm import RegionNotHere, SharedMemoryRegistry
from workers.stats import RequestStats
from workers.targets import Runtime, WorkerCaps, can_run


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to know, decided by the controller."""

    worker_id: str
    node_name: str = "local"
    # Declared (simulated) devices of this node, by the GPU id Ray hands out.
    simulated_devices: tuple[Device, ...] = ()
    simulated_runtimes: tuple[Runtime, ...] = ()
    simulated_budgets: tuple[int | None, ...] = ()  # per declared device, overrides the fraction
    memory_fraction: float = 0.9
    reserve_bytes: int = 0
    budget_bytes: int | None = None  # explicit override of fraction/reserve
    slots: int = 4  # concurrent inferences per engine
    intra_op_threads: int = 0
    labels: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.slots < 1:
            raise ValueError("slots must be >= 1")


def _ray_gpu_index() -> int:
    """Which of its node's GPUs Ray gave this actor (via CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    first = visible.split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _resolve_device(spec: WorkerSpec) -> Device:
    if spec.simulated_devices:
        index = _ray_gpu_index()
        if index >= len(spec.simulated_devices):
            raise NotReady(
                f"worker {spec.worker_id} got GPU id {index} but node {spec.node_name} declares "
                f"{len(spec.simulated_devices)} GPUs"
            )
        return spec.simulated_devices[index]
    return discover_devices()[0]


def _init_cuda_context(device: Device) -> None:
    """Create this process's primary CUDA context on its device (cudaFree(0))."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return
    runtime.cudaSetDevice(device.cuda_ordinal or 0)
    runtime.cudaFree(0)


def _warm_up(engine: Engine, manifest: Manifest) -> None:
    """One run at max batch with zeros (skipped for models with string inputs)."""
    feeds = {}
    for spec in manifest.inputs:
        if spec.datatype == "BYTES" or any(d < 0 for d in spec.shape[1:]):
            return
        shape = tuple(manifest.max_batch if d < 0 else d for d in spec.shape)
        feeds[spec.name] = np.zeros(shape, spec.numpy_dtype)
    engine.infer(feeds)


def _freeze_heap() -> None:
    """Move everything alive now (Ray, ONNX Runtime, the engines) out of the garbage collector's
    reach: a full collection walking that heap stalled requests for tens of ms (p99 37 -> 8 ms
    at c=32 in docs/performance.md). Ray Serve's throughput mode does the same."""
    gc.collect()
    gc.freeze()


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux), to watch for leaks under bad input."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _declared_budget(spec: WorkerSpec, device: Device) -> int | None:
    for declared, budget in zip(spec.simulated_devices, spec.simulated_budgets):
        if declared.uuid == device.uuid:
            return budget
    return None


def _local_runtimes(device: Device) -> tuple[Runtime, ...]:
    runtimes = [Runtime("onnxruntime", ort.__version__, "cpu")]
    if device.is_gpu and not device.simulated and cuda_provider_available():
        runtimes.append(Runtime("onnxruntime", ort.__version__, "cuda"))
    if device.is_gpu and not device.simulated:
        try:
            import tensorrt  # noqa: F401  (optional: forward-fleet[trt])

            runtimes.append(Runtime("tensorrt", tensorrt.__version__, "tensorrt"))
        except ImportError:
            pass
    return tuple(runtimes)


@dataclass
class _Loaded:
    """One loaded engine, its dynamic batcher and its numbers."""

    manifest: Manifest
    engine: Engine
    batcher: DynamicBatcher | None  # None when an input or output has no batch dimension
    slots: threading.Semaphore
    stats: EngineStats
    measured_bytes: int | None = None

    def run(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One request of any size: split into max-batch chunks, each through the batcher.
        ``out``: see ``DynamicBatcher.submit_nowait`` (used only when the request is one chunk)."""
        max_batch = self.manifest.max_batch
        rows = batch_rows(feeds)
        if rows > max_batch and self.batcher is not None:
            parts = [self.batcher.submit({k: v[s : s + max_batch] for k, v in feeds.items()}) for s in range(0, rows, max_batch)]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        if self.batcher is not None:
            return self.batcher.submit(feeds, out)
        with self.slots:
            t0 = time.perf_counter()
            try:
                outputs = self.engine.infer(feeds)
            except BaseException:
                self.stats.failure += 1
                raise
            self.stats.compute_us += (time.perf_counter() - t0) * 1e6
            self.stats.success += 1
            self.stats.exec_count += 1
            self.stats.inference_count += rows
            self.stats.batch_sizes[rows] += 1
            return outputs

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.engine.deactivate()


def _batchable(manifest: Manifest) -> bool:
    return all(s.shape and s.shape[0] < 0 for s in manifest.inputs + manifest.outputs)


class FleetWorker:
    def __init__(self, spec: WorkerSpec, clock=time.monotonic) -> None:
        self.spec = spec
        self.device = _resolve_device(spec)
        runtimes = list(spec.simulated_runtimes) + list(_local_runtimes(self.device))
        self.caps = WorkerCaps(
            worker_id=spec.worker_id,
            device=self.device,
            runtimes=tuple(runtimes),
            node_id=spec.node_name,
            labels=dict(spec.labels),
        )
        declared = _declared_budget(spec, self.device)
        if declared is not None:
            budget = declared
        elif spec.budget_bytes is not None:
            budget = spec.budget_bytes
        else:
            budget = int(self.device.total_memory_bytes * spec.memory_fraction) - spec.reserve_bytes
        self.ledger = Ledger(max(0, budget), clock=clock, device_name=self.device.describe())
        self._lock = threading.Condition()
        self._engines: dict[str, _Loaded] = {}
        self._loading: dict[str, threading.Event] = {}
        # Per engine key, kept across evictions so exported counters never go backwards.
        self._stats: dict[str, tuple[Manifest, EngineStats]] = {}
        self.counters = {"loads": 0, "evictions": 0, "unloads": 0, "inferences": 0, "failures": 0}
        self._real_gpu = self.device.is_gpu and not self.device.simulated
        if self._real_gpu:
            _init_cuda_context(self.device)  # the context is part of the baseline, not of the first engine
        self._baseline_used = nvml_used_bytes(self.device.uuid) if self._real_gpu else None
        self._measure_lock = threading.Lock()  # one load at a time is measured on a real GPU
        self._http = None  # WorkerHttpServer once start_http ran
        self.request_stats = RequestStats()  # requests that came in over this worker's own HTTP
        # regions registered by clients on this host; pinned for the GPU, so copies are DMA
        self.shm = SharedMemoryRegistry(pinner=CudaHostPinner() if self._real_gpu else None)

    # ---- lifecycle -------------------------------------------------------
    def describe(self) -> dict:
        with self._lock:
            return {
                "caps": self.caps.to_dict(),
                "simulated": self.device.simulated,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "ledger": self.ledger.snapshot(),
                "loaded": sorted(self._engines),
                "counters": dict(self.counters),
                "engines": {
                    key: {"model": m.model, "version": m.version, "precision": m.precision, "loaded": key in self._engines,
                          "batching": key in self._engines and self._engines[key].batcher is not None, **stats.to_dict()}
                    for key, (m, stats) in self._stats.items()
                },
                "nvml_used_bytes": nvml_used_bytes(self.device.uuid) if self._baseline_used is not None else None,
                "rss_bytes": _rss_bytes(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "http": None if self._http is None else {"host": self._http.options.host, "port": self._http.port},
                "request_stats": self.request_stats.report(),
                "shm": self.shm.status(),
            }

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop serving HTTP, then unload everything (contexts and engines first), waiting for in-flight work."""
        if self._http is not None:
            self._http.stop()
            self._http = None
        for key in list(self._engines):
            self.unload(key)
        self.shm.close()

    # ---- load / unload ---------------------------------------------------
    def load(self, manifest_dict: dict, artifact_dir: str, batching: dict | None = None) -> dict:
        """Load an artifact, evicting idle LRU engines if needed. Returns the ledger entry."""
        manifest = Manifest.from_dict(manifest_dict)
        if manifest.target.version_compatible and not (batching or {}).get("trust_version_compatible"):
            raise IncompatibleArtifact(
                f"{manifest.model} is a version-compatible TensorRT plan, which carries host code that would run in "
                f"this worker; load it only from a trusted source by setting models.{manifest.model}."
                f"trust_version_compatible: true in the fleet config"
            )
        options = BatchingOptions.from_dict(batching or {})
        options = dataclasses.replace(options, max_batch=manifest.max_batch)
        verdict = can_run(manifest, self.caps)
        if not verdict:
            raise IncompatibleArtifact(
                f"worker {self.spec.worker_id} on {self.device.describe()} refuses "
                f"{manifest.model} built for {manifest.target.describe()}: {verdict.reason}"
            )
        key = manifest.engine_key
        while True:
            with self._lock:
                if key in self._engines:
                    self.ledger.get(key).last_used = time.monotonic()  # type: ignore[union-attr]
                    return self.ledger.get(key).to_dict()  # type: ignore[union-attr]
                pending = self._loading.get(key)
                if pending is None:
                    victims = self.ledger.plan_admission(key, manifest.footprint_bytes)
                    evicted = [self._engines.pop(v) for v in victims]
                    for v in victims:
                        self.ledger.remove(v)
                    self.ledger.add(key, manifest.footprint_bytes)  # reserve before loading
                    self._loading[key] = threading.Event()
                    self.counters["evictions"] += len(evicted)
                    break
            pending.wait()  # another thread is loading the same engine
        engine: Engine | None = None
        try:
            for loaded in evicted:
                loaded.close()
            path = verify_artifact(artifact_dir, manifest)
            with self._measure_lock if self._real_gpu else contextlib.nullcontext():
                before = nvml_used_bytes(self.device.uuid) if self._real_gpu else None
                with self._lock:
                    allowed = self.ledger.free_bytes + manifest.footprint_bytes  # what is reserved plus what is free
                engine = self._open_engine(manifest, path, allowed)
                engine.activate()
                _warm_up(engine, manifest)  # allocates the activations a max batch needs, so we measure them
                measured = None
                if before is not None:
                    after = nvml_used_bytes(self.device.uuid)
                    measured = max(1, (after or before) - before)
            with self._lock:
                if measured:
                    self.ledger.update_footprint(key, measured)  # NoCapacity if it really does not fit
                stats = self._stats.setdefault(key, (manifest, EngineStats()))[1]
                batcher = None
                slots = self._slots(manifest)
                if options.enabled and _batchable(manifest):
                    batcher = DynamicBatcher(engine.infer, options, slots, stats)
                self._engines[key] = _Loaded(manifest, engine, batcher, threading.Semaphore(slots), stats, measured)
                self.counters["loads"] += 1
                _freeze_heap()
                return self.ledger.get(key).to_dict()  # type: ignore[union-attr]
        except BaseException:
            if engine is not None:
                engine.deactivate()
            with self._lock:
                self.ledger.remove(key)
            raise
        finally:
            with self._lock:
                self._loading.pop(key).set()
                self._lock.notify_all()

    @staticmethod
    def _on_cpu(manifest: Manifest) -> bool:
        target = manifest.target
        return target.simulated or (target.backend == "onnxruntime" and target.provider == "cpu")

    def _slots(self, manifest: Manifest) -> int:
        """Concurrent runs of one engine. On the CPU, no more than there are cores: runs beyond
        that only take turns on the same cores."""
        if self._on_cpu(manifest):
            return max(1, min(self.spec.slots, os.cpu_count() or 1))
        return self.spec.slots

    def _intra_op_threads(self, manifest: Manifest) -> int:
        """ONNX Runtime threads per run. On the CPU by default the cores divided among the slots:
        several single-threaded runs beat one run on every core with its threads spinning
        between the HTTP work (cnn-small at max batch over HTTP: +24 % on 2 cores)."""
        if self.spec.intra_op_threads or not self._on_cpu(manifest):
            return self.spec.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self._slots(manifest))

    def _open_engine(self, manifest: Manifest, path: Path, allowed_bytes: int) -> Engine:
        target = manifest.target
        if target.backend == "tensorrt" and not target.simulated:
            from workers.engines.tensorrt import TensorRTEngine

            return TensorRTEngine(path, device_id=self.device.cuda_ordinal or 0, slots=self.spec.slots)
        # ONNX Runtime artifacts, and simulated plans (executed by ONNX Runtime on the CPU).
        use_cuda = target.backend == "onnxruntime" and target.provider == "cuda"
        return OnnxRuntimeEngine(
            path,
            provider="cuda" if use_cuda else "cpu",
            device_id=self.device.cuda_ordinal or 0,
            intra_op_threads=self._intra_op_threads(manifest),
            gpu_mem_limit=allowed_bytes if use_cuda else None,  # the arena may never outgrow the budget
            footprint_bytes=manifest.footprint_bytes,
        )

    def unload(self, key: str) -> bool:
        """Unload one engine after its in-flight inferences finish. False if not loaded."""
        with self._lock:
            if key not in self._engines:
                return False
            loaded = self._engines.pop(key)  # no new inference can start on it
            while (entry := self.ledger.get(key)) is not None and entry.in_flight:
                self._lock.wait()
            self.ledger.remove(key)
            self.counters["unloads"] += 1
        loaded.close()
        return True

    # ---- inference -------------------------------------------------------
    def infer(self, key: str, feeds: dict[str, np.ndarray], request: InferRequest | None = None) -> dict[str, np.ndarray]:
        """Run ``feeds``; with the ``request`` they came in, outputs it wants in shared memory
        may be written there by the engine itself."""
        loaded = self.begin_request(key)
        ok = False
        try:
            check_feeds(loaded.manifest.inputs, feeds)
            outputs = loaded.run(feeds, self.shm_targets(loaded, request, feeds))
            ok = True
            return outputs
        finally:
            self.end_request(key, ok)

    def infer_request(self, key: str, request: InferRequest,
                      reject_non_finite: bool = False) -> "dict[str, np.ndarray | ShmWritten]":
        """Run a decoded KServe request whose tensors may lie in shared memory regions of this
        host: inputs are read in place, outputs asked for in a region are written there."""
        with self.shm.using(request.regions()):
            feeds = shm_feeds(request, self.shm, reject_non_finite)
            return write_shm_outputs(request, self.infer(key, feeds, request), self.shm)

    def shm_targets(self, loaded: "_Loaded", request: InferRequest | None, feeds: dict) -> dict[str, np.ndarray] | None:
        """Arrays in shared memory where the engine can write ``request``'s outputs itself: only
        through the batcher, whose models have the batch as their one dynamic dimension."""
        if request is None or loaded.batcher is None or not any(o.shm for o in request.outputs or ()):
            return None
        return shm_output_arrays(request, self.shm, loaded.manifest.outputs, batch_rows(feeds)) or None

    def register_shm(self, name: str, key: str, offset: int, byte_size: int) -> bool:
        """Map a client's region; False when its object does not exist on this host."""
        try:
            self.shm.register(name, key, offset, byte_size)
        except RegionNotHere:
            return False
        return True

    def unregister_shm(self, name: str | None = None) -> list[str]:
        return self.shm.unregister(name)

    def begin_request(self, key: str) -> "_Loaded":
        """Mark the engine in use (never evicted or unloaded while in use); NotReady if not loaded."""
        with self._lock:
            loaded = self._engines.get(key)
            if loaded is None:
                raise NotReady(f"engine {key} is not loaded on worker {self.spec.worker_id}")
            self.ledger.begin_use(key)
            return loaded

    def end_request(self, key: str, ok: bool) -> None:
        with self._lock:
            self.counters["inferences" if ok else "failures"] += 1
            self.ledger.end_use(key)
            self._lock.notify_all()

    def engine_for(self, model: str, version: str | None) -> str | None:
        """The key of the loaded engine serving (model, version); None: the latest loaded version."""
        with self._lock:
            found = [(l.manifest.version, key) for key, l in self._engines.items()
                     if l.manifest.model == model and (version is None or l.manifest.version == version)]
        return max(found, key=lambda vk: version_sort_key(vk[0]))[1] if found else None

    def start_http(self, options: dict) -> dict:
        """Serve KServe v2 inference over HTTP from this process (the fleet's one-hop path)."""
        from workers.http import HttpOptions, WorkerHttpServer

        if self._http is None:
            self._http = WorkerHttpServer(self, HttpOptions.from_dict(options))
            self._http.start()
            _freeze_heap()
        return {"host": self._http.options.host, "port": self._http.port}

    # ---- build -----------------------------------------------------------
    def build_from_bytes(self, source: bytes, request: BuildRequest, out_dir: str, calibration=None, evaluation=None) -> dict:
        """Build from a source model shipped as bytes (the driver may be on another host)."""
        with tempfile.TemporaryDirectory(prefix="fleet-build-") as tmp:
            path = Path(tmp) / "source.onnx"
            path.write_bytes(source)
            return self.build(dataclasses.replace(request, source_path=str(path)), out_dir, calibration, evaluation)

    def build(self, request: BuildRequest, out_dir: str, calibration=None, evaluation=None) -> dict:
        """Build an artifact for one of this worker's targets into ``out_dir``."""
        verdict = can_run(request.target, self.caps)
        if not verdict:
            raise IncompatibleArtifact(
                f"worker {self.spec.worker_id} cannot build for {request.target.describe()}: {verdict.reason}"
            )
        manifest = build_artifact(request, out_dir, calibration=calibration, evaluation=evaluation)
        verdict = can_run(manifest, self.caps)
        if not verdict:
            raise IncompatibleArtifact(
                f"worker {self.spec.worker_id} built {request.model} for {request.target.describe()} "
                f"but cannot run it: {verdict.reason}"
            )
        return manifest.to_dict()

