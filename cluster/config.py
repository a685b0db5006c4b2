"""The fleet config: one typed object, validated once, handed to every actor.

Loaded from YAML (``configs/*.yaml``); every field has a default that works on
one machine without a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.artifacts import DEFAULT_CACHE_BYTES
from workers.cpus import usable_cpus
from workers.devices import Device, parse_compute_capability
from workers.errors import InvalidConfig
from workers.messages import LoadOptions
from workers.storage import StoreSpec
from workers.targets import Runtime, parse_version

from cluster.runtime_policy import RuntimeProfile, RuntimeProfiles

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
          "MI": 1024**2, "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TI": 1024**4, "TIB": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """'15GiB' -> 16106127360; plain numbers are bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 15GiB or a number of bytes)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPUDecl(_Strict):
    """A virtual GPU of a simulated node."""

    model: str
    compute_capability: str
    memory: int
    tensorrt: str | None = None  # TensorRT version this node would have
    budget: int | None = None  # overrides memory_fraction / reserve

    @field_validator("memory", "budget", mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc(cls, v):
        parse_compute_capability(str(v))
        return str(v)

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _trt(cls, v):
        if v is not None:
            parse_version(str(v))
        return None if v is None else str(v)


class NodeDecl(_Strict):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GPUDecl] = Field(default_factory=list)

    def simulated_devices(self) -> tuple[Device, ...]:
        return tuple(
            Device(
                name=g.model,
                uuid=f"SIM-{self.name}-{i}",
                kind="gpu",
                compute_capability=g.compute_capability,
                total_memory_bytes=g.memory,
                simulated=True,
            )
            for i, g in enumerate(self.gpus)
        )

    def simulated_runtimes(self) -> tuple[Runtime, ...]:
        versions = sorted({g.tensorrt for g in self.gpus if g.tensorrt})
        return tuple(Runtime("tensorrt", v, "tensorrt", simulated=True) for v in versions)


class GpuTypeConfig(_Strict):
    """The runtime environment and precision policy of one GPU type (``gpu_types:``, keyed by a GPU
    model such as ``T4`` or a compute capability such as ``"6.1"``). Its workers start in a Python
    environment with these packages (prepared once per host, ``cluster.runtime_envs``); what they
    really have is probed at start, and that is what routing uses. Defaults: docs/runtimes.md."""

    onnxruntime: str | None = None  # e.g. "1.31.1": onnxruntime (simulated GPUs) / onnxruntime-gpu (real)
    tensorrt: str | None = None  # real GPUs only (a simulated GPU declares its TensorRT in nodes:)
    pip: list[str] = Field(default_factory=list)  # more requirements
    precisions: list[Literal["float32", "float16", "int8", "int8_calib"]] | None = None  # None: all

    @field_validator("onnxruntime", "tensorrt", mode="before")
    @classmethod
    def _version(cls, v):
        if v is not None:
            parse_version(str(v))
        return None if v is None else str(v)

    @field_validator("pip")
    @classmethod
    def _requirements(cls, v):
        for req in v:  # requirements only: no pip options, which could point pip anywhere
            if not req or req.lstrip().startswith("-"):
                raise ValueError(f"gpu_types.*.pip takes requirements (name==version), not {req!r}")
        return v

    def profile(self) -> RuntimeProfile:
        return RuntimeProfile(self.onnxruntime, self.tensorrt, tuple(self.pip),
                              tuple(self.precisions) if self.precisions is not None else None)


class ModelConfig(_Strict):
    """Per-model serving options (``models:`` in the fleet config)."""

    max_batch: int = Field(64, ge=1, le=1 << 20)
    dynamic_batching: bool = True
    max_queue_delay_us: int = Field(500, ge=0, le=10_000_000)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    fallback: Literal["none", "onnxruntime"] = "none"
    preload: bool = True
    # Artifacts with host code (version-compatible plans, native libraries) load only with their sha256
    # listed here: a writer of the repository cannot swap them (`fleet models` shows the sha256).
    trusted_sha256: list[str] = Field(default_factory=list)
    # What `fleet build` takes as --custom-ops for this model when none are given: library paths
    # (relative: to the directory `fleet build` runs in). Workers load them only when each library's
    # sha256 is in trusted_sha256 (native code; `fleet models` shows the digests).
    custom_ops: list[str] = Field(default_factory=list)
    reject_non_finite: bool = False  # 400 for NaN/Inf in float inputs
    # float32 artifacts on ONNX Runtime CUDA compute matrix products in TF32 (tensor cores): ~1.8x,
    # ~4e-4 relative error (docs/gpu-results.md). Off: float32 computes in float32.
    allow_tf32: bool = False
    # Requests that may wait for an engine beyond those running (as Triton's max_queue_size); more are
    # answered 503 with Retry-After at once, so a burst cannot make every request slow. 0: no bound.
    max_queue_size: int = Field(256, ge=0, le=1_000_000)

    def load_options(self) -> LoadOptions:
        return LoadOptions(self.dynamic_batching, self.max_queue_delay_us, tuple(self.preferred_batch_sizes),
                           reject_non_finite=self.reject_non_finite, allow_tf32=self.allow_tf32,
                           max_queue_size=self.max_queue_size, trusted_sha256=tuple(self.trusted_sha256))

    @model_validator(mode="before")
    @classmethod
    def _no_trust_by_name(cls, data):
        if isinstance(data, dict) and "trust_version_compatible" in data:  # a writer of the bucket could swap it
            raise ValueError("trust_version_compatible is gone: trust is pinned by content now; list the plan's "
                             "sha256 in trusted_sha256 instead (`fleet models` shows it)")
        return data

    @field_validator("trusted_sha256")
    @classmethod
    def _sha256(cls, v):
        for digest in v:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"trusted_sha256 takes full sha256 digests (64 hex digits, lower case), got {digest!r}")
        return v


# URI schemes pyarrow.fs opens (the repository may be any of them, or a local path)
REPOSITORY_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


class StorageOptions(_Strict):
    """How to reach an S3 (or S3-compatible) repository. Unset fields come from the URI's query
    (``?endpoint_override=...&scheme=http&region=...``) or the usual AWS environment variables
    and files of each process that opens it (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_REGION``, ``~/.aws``)."""

    endpoint_override: str | None = None  # host:port of an S3-compatible endpoint (MinIO, Ceph, ...)
    scheme: Literal["http", "https"] | None = None
    region: str | None = None
    access_key: str | None = Field(None, repr=False)
    secret_key: str | None = Field(None, repr=False)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    request_timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _pair(self):
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("storage.access_key and storage.secret_key go together: set both or neither")
        return self


class TlsOptions(_Strict):
    """HTTPS (and gRPC over TLS) on the fleet's ports, served by the front door (HAProxy). PEM
    files on the head; relative paths are from the directory `fleet up` runs in. With TLS on,
    the fleet's ports speak TLS only. ``client_ca``: mutual TLS, a client must present a
    certificate signed by it. Traffic inside the fleet (the front door to the workers, Ray)
    stays on the cluster's network, as Ray's own does (docs/multihost.md)."""

    cert: str | None = None  # the server's certificate chain (PEM)
    key: str | None = Field(None, repr=False)  # its private key (PEM)
    client_ca: str | None = None  # CA certificates (PEM) that sign the clients' certificates

    @model_validator(mode="after")
    def _together(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls.cert and tls.key go together: set both or neither")
        if self.client_ca and not self.cert:
            raise ValueError("tls.client_ca (mutual TLS) needs tls.cert and tls.key")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def resolved(self, base_dir: Path) -> "TlsOptions":
        files = {f: getattr(self, f) for f in ("cert", "key", "client_ca")}
        return TlsOptions(**{f: p and _absolute(p, base_dir) for f, p in files.items()})


class GcsFaultTolerance(_Strict):
    """Ray's GCS fault tolerance: the head's GCS keeps its tables in Redis, so when the GCS
    process dies and comes back, the workers, their engines and the routes live on (see
    docs/reliability.md). Applies when `fleet up` starts the head."""

    # "host:port" of a Redis (password, if any, in $FLEET_GCS_REDIS_PASSWORD), or "local":
    # `fleet up` starts redis-server on the head (127.0.0.1:local_redis_port, append-only file).
    redis: str | None = None
    local_redis_port: int = Field(6390, ge=1, le=65535)
    # How long raylets and workers wait for a GCS that went away before they exit (Ray's own
    # default, without fault tolerance, is 60 s).
    reconnect_timeout_s: int = Field(300, ge=10, le=86400)
    # `fleet up` keeps the head's GCS process running: started again restart_delay_s after it dies.
    restart: bool = True
    restart_delay_s: float = Field(1.0, ge=0, le=600)

    @field_validator("redis")
    @classmethod
    def _redis(cls, v):
        if v is None or v == "local":
            return v
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"gcs_fault_tolerance.redis must be host:port or \"local\", got {v!r}")
        return v

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    def redis_address(self) -> str | None:
        return f"127.0.0.1:{self.local_redis_port}" if self.redis == "local" else self.redis


class FleetConfig(_Strict):
    name: str = "local"
    # A local directory (relative: to the current directory of `fleet up`) or a URI pyarrow.fs
    # opens (s3://bucket/prefix, gs://..., hdfs://...); see docs/multihost.md.
    repository: str = "repository"
    storage: StorageOptions = Field(default_factory=StorageOptions)
    # A Triton model repository (a directory or a URI) the fleet serves too: deploying the fleet imports
    # it into `repository` (as `fleet import-triton`: ONNX models built for the fleet's targets, plans
    # published per compute capability) and loads its models. Never written to.
    triton_repository: str | None = None
    # Each host's artifact cache (under its temporary directory, or $FLEET_ARTIFACT_CACHE), in bytes.
    artifact_cache_bytes: int = DEFAULT_CACHE_BYTES
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ray_port: int = Field(6379, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)
    discover_nodes: bool = True  # every Ray node's real GPUs (or its CPU) get workers; declared simulated nodes always do
    nodes: list[NodeDecl] = Field(default_factory=list)
    memory_fraction: float = Field(0.9, gt=0, le=1)
    reserve_bytes: int = 0
    cpu_budget: int | None = None  # budget of a CPU device (default: fraction of RAM)
    slots: int = Field(8, ge=1, le=256)  # configs/local.yaml says why 8
    intra_op_threads: int = Field(0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    ingress_replicas: int | None = Field(None, ge=1, le=64)  # HTTP ingress replicas; None: by CPU count
    worker_http_loops: int = Field(1, ge=1, le=16)  # event loops of a worker's HTTP endpoint (workers/http.py)
    gil_switch_interval_ms: float | None = Field(None, gt=0, le=100)  # workers' sys.setswitchinterval; None: Python's 5
    max_request_bytes: int = 64 << 20
    auth_token: str | None = None  # bearer token for repository/admin calls (env FLEET_AUTH_TOKEN)
    auth_inference: bool = False  # require the token for inference and metadata too
    # HAProxy on `port` sends inference straight to a worker holding the model (one hop); the rest to Serve on `serve_port`
    front_door: bool = True
    serve_port: int | None = Field(None, ge=1, le=65535)
    # KServe v2 / Triton gRPC (inference.GRPCInferenceService) on its own port, as Triton's 8001;
    # None: no gRPC. Served by the front door's router, which forwards inference to a worker's own
    # gRPC endpoint in one hop (needs the front door).
    grpc_port: int | None = Field(8001, ge=1, le=65535)
    # How long a request, a load or a batch part waits for a worker that can run its model while
    # that worker is being replaced (it crashed, was killed, lost its GPU context), before a 503.
    worker_wait_s: float = Field(60.0, ge=0, le=3600)
    # A build counts its memory in its device's ledger before it starts (TensorRT's workspace bounded
    # by this; None: the build's own default) and waits this long for room; it never evicts.
    build_workspace_bytes: int | None = None
    build_wait_s: float = Field(120.0, ge=0, le=3600)
    # Triton's system shared memory extension: clients on a fleet host register POSIX shared memory objects and
    # send only tensor descriptions. Off by default (Triton's --allow-client-shm): workers then read and write any
    # object a client names. A GPU worker page-locks each region: in the background (registration returns once
    # it is mapped), at registration, or off (copies staged by the driver, as Triton does).
    allow_client_shm: bool = False
    client_shm_pinning: Literal["background", "registration", "off"] = "background"
    client_shm_pin_threads: int = Field(4, ge=1, le=32)  # in the background (a batch job registers 16-24 at once)
    gcs_fault_tolerance: GcsFaultTolerance = Field(default_factory=GcsFaultTolerance)
    tls: TlsOptions = Field(default_factory=TlsOptions)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    # Per GPU type (a model name such as T4, or a compute capability such as "6.1"): the ONNX Runtime /
    # TensorRT its workers run (each type its own Python environment) and the precisions it may serve.
    gpu_types: dict[str, GpuTypeConfig] = Field(default_factory=dict)
    # Types not in gpu_types take the documented defaults (docs/runtimes.md; real GPUs only).
    gpu_type_defaults: bool = False

    def trusted_pins(self) -> dict[str, tuple[str, ...]]:
        """Per model, the sha256 digests its config pins (artifacts and libraries with code of their own)."""
        return {m: tuple(c.trusted_sha256) for m, c in self.models.items() if c.trusted_sha256}

    def runtime_profiles(self) -> RuntimeProfiles:
        return RuntimeProfiles({k: v.profile() for k, v in self.gpu_types.items()}, self.gpu_type_defaults)

    @field_validator("gpu_types")
    @classmethod
    def _gpu_type_keys(cls, v):
        for key in v:
            if re.fullmatch(r"\d+\.\d+", key):
                parse_compute_capability(key)
            elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", key):
                raise ValueError(f"gpu_types keys are GPU models (T4, V100) or compute capabilities (\"7.5\"), got {key!r}")
        return v

    @field_validator("reserve_bytes", "max_request_bytes", "cpu_budget", "artifact_cache_bytes", "build_workspace_bytes",
                     mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("repository", mode="before")
    @classmethod
    def _repository(cls, v):
        text = str(v).strip()
        if not text:
            raise ValueError("repository is empty: give a directory or a URI such as s3://bucket/prefix")
        if "://" in text:
            scheme = text.split("://", 1)[0].lower()
            if scheme not in REPOSITORY_SCHEMES:
                raise ValueError(f"repository URI scheme {scheme!r} is not one pyarrow.fs opens "
                                 f"({', '.join(REPOSITORY_SCHEMES)})")
        return text

    @model_validator(mode="after")
    def _check(self):
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        if self.tls.enabled and not self.front_door:
            raise ValueError("tls is served by the front door (HAProxy): it needs front_door: true")
        if not self.discover_nodes and not self.nodes:
            raise ValueError("discover_nodes is false and no nodes are declared: the fleet would have no workers")
        s3_options = self.storage.model_dump(exclude={"connect_timeout_s", "request_timeout_s"}, exclude_none=True)
        if s3_options and not self.repository.lower().startswith("s3://"):
            raise ValueError(f"storage: {', '.join(sorted(s3_options))} apply to an s3:// repository, "
                             f"and the repository is {self.repository}")
        return self

    @property
    def simulated(self) -> bool:
        return any(n.gpus for n in self.nodes)

    @property
    def url(self) -> str:
        """The fleet's URL as a client on this host uses it (https with TLS on)."""
        scheme = "https" if self.tls.enabled else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{scheme}://{host}:{self.port}"

    def ingress_replica_count(self) -> int:
        """Two replicas beat one even on 2 cores (one decodes while the other waits on a worker)."""
        return self.ingress_replicas or min(8, max(2, usable_cpus() // 4))

    def model_config_for(self, model: str) -> ModelConfig:
        return self.models.get(model) or ModelConfig()

    @property
    def repository_is_local(self) -> bool:
        return "://" not in self.repository or self.repository.startswith("file://")

    def resolved(self, base_dir: Path | None = None) -> "FleetConfig":
        """An absolute repository path (a URI stays as it is); ``FLEET_AUTH_TOKEN`` fills ``auth_token``."""
        base = base_dir or Path.cwd()
        repo = _absolute(self.repository.removeprefix("file://"), base) if self.repository_is_local else self.repository
        token = self.auth_token or os.environ.get("FLEET_AUTH_TOKEN") or None
        triton = self.triton_repository
        triton = _absolute(triton, base) if triton and "://" not in triton else triton
        tls = self.tls.resolved(base)
        return self.model_copy(update={"repository": repo, "auth_token": token, "tls": tls, "triton_repository": triton})

    def store_spec(self) -> StoreSpec:
        """Where the repository is, for the controller and (for an object store) the workers."""
        o = self.storage
        return StoreSpec(self.repository, o.endpoint_override, o.scheme, o.region, o.access_key, o.secret_key,
                         o.connect_timeout_s, o.request_timeout_s)


def _absolute(where: str, base_dir: Path) -> str:
    """A path of the config's, relative to ``base_dir`` unless it is absolute (``~`` expanded)."""
    path = Path(where).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def load_config(path: str | Path | None = None, **overrides) -> FleetConfig:
    """Read a YAML config (None: the built-in local defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidConfig(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidConfig(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidConfig(f"config file {path} must hold a mapping at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = FleetConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"config {path or '(defaults)'} is invalid: {problems}") from None
    return config.resolved()


@dataclass(frozen=True)
class Endpoints:
    """Where the fleet listens, as ``deploy`` resolved it from the config and the machine."""

    front_door: bool  # HAProxy on the fleet's port sends inference straight to the workers
    serve_port: int  # Ray Serve's port (the fleet's port itself when there is no front door)
