"""Per GPU type: which runtime environment its workers get and which precisions serve there.

Plain Python, no Ray. A *GPU type* is named by its model ("T4", "V100") or by a compute
capability ("6.1"); a worker takes the entry that names its model, else its compute
capability. The config's ``gpu_types`` section (``cluster.config.GpuTypeConfig``) becomes
``RuntimeProfile``s here; ``DEFAULT_PROFILES`` are the documented defaults
(docs/runtimes.md) for fleets that ask for them (``gpu_type_defaults: true``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from workers.devices import Device
from workers.manifest import Manifest
from workers.targets import WorkerCaps, parse_version

from cluster.rollout import gpu_type


@dataclass(frozen=True)
class RuntimeProfile:
    """What the workers of one GPU type run with."""

    onnxruntime: str | None = None  # ONNX Runtime version installed into the type's environment
    tensorrt: str | None = None  # TensorRT version (real GPUs; a simulated GPU declares its own)
    pip: tuple[str, ...] = ()  # more requirements, as pip reads them
    precisions: tuple[str, ...] | None = None  # None: every precision may serve on this type
    note: str = ""  # why (shown by `fleet doctor`)

    def packages(self, simulated: bool) -> tuple[str, ...]:
        """The pip requirements of this type's environment. A simulated GPU executes on the CPU
        (the CPU build of ONNX Runtime, no TensorRT); a real one gets onnxruntime-gpu and TensorRT."""
        reqs = []
        if self.onnxruntime:
            reqs.append(f"{'onnxruntime' if simulated else 'onnxruntime-gpu'}=={self.onnxruntime}")
        if self.tensorrt and not simulated:
            major = self.tensorrt.split(".")[0]
            # TensorRT 8.6's last wheels are `tensorrt==8.6.1` (CPython <= 3.11); 10 and later are per CUDA major
            reqs.append(f"tensorrt=={self.tensorrt}" if major == "8" else f"tensorrt-cu12=={self.tensorrt}")
        return tuple(reqs) + tuple(self.pip)


def env_key(packages: tuple[str, ...]) -> str:
    """A directory name for the environment of these requirements (same packages, same environment)."""
    digest = hashlib.sha256("\n".join(sorted(packages)).encode()).hexdigest()[:16]
    first = packages[0].replace("==", "-").replace("/", "_") if packages else "base"
    return f"{first}-{digest}"


# Documented defaults (docs/runtimes.md): the newest releases each architecture still gets.
# TensorRT 10.4 is the last for Volta (7.0) and 8.6.1 the last for Pascal (6.1); ONNX Runtime's
# CUDA 12 builds still carry kernels for 6.x/7.0 in these releases; no float16 on a P4 (no fast FP16).
DEFAULT_PROFILES: dict[str, RuntimeProfile] = {
    "P4": RuntimeProfile(onnxruntime="1.18.1", tensorrt="8.6.1", precisions=("float32", "int8", "int8_calib"),
                         note="Pascal 6.1: TensorRT <= 8.6.1 (Python <= 3.11), no fast FP16"),
    "V100": RuntimeProfile(onnxruntime="1.31.1", tensorrt="10.4.0", note="Volta 7.0: TensorRT <= 10.4"),
    "T4": RuntimeProfile(onnxruntime="1.32.0", tensorrt="10.16.1.11", note="Turing 7.5"),
    "A10": RuntimeProfile(onnxruntime="1.32.0", tensorrt="10.16.1.11", note="Ampere 8.6"),
    "A100": RuntimeProfile(onnxruntime="1.32.0", tensorrt="10.16.1.11", note="Ampere 8.0"),
    "H100": RuntimeProfile(onnxruntime="1.32.0", tensorrt="10.16.1.11", note="Hopper 9.0"),
}


# The last TensorRT release each old architecture gets: (below this compute capability, up to this release).
LAST_TENSORRT = (((7, 0), (8, 6), "Pascal and older (below 7.0): TensorRT 8.6 is their last release"),
                 ((7, 5), (10, 4), "Volta (7.0, 7.2): TensorRT 10.4 is its last release; TensorRT 11 needs 7.5 or newer"))


def tensorrt_refusal(device: Device, version: str) -> str | None:
    """Why ``device`` cannot run TensorRT ``version`` (None: it can), by the releases' support tables."""
    if not device.is_gpu or device.cc is None:
        return f"{device.describe()} is not a GPU: it runs no TensorRT"
    wanted = parse_version(version)[:2]
    for below, last, why in LAST_TENSORRT:
        if device.cc < below and wanted > last:
            return f"{device.describe()} cannot run TensorRT {version}: {why}"
    return None


def _lookup(table: dict[str, "object"], device: Device):
    if not device.is_gpu:
        return table.get("cpu")
    name = gpu_type(device).upper()
    for key, value in table.items():
        if key.upper() == name:
            return value
    return table.get(device.compute_capability or "")


@dataclass(frozen=True)
class RuntimeProfiles:
    """The fleet's profiles by GPU type or compute capability (the config's ``gpu_types``)."""

    by_type: dict[str, RuntimeProfile] = field(default_factory=dict)
    use_defaults: bool = False

    def for_device(self, device: Device) -> RuntimeProfile | None:
        found = _lookup(self.by_type, device)
        if found is None and self.use_defaults and device.is_gpu:
            found = _lookup(DEFAULT_PROFILES, device)
        return found

    def precision_policy(self) -> "PrecisionPolicy":
        table = {k: p.precisions for k, p in self.by_type.items() if p.precisions is not None}
        defaults = {k: p.precisions for k, p in DEFAULT_PROFILES.items() if p.precisions is not None} if self.use_defaults else {}
        return PrecisionPolicy(tuple(sorted(table.items())), tuple(sorted(defaults.items())))


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which precisions may serve on which GPU type: a policy, not whichever artifact happens to fit."""

    by_type: tuple[tuple[str, tuple[str, ...]], ...] = ()
    defaults: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def allowed(self, device: Device) -> tuple[str, ...] | None:
        found = _lookup(dict(self.by_type), device)
        return found if found is not None else _lookup(dict(self.defaults), device)

    def allows(self, manifest: Manifest, caps: WorkerCaps) -> bool:
        allowed = self.allowed(caps.device)
        return allowed is None or manifest.precision in allowed
