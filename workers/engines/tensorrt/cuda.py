"""The cuda-python runtime calls a TensorRT engine makes, each checked at once.

A failed call becomes a FleetError naming the call: out of memory is NoCapacity (the
engine does not fit, DESIGN.md rule 3), anything else NotReady.
"""

from __future__ import annotations

from typing import Any

from workers.errors import NoCapacity, NotReady


class CudaRuntime:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or a fake) behind checked calls."""

    def __init__(self, module: Any = None) -> None:
        if module is None:
            from cuda.bindings import runtime  # lazily: only TensorRT workers need it

            module = runtime
        self.rt = module

    def _check(self, result: tuple[Any, ...], what: str) -> Any:
        error = result[0]
        if error != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(error)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            if error == self.rt.cudaError_t.cudaErrorMemoryAllocation:
                raise NoCapacity(f"CUDA {what}: out of memory ({text}); the engine does not fit on this device")
            raise NotReady(f"CUDA {what} failed: {text}")
        return result[1] if len(result) > 1 else None

    def set_device(self, device_id: int) -> None:
        self._check(self.rt.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")

    def create_stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, pointer: int) -> None:
        self._check(self.rt.cudaFree(pointer), "cudaFree")

    def malloc_host(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))

    def free_host(self, pointer: int) -> None:
        self._check(self.rt.cudaFreeHost(pointer), "cudaFreeHost")

    def to_device(self, device: int, host: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(device, host, nbytes, kind, stream), "cudaMemcpyAsync to device")

    def to_host(self, host: int, device: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host, device, nbytes, kind, stream), "cudaMemcpyAsync to host")

