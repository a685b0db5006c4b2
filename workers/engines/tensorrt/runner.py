"""Run side of the TensorRT backend: ``TensorRTEngine``, one plan on one device.

DESIGN.md rules 4 and 5:

- one Runtime and one ICudaEngine, shared;
- per concurrent slot: an execution context, a CUDA stream, and for every IO tensor
  pinned host memory plus device memory sized for the largest profile shape;
- footprint = engine device memory x slots + plan bytes (weights) + IO buffers x slots;
- teardown in the order contexts, engine, runtime, buffers, streams.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.engines.base import Engine
from workers.engines.tensorrt.compat import CapturingLogger, TrtApi
from workers.engines.tensorrt.cuda import CudaRuntime
from workers.engines.tensorrt.plugins import load_plugin_libraries, release_plugin_libraries
from workers.errors import FleetError, IncompatibleArtifact, InvalidConfig, InvalidInput, NoCapacity, NotReady
from workers.tensors import TensorSpec, numpy_to_datatype

if TYPE_CHECKING:  # tensorrt-stubs; TensorRT itself is imported lazily by compat
    import tensorrt as trt

DEFAULT_SLOTS = 4


@dataclass
class _Buffer:
    nbytes: int
    host_ptr: int
    device_ptr: int
    host: np.ndarray  # uint8 view of the pinned host memory


@dataclass
class _Slot:
    index: int
    context: Any  # trt.IExecutionContext
    stream: Any
    buffers: dict[str, _Buffer] = field(default_factory=dict)


@dataclass(frozen=True)
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    spec: TensorSpec


def plan_footprint(device_memory_bytes: int, slots: int, plan_bytes: int, io_bytes_per_slot: int) -> int:
    """Bytes one loaded plan holds on its device: activations and IO per slot, weights once."""
    return int(device_memory_bytes) * slots + int(plan_bytes) + int(io_bytes_per_slot) * slots


class TensorRTEngine(Engine):
    """A TensorRT plan on one GPU, with ``slots`` execution contexts for concurrent requests."""

    backend = "tensorrt"

    def __init__(
        self,
        plan_path: str | Path,
        device_id: int = 0,
        slots: int = DEFAULT_SLOTS,
        version_compatible: bool = False,
        lean: bool = False,
        footprint_bytes: int | None = None,
        api: TrtApi | None = None,
        cuda_module: Any = None,
        plugin_libraries: tuple[str, ...] = (),
    ) -> None:
        """``api`` and ``cuda_module`` (cuda-python's runtime module) default to the installed ones;
        ``plugin_libraries``: paths of the custom-layer plugin libraries the plan needs (trusted by the caller)."""
        super().__init__()
        if slots < 1:
            raise InvalidConfig(f"slots must be at least 1, got {slots}")
        self.plan_path = Path(plan_path)
        self.device_id = device_id
        self.slot_count = slots
        self.version_compatible = version_compatible
        self.lean = lean
        self._declared_footprint = footprint_bytes
        self._measured_footprint: int | None = None
        self._api = api
        self._cuda_module = cuda_module
        self.plugin_libraries = tuple(str(p) for p in plugin_libraries)
        self._plugins: tuple[str, ...] = ()  # loaded, released after the runtime
        self._cuda: CudaRuntime | None = None
        self._logger: CapturingLogger | None = None
        self._runtime: Any = None  # trt.Runtime
        self._engine: trt.ICudaEngine | None = None
        self._tensors: tuple[_Tensor, ...] = ()
        self._slots: list[_Slot] = []
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Engine interface

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec for t in self._tensors if t.is_input)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec for t in self._tensors if not t.is_input)

    @property
    def footprint_bytes(self) -> int:
        if self._measured_footprint is not None:
            return self._measured_footprint
        if self._declared_footprint is not None:
            return self._declared_footprint
        # Before loading: the plan's weights plus as much again for activations, per slot.
        size = self.plan_path.stat().st_size if self.plan_path.is_file() else 0
        return size * (1 + self.slot_count)

    def _activate(self) -> None:
        try:
            self._load()
        except BaseException:
            self._teardown(report=False)
            raise

    def _deactivate(self) -> None:
        self._teardown()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = self._free.get()  # blocks while every context is busy
        try:
            return self._run(slot, feeds)
        finally:
            self._free.put(slot)

    # ------------------------------------------------------------------ load

    def _load(self) -> None:
        api = self._api = self._api or TrtApi.load(lean=self.lean)
        cuda = self._cuda = CudaRuntime(self._cuda_module)
        cuda.set_device(self.device_id)
        logger = self._logger = api.new_logger()
        self._plugins = load_plugin_libraries(api, self.plugin_libraries, logger)  # before deserializing
        self._runtime = api.create_runtime(logger)
        if self.version_compatible and not api.lean:
            api.allow_engine_host_code(self._runtime)
        plan = self.plan_path.read_bytes()
        mark = logger.mark()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            said = "; ".join(logger.errors_since(mark)[-5:]) or "TensorRT logged no error"
            raise IncompatibleArtifact(f"could not deserialize engine {self.plan_path.name} with {api.label}: {said}")
        self._engine = engine
        self._tensors = self._describe_io(api, engine)
        for index in range(self.slot_count):
            self._free.put(self._new_slot(index, engine, logger))
        io_per_slot = sum(t.dtype.itemsize * int(np.prod(t.max_shape)) for t in self._tensors)
        self._measured_footprint = plan_footprint(api.device_memory_size(engine), self.slot_count, len(plan), io_per_slot)

    def _describe_io(self, api: TrtApi, engine: "trt.ICudaEngine") -> tuple[_Tensor, ...]:
        input_mode = api.require("TensorIOMode.INPUT")
        nptype = api.require("nptype")
        found: list[tuple[str, bool, np.dtype, tuple[int, ...]]] = []
        for index in range(int(engine.num_io_tensors)):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == input_mode
            trt_dtype = engine.get_tensor_dtype(name)
            try:
                dtype = np.dtype(nptype(trt_dtype))
            except TypeError:
                raise InvalidConfig(f"tensor '{name}' has TensorRT type {trt_dtype}, which has no numpy type") from None
            found.append((name, is_input, dtype, _dims(engine.get_tensor_shape(name))))
        tensors = []
        for name, is_input, dtype, shape in found:
            if is_input and any(d < 0 for d in shape):
                largest = _dims(engine.get_tensor_profile_shape(name, 0)[2])
            else:
                largest = shape  # outputs: resolved per slot once the inputs are at their largest
            spec = TensorSpec(name, numpy_to_datatype(dtype), shape)
            tensors.append(_Tensor(name, is_input, dtype, largest, spec))
        return tuple(tensors)

    def _new_slot(self, index: int, engine: "trt.ICudaEngine", logger: CapturingLogger) -> _Slot:
        assert self._cuda is not None
        mark = logger.mark()
        context = engine.create_execution_context()
        if context is None:
            said = "; ".join(logger.errors_since(mark)[-3:]) or "no message"
            raise NoCapacity(f"TensorRT could not create execution context {index + 1} of {self.slot_count}: {said}")
        slot = _Slot(index, context, self._cuda.create_stream())
        self._slots.append(slot)  # before its buffers: teardown frees a half-built slot too
        for tensor in self._tensors:
            if tensor.is_input:
                if not context.set_input_shape(tensor.name, tensor.max_shape):
                    raise InvalidConfig(f"input '{tensor.name}': the profile's largest shape {list(tensor.max_shape)} is refused")
        resolved = []
        for tensor in self._tensors:
            shape = tensor.max_shape if tensor.is_input else _dims(context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise InvalidConfig(f"output '{tensor.name}' has a data-dependent shape {list(shape)}, which this backend cannot size")
            resolved.append(_Tensor(tensor.name, tensor.is_input, tensor.dtype, shape, tensor.spec))
            nbytes = max(1, tensor.dtype.itemsize * int(np.prod(shape)))
            slot.buffers[tensor.name] = self._allocate(nbytes)
            if not context.set_tensor_address(tensor.name, slot.buffers[tensor.name].device_ptr):
                raise InvalidConfig(f"TensorRT refused the device address for tensor '{tensor.name}'")
        self._tensors = tuple(resolved)
        return slot

    def _allocate(self, nbytes: int) -> _Buffer:
        assert self._cuda is not None
        host_ptr = self._cuda.malloc_host(nbytes)
        try:
            device_ptr = self._cuda.malloc(nbytes)
        except BaseException:
            self._cuda.free_host(host_ptr)
            raise
        host = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(host_ptr))
        return _Buffer(nbytes, host_ptr, device_ptr, host)

    # ------------------------------------------------------------------ run

    def _run(self, slot: _Slot, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._cuda is not None and self._logger is not None and self._api is not None
        cuda, context = self._cuda, slot.context
        for tensor in self._tensors:
            if not tensor.is_input:
                continue
            array = np.ascontiguousarray(feeds[tensor.name], dtype=tensor.dtype)
            buffer = slot.buffers[tensor.name]
            if array.nbytes > buffer.nbytes:
                raise InvalidInput(
                    f"input '{tensor.name}': shape {list(array.shape)} is larger than the engine's "
                    f"largest profile shape {list(tensor.max_shape)}"
                )
            if not context.set_input_shape(tensor.name, tuple(array.shape)):
                raise InvalidInput(f"input '{tensor.name}': shape {list(array.shape)} is outside the engine's profile")
            buffer.host[: array.nbytes] = array.reshape(-1).view(np.uint8)
            cuda.to_device(buffer.device_ptr, buffer.host_ptr, array.nbytes, slot.stream)
        mark = self._logger.mark()
        if not context.execute_async_v3(int(slot.stream)):
            said = "; ".join(self._logger.errors_since(mark)[-3:]) or "no message"
            raise FleetError(f"TensorRT execution of {self.plan_path.name} failed: {said}")
        shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self._tensors:
            if tensor.is_input:
                continue
            shape = shapes[tensor.name] = _dims(context.get_tensor_shape(tensor.name))
            nbytes = tensor.dtype.itemsize * int(np.prod(shape))
            buffer = slot.buffers[tensor.name]
            cuda.to_host(buffer.host_ptr, buffer.device_ptr, nbytes, slot.stream)
        cuda.synchronize(slot.stream)
        results = {}
        for tensor in self._tensors:
            if not tensor.is_input:
                shape = shapes[tensor.name]
                nbytes = tensor.dtype.itemsize * int(np.prod(shape))
                host = slot.buffers[tensor.name].host[:nbytes]
                results[tensor.name] = host.view(tensor.dtype).reshape(shape).copy()  # the slot's memory is reused
        return results

    # ------------------------------------------------------------------ teardown

    def _teardown(self, report: bool = True) -> None:
        """Contexts, engine, runtime, plugin libraries, then buffers and streams (DESIGN.md rule 5).

        Every step runs even when an earlier one failed, so that all memory is freed;
        the failures are reported together at the end (unless ``report`` is False, as
        when a failed load is being cleaned up and its own error matters more).
        """
        slots, self._slots = self._slots, []
        self._free = queue.Queue()
        cuda = self._cuda
        problems: list[str] = []
        if cuda is not None:
            for slot in slots:
                _attempt(problems, cuda.synchronize, slot.stream)  # nothing may still run
        for slot in slots:
            slot.context = None  # the last reference: TensorRT destroys the context here
        self._engine = None
        self._runtime = None
        plugins, self._plugins = self._plugins, ()
        if plugins and self._api is not None:
            release_plugin_libraries(self._api, plugins)  # no engine or runtime of them is left
        if cuda is not None:
            for slot in slots:
                for buffer in slot.buffers.values():
                    _attempt(problems, cuda.free, buffer.device_ptr)
                    _attempt(problems, cuda.free_host, buffer.host_ptr)
                slot.buffers.clear()
            for slot in slots:
                _attempt(problems, cuda.destroy_stream, slot.stream)
        self._measured_footprint = None
        if problems and report:
            raise NotReady(f"tearing down {self.plan_path.name} left problems: {'; '.join(problems)}")


def _attempt(problems: list[str], step: Callable[[Any], None], argument: Any) -> None:
    """Run one teardown step; on failure note it and go on, so that everything else is freed."""
    try:
        step(argument)
    except FleetError as exc:
        problems.append(exc.message)


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT Dims (or list) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))
