"""Targets, runtimes and the one compatibility rule: ``can_run``.

A *target* is what an artifact was built for; a *runtime* is what a worker can
execute. ``can_run(artifact, worker)`` is the only place in forward-fleet that
decides whether an artifact may be handed to a worker: the router filters with
it, the worker re-checks with it before loading, the build farm plans with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

from workers.devices import Device, parse_compute_capability

BACKENDS = ("onnxruntime", "tensorrt")
PROVIDERS = ("cpu", "cuda", "tensorrt")
PRECISIONS = ("float32", "float16", "int8", "int8_calib")
# TensorRT's HardwareCompatibilityLevel, by the names users know from trtexec.
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
ANY = "any"


def parse_version(text: str) -> tuple[int, ...]:
    """"10.16.1.11" -> (10, 16, 1, 11)."""
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def same_release(a: str, b: str) -> bool:
    """TensorRT plans are tied to major.minor.patch; the build number does not matter."""
    return parse_version(a)[:3] == parse_version(b)[:3]


@dataclass(frozen=True)
class Target:
    """What an artifact was built for."""

    backend: str  # "onnxruntime" | "tensorrt"
    backend_version: str  # "10.16.1"; for ONNX Runtime the version it was prepared with
    compute_capability: str = ANY  # "7.5" or "any"
    provider: str = "cpu"  # onnxruntime: "cpu" | "cuda"; tensorrt: "tensorrt"
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    precision: str = "float32"
    simulated: bool = False  # built for a declared (virtual) GPU, executed by ONNX Runtime
    # The ai.onnx opset of an artifact ONNX Runtime executes (0: not recorded): it needs an ONNX Runtime
    # that loads that opset, which each worker probes (Runtime.max_opset).
    opset: int = 0

    @property
    def executed_by_onnxruntime(self) -> bool:
        return self.backend == "onnxruntime" or self.simulated

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ValueError(
                f"hardware_compatibility must be one of {HARDWARE_COMPATIBILITY}, "
                f"got {self.hardware_compatibility!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compute_capability != ANY:
            parse_compute_capability(self.compute_capability)
        if self.backend == "tensorrt" and self.compute_capability == ANY:
            raise ValueError("a TensorRT target needs the compute capability it is built on")
        parse_version(self.backend_version)

    @property
    def needs_tensorrt(self) -> bool:
        """A real TensorRT plan (a simulated one is executed by ONNX Runtime on the CPU)."""
        return self.backend == "tensorrt" and not self.simulated

    def key(self) -> str:
        """Directory-safe name, unique per target: 'tensorrt-10.16.1-sm75-ampere_plus-vc-sim'."""
        if self.backend == "tensorrt":
            parts = ["tensorrt", ".".join(map(str, parse_version(self.backend_version)[:3]))]
            parts.append("sm" + self.compute_capability.replace(".", ""))
        else:
            parts = ["onnxruntime", self.provider]
            if self.compute_capability != ANY:
                parts.append("sm" + self.compute_capability.replace(".", ""))
        if self.hardware_compatibility != "none":
            parts.append(self.hardware_compatibility)
        if self.version_compatible:
            parts.append("vc")
        if self.simulated:
            parts.append("sim")
        return "-".join(parts)

    def describe(self) -> str:
        if self.backend == "tensorrt":
            text = f"{self.compute_capability} (TensorRT {self.backend_version})"
        else:
            where = "any" if self.compute_capability == ANY else self.compute_capability
            text = f"{where} (ONNX Runtime {self.provider})"
        extras = [x for x in (
            self.hardware_compatibility if self.hardware_compatibility != "none" else "",
            "version-compatible" if self.version_compatible else "",
            "simulated" if self.simulated else "",
        ) if x]
        return text + (f" [{', '.join(extras)}]" if extras else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        return cls(**d)


@dataclass(frozen=True)
class Runtime:
    """One way a worker can execute: backend, its version, execution provider."""

    backend: str
    version: str
    provider: str  # "cpu" | "cuda" | "tensorrt"
    simulated: bool = False
    lean: bool = False  # TensorRT lean runtime: runs version-compatible plans only
    # The CUDA provider of the installed ONNX Runtime build supports devices from here up.
    min_compute_capability: str = "6.0"
    max_opset: int = 0  # ONNX Runtime: the highest ai.onnx opset it loads, probed at start (0: not probed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Runtime":
        return cls(**d)

    def describe(self) -> str:
        name = "TensorRT" if self.backend == "tensorrt" else "ONNX Runtime"
        sim = ", simulated" if self.simulated else ""
        return f"{name} {self.version} ({self.provider}{sim})"


@dataclass(frozen=True)
class WorkerCaps:
    """What a worker is: its device and the runtimes it has."""

    worker_id: str
    device: Device
    runtimes: tuple[Runtime, ...]
    node_id: str = ""
    labels: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "node_id": self.node_id,
            "device": self.device.to_dict(),
            "runtimes": [r.to_dict() for r in self.runtimes],
            "labels": dict(self.labels),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerCaps":
        return cls(
            worker_id=d["worker_id"],
            node_id=d.get("node_id", ""),
            device=Device.from_dict(d["device"]),
            runtimes=tuple(Runtime.from_dict(r) for r in d["runtimes"]),
            labels=dict(d.get("labels", {})),
        )


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class HasTarget(Protocol):
    @property
    def target(self) -> Target: ...


def _target_of(artifact: Target | HasTarget) -> Target:
    return artifact if isinstance(artifact, Target) else artifact.target


def _tensorrt_version_ok(built: str, runtime: Runtime, version_compatible: bool) -> Verdict:
    b, r = parse_version(built), parse_version(runtime.version)
    if same_release(built, runtime.version) and not runtime.lean:
        return Verdict(True)
    if not version_compatible:
        if runtime.lean:
            return Verdict(False, f"the lean runtime {runtime.version} runs version-compatible plans only")
        return Verdict(False, f"plan built with TensorRT {built}, worker has TensorRT {runtime.version}")
    # Version-compatible plans run on the same or a later release of the same major,
    # and TensorRT 11 still runs TensorRT 10 version-compatible plans.
    if (r[0] == b[0] and r[:3] >= b[:3]) or (b[0] == 10 and r[0] == 11):
        return Verdict(True)
    return Verdict(
        False,
        f"version-compatible plan from TensorRT {built} does not run on TensorRT {runtime.version}",
    )


def _tensorrt_device_ok(target: Target, device: Device) -> Verdict:
    if not device.is_gpu:
        return Verdict(False, f"{device.describe()} is not a GPU")
    have = device.cc
    built = parse_compute_capability(target.compute_capability)
    if target.hardware_compatibility == "ampere_plus":
        if have is not None and have >= (8, 0):
            return Verdict(True)
        return Verdict(False, f"ampere_plus plan needs compute capability 8.0 or newer, device has {device.compute_capability}")
    # "none" and "same_compute_capability" both need the capability the plan was built on.
    if have == built:
        return Verdict(True)
    return Verdict(
        False,
        f"plan built for compute capability {target.compute_capability}, device has {device.compute_capability}",
    )


def _fp16_ok(target: Target, device: Device) -> Verdict:
    # A float16 artifact built for "any" device must not land on a GPU without fast
    # FP16; one built explicitly for that compute capability was asked for on purpose.
    if target.precision != "float16" or not device.is_gpu or device.has_fast_fp16:
        return Verdict(True)
    if target.compute_capability == device.compute_capability:
        return Verdict(True)
    return Verdict(
        False,
        f"{device.describe()} has no fast FP16; build float32 or int8 for it, "
        f"or name compute capability {device.compute_capability} explicitly to build float16",
    )


def _opset_ok(target: Target, worker: WorkerCaps) -> Verdict:
    """An artifact ONNX Runtime executes needs an ONNX Runtime on the worker that loads its opset."""
    if not target.opset or not target.executed_by_onnxruntime:
        return Verdict(True)
    probed = [r for r in worker.runtimes if r.backend == "onnxruntime" and r.max_opset]
    if not probed or any(r.max_opset >= target.opset for r in probed):
        return Verdict(True)
    best = max(probed, key=lambda r: r.max_opset)
    return Verdict(False, f"artifact uses ONNX opset {target.opset}; ONNX Runtime {best.version} on this worker "
                          f"loads opsets up to {best.max_opset}")


def can_run(artifact: Target | HasTarget, worker: WorkerCaps) -> Verdict:
    """Whether ``worker`` can execute ``artifact`` (a Target or anything with ``.target``).

    Returns a Verdict whose ``reason`` says why not, for error messages.
    """
    target = _target_of(artifact)
    device = worker.device
    opset = _opset_ok(target, worker)
    if not opset:
        return opset
    reasons = []
    for runtime in worker.runtimes:
        if runtime.backend != target.backend:
            continue
        if runtime.simulated != target.simulated:
            what = "simulated" if target.simulated else "real"
            reasons.append(f"{what} {target.backend} artifact on a {'simulated' if runtime.simulated else 'real'} runtime")
            continue
        if target.backend == "tensorrt":
            for check in (
                _tensorrt_device_ok(target, device),
                _tensorrt_version_ok(target.backend_version, runtime, target.version_compatible),
                _fp16_ok(target, device),
            ):
                if not check:
                    reasons.append(check.reason)
                    break
            else:
                return Verdict(True)
            continue
        # ONNX Runtime: a CPU artifact runs anywhere ONNX Runtime does.
        if target.provider == "cuda":
            if runtime.provider != "cuda":
                reasons.append("artifact needs ONNX Runtime's CUDA provider, worker has only the CPU provider")
                continue
            if not device.is_gpu or device.cc is None:
                reasons.append(f"{device.describe()} is not a GPU")
                continue
            if device.cc < parse_compute_capability(runtime.min_compute_capability):
                reasons.append(
                    f"ONNX Runtime CUDA needs compute capability {runtime.min_compute_capability} or newer, "
                    f"device has {device.compute_capability}"
                )
                continue
            if target.compute_capability != ANY and target.compute_capability != device.compute_capability:
                reasons.append(f"artifact built for compute capability {target.compute_capability}, device has {device.compute_capability}")
                continue
        check = _fp16_ok(target, device)
        if not check:
            reasons.append(check.reason)
            continue
        return Verdict(True)
    if not reasons:
        have = ", ".join(r.describe() for r in worker.runtimes) or "no runtime"
        reasons.append(f"worker has no {target.backend} runtime (it has {have})")
    return Verdict(False, "; ".join(dict.fromkeys(reasons)))
