"""A fake of ``cuda.bindings.runtime`` as TensorRTEngine uses it.

Device memory is host memory; every allocation is tracked (``device``, ``host``,
``device_bytes``), and teardown events are logged in order.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any


class FakeCuda:
    """``cuda.bindings.runtime`` as the engine uses it; device memory is host memory."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class Stream:
        def __init__(self, handle: int) -> None:
            self.handle = handle

        def __int__(self) -> int:
            return self.handle

    def __init__(self, events: list[str] | None = None, device_limit: int | None = None) -> None:
        self.events = events if events is not None else []
        self.device_limit = device_limit
        self.device: dict[int, Any] = {}
        self.host: dict[int, Any] = {}
        self.streams: set[int] = set()
        self._next_stream = 100

    @property
    def device_bytes(self) -> int:
        return sum(ctypes.sizeof(b) for b in self.device.values())

    def cudaGetErrorString(self, error: int) -> tuple[Any, bytes]:
        return self.cudaError_t.cudaSuccess, f"fake error {int(error)}".encode()

    def cudaSetDevice(self, device: int) -> tuple[Any]:
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple[Any, Any]:
        self._next_stream += 1
        self.streams.add(self._next_stream)
        return self.cudaError_t.cudaSuccess, self.Stream(self._next_stream)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any]:
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Any]:
        self.streams.remove(int(stream))
        self.events.append("destroy stream")
        return (self.cudaError_t.cudaSuccess,)

    def _alloc(self, table: dict[int, Any], nbytes: int) -> int:
        buffer = (ctypes.c_ubyte * nbytes)()
        address = ctypes.addressof(buffer)
        table[address] = buffer
        return address

    def cudaMalloc(self, nbytes: int) -> tuple[Any, int | None]:
        if self.device_limit is not None and self.device_bytes + nbytes > self.device_limit:
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        return self.cudaError_t.cudaSuccess, self._alloc(self.device, nbytes)

    def cudaMallocHost(self, nbytes: int) -> tuple[Any, int]:
        return self.cudaError_t.cudaSuccess, self._alloc(self.host, nbytes)

    def cudaFree(self, pointer: int) -> tuple[Any]:
        del self.device[pointer]
        self.events.append("free device")
        return (self.cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, pointer: int) -> tuple[Any]:
        del self.host[pointer]
        self.events.append("free host")
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple[Any]:
        ctypes.memmove(dst, src, count)
        return (self.cudaError_t.cudaSuccess,)
