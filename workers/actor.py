"""The worker: one process, one device, the engines loaded on it.

``FleetWorker`` is plain Python (unit-testable without Ray); the cluster wraps it
with ``ray.remote`` and pins it to one device (vLLM's worker: the orchestrator calls
its lifecycle verbs by name). Verbs: ``info`` (once, at start), ``health`` (every
second, cheap), ``stats`` (the status view), ``load``, ``unload``, ``infer``,
``start_http``, ``start_grpc``, ``register_shm`` / ``unregister_shm``, ``build_from_bytes``, ``in_flight``,
``shutdown``.

What runs lives in its ``EngineRunner`` (``workers/runner.py``): the engine table,
the ledger and the one inference path, which the worker's own HTTP endpoint uses too.
Artifacts reach it as an ``ArtifactSource`` (never a path) through its host's
``ArtifactCache`` (``workers/artifacts.py``); a build returns its artifact as bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.artifacts import DEFAULT_CACHE_BYTES, ArtifactCache, ArtifactSource, default_cache_root
from workers.build import BuildRequest, EvalData, build_artifact, build_memory_bytes, onnx_opset
from workers.devices import CudaHostPinner, Device, discover_devices, nvml_used_bytes
from workers.engines.onnxruntime import limit_cublas_workspace
from workers.errors import IncompatibleArtifact, NotReady
from workers.gpu_health import GpuHealthProbe
from workers.grpc_http1 import GrpcOverHttp1
from workers.grpc_server import GrpcOptions, MissFn, WorkerGrpcServer
from workers.http import HttpOptions, MissHandler, WorkerHttpServer
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest
from workers.messages import InferReply, LoadOptions, WorkerHealth, WorkerInfo
from workers.precision import CalibrationResult
from workers.runner import EngineRunner, freeze_heap
from workers.shm import RegionNotHere, SharedMemoryRegistry
from workers.stats import RequestStats
from workers.probe import probe_runtimes
from workers.targets import Runtime, WorkerCaps, can_run

log = logging.getLogger(__name__)


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
    cache_bytes: int = DEFAULT_CACHE_BYTES  # this host's artifact cache (under its own temporary directory)
    build_workspace_bytes: int | None = None  # bound on a TensorRT build's workspace (None: the build's default)
    build_wait_s: float = 120.0  # how long a build waits for room in this device's budget (it never evicts)
    labels: dict = field(default_factory=dict, hash=False, compare=False)
    environment: tuple[str, ...] = ()  # requirements of the Python environment it starts in (its GPU type's)
    # How long a Python thread may hold the GIL while another waits for it (None: Python's 5 ms). An engine
    # thread back from a GPU run waits up to this long for a busy thread to let go (docs/performance.md).
    gil_switch_interval_ms: float | None = None
    # When a GPU worker page-locks a client's shared memory region: "background", "registration" or "off".
    shm_pinning: str = "background"
    shm_pin_threads: int = 4  # threads that page-lock regions in the background

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


def _gpu_health_probe(uuid: str) -> GpuHealthProbe | None:
    try:
        probe = GpuHealthProbe(uuid)
    except Exception as exc:  # no NVML here (a container without the library): health is CUDA's alone
        log.warning("GPU %s: NVML health counters unavailable (%s)", uuid, exc)
        return None
    log.info("GPU %s: NVML health watches %s", uuid, probe.describe())
    return probe


def _budget(spec: WorkerSpec, device: Device) -> int:
    declared = _declared_budget(spec, device)
    if declared is not None:
        return declared
    if spec.budget_bytes is not None:
        return spec.budget_bytes
    return int(device.total_memory_bytes * spec.memory_fraction) - spec.reserve_bytes


class FleetWorker:
    def __init__(self, spec: WorkerSpec, read_object: Callable[[Any], bytes] | None = None) -> None:
        """``read_object``: reads an artifact sent through Ray's object store (``ray.get``; the fleet's
        subclass passes it)."""
        self.spec = spec
        if spec.gil_switch_interval_ms is not None:
            sys.setswitchinterval(spec.gil_switch_interval_ms / 1000)
        limit_cublas_workspace()  # before the probe's CUDA run makes the process's first cuBLAS handle
        self.artifacts = ArtifactCache(default_cache_root(), spec.cache_bytes, read_object)
        self.device = _resolve_device(spec)
        runtimes, self.probe = probe_runtimes(self.device, spec.environment)  # what it can really do, not what was declared
        self.caps = WorkerCaps(
            worker_id=spec.worker_id,
            device=self.device,
            runtimes=tuple(spec.simulated_runtimes) + runtimes,
            node_id=spec.node_name,
            labels=dict(spec.labels),
        )
        real_gpu = self.device.is_real_gpu
        if real_gpu:
            _init_cuda_context(self.device)  # the context is part of the baseline, not of the first engine
        uuid = self.device.uuid
        self._memory_probe = (lambda: nvml_used_bytes(uuid)) if real_gpu else None
        self.baseline_used_bytes = self._memory_probe() if self._memory_probe else None  # after the context
        self._gpu_health = _gpu_health_probe(uuid) if real_gpu else None
        # regions registered by clients on this host; pinned for the GPU, so copies are DMA
        pinner = CudaHostPinner(self.device.cuda_ordinal or 0) if real_gpu and spec.shm_pinning != "off" else None
        self.shm = SharedMemoryRegistry(pinner=pinner, pin_in_background=spec.shm_pinning == "background",
                                        pin_threads=spec.shm_pin_threads)
        self.runner = EngineRunner(self.caps, _budget(spec, self.device), slots=spec.slots,
                                   intra_op_threads=spec.intra_op_threads, shm=self.shm,
                                   memory_probe=self._memory_probe)
        self.request_stats = RequestStats()  # requests that came in over this worker's own HTTP and gRPC
        self._http: WorkerHttpServer | None = None
        self._grpc: WorkerGrpcServer | None = None

    @property
    def ledger(self):
        return self.runner.ledger

    # ---- lifecycle -------------------------------------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(self.spec.worker_id, self.caps, socket.gethostname(), os.getpid(),
                          os.environ.get("CUDA_VISIBLE_DEVICES"),
                          self._http.address if self._http is not None else None,
                          self._grpc.address if self._grpc is not None else None, self.probe.to_dict())

    def health(self) -> WorkerHealth:
        if self._gpu_health is not None and not self.runner.gpu_unhealthy:
            reason = self._gpu_health.check()
            if reason:
                log.error("worker %s: %s; taking no more work", self.spec.worker_id, reason)
                self.runner.mark_gpu_unhealthy(reason)
        return self.runner.health()

    def stats(self) -> dict:
        """The status view: ledger, counters, per-engine numbers, memory, requests, regions."""
        return {
            "ledger": self.runner.ledger_snapshot(),
            "counters": self.runner.health().counters,
            "engines": self.runner.engine_stats(),
            "nvml_used_bytes": self._memory_probe() if self._memory_probe else None,
            "nvml_health_watches": self._gpu_health.describe() if self._gpu_health else None,
            "rss_bytes": _rss_bytes(),
            "request_stats": self.request_stats.report(),
            "shm": self.shm.status(),
            "artifact_cache": self.artifacts.report(),
        }

    def in_flight(self) -> int:
        """Requests in this worker now: in its own HTTP and gRPC endpoints, and runs of its engines
        (those that came as Ray calls too). A host that leaves is drained until this is 0."""
        endpoints = sum(server.active for server in (self._http, self._grpc) if server is not None)
        return endpoints + sum(e["in_flight"] for e in self.runner.ledger_snapshot()["entries"])

    def shutdown(self) -> None:
        """Stop serving HTTP and gRPC, then unload everything (contexts and engines first), waiting for in-flight work."""
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop()
            self._grpc = None
        self.runner.close()
        self.shm.close()
        if self._gpu_health is not None:
            self._gpu_health.close()

    # ---- engines -----------------------------------------------------------
    def load(self, manifest: Manifest, source: ArtifactSource, options: LoadOptions | None = None,
             libraries: "dict[str, ArtifactSource] | None" = None) -> dict:
        """Load an artifact, evicting idle LRU engines if needed. Returns the ledger entry.

        Refuses what this device cannot run (or a model whose custom-op libraries the config does
        not trust) before fetching a byte; then takes the artifact and its libraries (``libraries``:
        their sources by sha256) from this host's cache, fetching them on a miss (sha256 verified)."""
        self.runner.check_loadable(manifest, options or LoadOptions())
        with self.artifacts.open(manifest, source) as path, \
                self.artifacts.open_libraries(manifest, libraries or {}) as library_files:
            return self.runner.load(manifest, path, options, library_files)

    def unload(self, key: str) -> bool:
        return self.runner.unload(key)

    def set_default_versions(self, defaults: dict[str, str]) -> None:
        """Which version of each model answers requests that name none (the controller's rollout)."""
        self.runner.set_default_versions(defaults)

    def infer(self, model: str, request: InferRequest, version: str | None = None) -> InferReply:
        """One request from inside the cluster (the ingress, the batch job, in-cluster clients)."""
        result = self.runner.infer(request, model, version)
        return InferReply(result.manifest.version, result.manifest.target.key(), result.outputs)

    def start_http(self, options: HttpOptions, on_miss: MissHandler | None = None) -> tuple[str, int]:
        """Serve KServe v2 inference over HTTP from this process (the fleet's one-hop path)."""
        if self._http is None:
            self._http = WorkerHttpServer(self.runner, options, self.request_stats, on_miss)
            self._http.start()
            freeze_heap()
        return self._http.address

    def start_grpc(self, options: GrpcOptions, on_miss: MissFn | None = None) -> tuple[str, int]:
        """Serve KServe v2 gRPC inference from this process (the fleet's one-hop path over gRPC)."""
        if self._grpc is None:
            self._grpc = WorkerGrpcServer(self.runner, options, self.request_stats, on_miss)
            self._grpc.start()
            if self._http is not None:  # the front door sends ModelInfer to the HTTP endpoint (HTTP/1.1)
                self._http.grpc = GrpcOverHttp1(self._grpc)
            freeze_heap()
        return self._grpc.address

    # ---- system shared memory ------------------------------------------------
    def register_shm(self, name: str, key: str, offset: int, byte_size: int, pin_wait_s: float = 0.0) -> bool:
        """Map a client's region; False when its object does not exist on this host. ``pin_wait_s``:
        see ``SharedMemoryRegistry.register``."""
        try:
            self.shm.register(name, key, offset, byte_size, pin_wait_s)
        except RegionNotHere:
            return False
        return True

    def unregister_shm(self, name: str | None = None) -> list[str]:
        return self.shm.unregister(name)

    def simulate_device_fault(self, message: str) -> None:
        """Simulated devices only: the next run fails as a broken CUDA context would (tests of the fleet)."""
        self.runner.simulate_device_fault(message)

    def simulate_gpu_unhealthy(self, reason: str) -> None:
        """Simulated devices only: NVML's verdict on a real GPU (an uncorrectable ECC error, a critical Xid)."""
        if not self.device.simulated:
            raise IncompatibleArtifact(f"{self.device.describe()} is real: its health is NVML's to say")
        self.runner.mark_gpu_unhealthy(reason)

    # ---- build -----------------------------------------------------------
    def build_from_bytes(self, source: bytes, request: BuildRequest, calibration: CalibrationResult | None = None,
                         evaluation: EvalData | None = None, libraries: "dict[str, bytes] | None" = None) -> tuple[dict, bytes]:
        """Build for one of this worker's targets from a source model shipped as bytes (the driver may
        be on another host); returns the manifest and the artifact's bytes, for the controller to publish.
        ``libraries``: the custom-op libraries ``request.custom_ops`` names, by file name, as bytes.
        Everything is written under this process's own temporary directory, and removed. The build's
        memory (its workspace bounded) is held in this device's ledger while it runs, or it waits for room:
        it never pushes a loaded engine out."""
        with tempfile.TemporaryDirectory(prefix="fleet-build-") as tmp:
            path = Path(tmp) / "source.onnx"
            path.write_bytes(source)
            out = Path(tmp) / "artifact"
            local = []
            for name in (Path(p).name for p in request.custom_ops):
                if name not in (libraries or {}):
                    raise IncompatibleArtifact(f"the build of {request.model} names the custom-op library {name} "
                                               f"and it was not sent")
                (Path(tmp) / "libraries").mkdir(exist_ok=True)
                (Path(tmp) / "libraries" / name).write_bytes((libraries or {})[name])
                local.append(str(Path(tmp) / "libraries" / name))
            request = dataclasses.replace(request, source_path=str(path), custom_ops=tuple(local),
                                          workspace_bytes=request.workspace_bytes or self.spec.build_workspace_bytes)
            what = f"{request.model}:{request.version}:{request.target.key()}"
            with self.runner.build_reservation(what, build_memory_bytes(request), self.spec.build_wait_s):
                manifest = self._build(request, out, calibration, evaluation)
            return manifest.to_dict(), (out / manifest.artifact_file).read_bytes()

    def _build(self, request: BuildRequest, out_dir: Path, calibration: CalibrationResult | None,
               evaluation: EvalData | None) -> Manifest:
        if request.target.executed_by_onnxruntime:  # refuse a source this worker's ONNX Runtime cannot load, clearly
            request = dataclasses.replace(request, target=dataclasses.replace(
                request.target, opset=onnx_opset(request.source_path)))
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
        return manifest
