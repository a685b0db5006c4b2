"""The typed values a worker and the fleet exchange (over Ray, so they pickle).

- ``WorkerInfo``: who a worker is, fixed for its life (asked once, at start);
- ``WorkerHealth``: what changes, cheap enough to ask every second;
- ``LoadOptions``: how to serve an engine, from the model's config;
- ``InferReply``: one in-cluster inference's answer.

No Ray and no engines here: the ingress, the batch job and the build farm import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.batcher import BatchingOptions
from workers.targets import WorkerCaps
from workers.warmup import WarmupSample


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    caps: WorkerCaps
    host: str  # host name
    pid: int
    cuda_visible_devices: str | None = None
    http: tuple[str, int] | None = None  # the worker's own KServe v2 endpoint, once started
    grpc: tuple[str, int] | None = None  # its own KServe v2 gRPC endpoint, once started
    probe: dict = field(default_factory=dict, hash=False, compare=False)  # workers.probe.ProbeReport, as found at start
    node_id: str | None = None  # the cluster's id of the node it runs on (Ray's), filled in by the fleet

    @property
    def simulated(self) -> bool:
        return self.caps.device.simulated


@dataclass(frozen=True)
class WorkerHealth:
    budget_bytes: int
    used_bytes: int
    loaded: frozenset[str]  # engine keys in service (not those still loading)
    counters: dict = field(default_factory=dict, hash=False, compare=False)
    broken: str | None = None  # why the device can no longer compute (a sticky CUDA error): restart the worker
    gpu_unhealthy: str | None = None  # NVML says the GPU itself is bad (ECC, Xid): route around it, no restart


@dataclass(frozen=True)
class LoadOptions:
    """How a worker serves one model's engine (``models.<name>`` in the fleet config)."""

    dynamic_batching: bool = True
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    reject_non_finite: bool = False  # 400 for NaN/Inf in float inputs
    allow_tf32: bool = False  # float32 matrix products in TF32 on tensor cores (ONNX Runtime CUDA)
    max_queue_size: int = 256  # requests waiting for the engine beyond its slots; more get a 503 at once (0: no bound)
    max_batch: int | None = None  # rows per engine run, at most the artifact's max batch (None: the artifact's)
    slots: int | None = None  # concurrent runs of the engine (Triton's instance count); None: the fleet's `slots`
    warmup: tuple[WarmupSample, ...] = ()  # run on a new engine before it takes traffic (Triton's model_warmup)
    # Artifacts with host code (version-compatible plans, native libraries) load only with their sha256 here.
    trusted_sha256: tuple[str, ...] = ()

    def max_batch_for(self, built: int) -> int:
        """Rows per engine run for an artifact built for ``built``."""
        return min(self.max_batch, built) if self.max_batch else built

    def batching(self, max_batch: int) -> BatchingOptions:
        return BatchingOptions(self.max_batch_for(max_batch), self.max_queue_delay_us,
                               tuple(self.preferred_batch_sizes), self.dynamic_batching)


@dataclass
class InferReply:
    version: str
    target_key: str
    outputs: dict[str, np.ndarray]
