"""Devices: what one worker process can compute on.

Discovery order: NVML for identity and memory, cuda-python for the devices this
process may use (NVML ignores ``CUDA_VISIBLE_DEVICES``, so the two are joined by
UUID), else the CPU. A device declared in the fleet config (``simulated=True``)
overrides discovery.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from dataclasses import asdict, dataclass

log = logging.getLogger("forward-fleet.devices")

# Compute capabilities without fast FP16 arithmetic (Pascal consumer/Tesla P4/P40).
_SLOW_FP16 = {(6, 1)}


def parse_compute_capability(text: str) -> tuple[int, int]:
    """"7.5" -> (7, 5); raises ValueError with the bad text."""
    try:
        major, minor = str(text).strip().split(".")
        return int(major), int(minor)
    except ValueError:
        raise ValueError(f"compute capability must look like '7.5', got {text!r}") from None


@dataclass(frozen=True)
class Device:
    """One GPU, or the CPU."""

    name: str
    uuid: str
    kind: str  # "gpu" | "cpu"
    compute_capability: str | None  # "7.5"; None for the CPU
    total_memory_bytes: int
    simulated: bool = False
    cuda_ordinal: int | None = None  # index as this process sees it (after CUDA_VISIBLE_DEVICES)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def is_real_gpu(self) -> bool:
        """A GPU this process computes on (not one declared by a simulated fleet's config)."""
        return self.is_gpu and not self.simulated

    @property
    def cc(self) -> tuple[int, int] | None:
        return parse_compute_capability(self.compute_capability) if self.compute_capability else None

    @property
    def has_fast_fp16(self) -> bool:
        cc = self.cc
        return cc is not None and cc >= (5, 3) and cc not in _SLOW_FP16

    def describe(self) -> str:
        if not self.is_gpu:
            return f"{self.name} (CPU)"
        sim = ", simulated" if self.simulated else ""
        return f"{self.name} (compute capability {self.compute_capability}{sim})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Device":
        return cls(**d)


def cpu_device() -> Device:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    name = platform.processor() or platform.machine() or "cpu"
    return Device(
        name=f"CPU {name}",
        uuid=f"CPU-{socket.gethostname()}",
        kind="cpu",
        compute_capability=None,
        total_memory_bytes=int(total),
    )


def _nvml_devices() -> dict[str, Device]:
    """UUID -> Device for every GPU on this host, or {} without NVML."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: the common case on CPU machines
        return {}
    found: dict[str, Device] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = name.decode() if isinstance(name, bytes) else name
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            found[uuid] = Device(
                name=name,
                uuid=uuid,
                kind="gpu",
                compute_capability=f"{major}.{minor}",
                total_memory_bytes=int(mem.total),
            )
    finally:
        pynvml.nvmlShutdown()
    return found


def _format_cuda_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _cuda_visible_uuids() -> list[str]:
    """UUIDs of the devices this process can use, in CUDA ordinal order."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return []
    err, count = runtime.cudaGetDeviceCount()
    if err != runtime.cudaError_t.cudaSuccess:
        return []
    uuids = []
    for ordinal in range(count):
        err, props = runtime.cudaGetDeviceProperties(ordinal)
        if err != runtime.cudaError_t.cudaSuccess:
            return []
        uuids.append(_format_cuda_uuid(bytes(props.uuid.bytes)))
    return uuids


def discover_devices() -> list[Device]:
    """The GPUs this process may use (by CUDA ordinal), or [the CPU]."""
    by_uuid = _nvml_devices()
    if not by_uuid:
        return [cpu_device()]
    visible = _cuda_visible_uuids()
    if not visible:  # NVML sees GPUs but CUDA is unusable here: report the CPU honestly
        return [cpu_device()]
    devices = []
    for ordinal, uuid in enumerate(visible):
        base = by_uuid.get(uuid)
        if base is None:
            continue
        devices.append(
            Device(
                name=base.name,
                uuid=uuid,
                kind="gpu",
                compute_capability=base.compute_capability,
                total_memory_bytes=base.total_memory_bytes,
                cuda_ordinal=ordinal,
            )
        )
    return devices or [cpu_device()]


def host_gpus() -> list[Device]:
    """Every GPU of this host as NVML sees it (whatever CUDA_VISIBLE_DEVICES says), or []."""
    return list(_nvml_devices().values())


def nvml_used_bytes(uuid: str) -> int | None:
    """Used memory of one GPU by UUID (None where NVML is unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


class CudaHostPinner:
    """Page-locks host memory for this process's CUDA device (``cudaHostRegister``): copies
    between it and the GPU then go by DMA, with no staging through the driver's own pinned
    buffers (and no CPU copy). Used for client shared memory regions on GPU workers.

    ``device``: the CUDA ordinal whose context registers it. The calling thread may be any (a pool's):
    one that never chose a device would use, and create a context on, device 0."""

    def __init__(self, device: int = 0) -> None:
        self.device = device

    def pin(self, address: int, size: int) -> bool:
        try:
            from cuda.bindings import runtime
        except ImportError:
            return False
        try:
            runtime.cudaSetDevice(self.device)
            (err,) = runtime.cudaHostRegister(address, size, runtime.cudaHostRegisterPortable)
        except Exception as exc:  # a broken CUDA setup must not make the region unusable
            err = exc
        if err != runtime.cudaError_t.cudaSuccess:
            log.warning("could not pin %d bytes of shared memory for the GPU (%s); copies will be staged", size, err)
            return False
        return True

    def unpin(self, address: int) -> None:
        from cuda.bindings import runtime

        runtime.cudaSetDevice(self.device)
        runtime.cudaHostUnregister(address)
