"""TensorRT backend: ``build_plan`` (ONNX -> plan) and ``TensorRTEngine`` (runs a plan).

TensorRT cannot be installed on our development machines, so no plan has been built
or executed by this module against real TensorRT. What stands behind it instead:
mypy against tensorrt-stubs, the names every published binding wheel it supports
exports (tests/data/trt_names/), a fake module generated from those names, the real
``tensorrt_lean`` runtime where it imports (on a GPU it refused an undeserializable
plan with TensorRT's own message), and the CUDA side (pinned and device buffers,
streams, concurrent slots, teardown back to the baseline) run on a real GPU with the
fake (tests/gpu/test_trt_engine_gpu.py). Version differences live in trt_compat.py.

Runtime, one engine on one device (DESIGN.md rules 4 and 5):

- one Runtime and one ICudaEngine, shared;
- per concurrent slot: an execution context, a CUDA stream, and for every IO tensor
  pinned host memory plus device memory sized for the largest profile shape;
- footprint = engine device memory x slots + plan bytes (weights) + IO buffers x slots;
- teardown in the order contexts, engine, runtime, buffers, streams.
"""

from __future__ import annotations

import ctypes
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from workers.engines.base import Engine
from workers.engines.trt_compat import CapturingLogger, ParserErrorInfo, PrecisionPlan, TrtApi
from workers.errors import (
    BuildError,
    FleetError,
    IncompatibleArtifact,
    InvalidConfig,
    InvalidInput,
    NoCapacity,
    NotReady,
)
from workers.precision import CalibrationResult, convert_float16, trt_calibration_cache
from workers.targets import PRECISIONS
from workers.tensors import TensorSpec, numpy_to_datatype

if TYPE_CHECKING:  # tensorrt-stubs; TensorRT itself is imported lazily by trt_compat
    import tensorrt as trt

DEFAULT_SLOTS = 4
FALLBACK_HINT = "set `fallback: onnxruntime` in the model config to serve it with ONNX Runtime instead"


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class TrtBuildOptions:
    """How to build one plan. ``inputs`` (the model's IO spec) drives the optimization profile."""

    inputs: tuple[TensorSpec, ...]
    precision: str = "float32"
    min_batch: int = 1
    opt_batch: int | None = None  # default: max_batch, the shape a busy batcher sends
    max_batch: int = 64
    workspace_bytes: int | None = None
    timing_cache_path: str | None = None
    tactic_sources: dict[str, bool] = field(default_factory=dict, hash=False)  # e.g. {"CUBLAS_LT": False}
    hardware_compatibility: str = "none"  # "none" | "ampere_plus" | "same_compute_capability"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False  # smaller version-compatible plans; the worker supplies the lean runtime
    int8_mode: str | None = None  # "calibrator" | "qdq"; default: calibrator before TensorRT 11, qdq on 11

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidConfig(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.inputs:
            raise InvalidConfig("TrtBuildOptions needs the model's inputs (its IO spec) for the optimization profile")
        opt = self.opt_batch if self.opt_batch is not None else self.max_batch
        if not 1 <= self.min_batch <= opt <= self.max_batch:
            raise InvalidConfig(
                f"batch sizes must satisfy 1 <= min <= opt <= max, got min {self.min_batch}, "
                f"opt {opt}, max {self.max_batch}"
            )
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise InvalidConfig(f"workspace_bytes must be positive, got {self.workspace_bytes}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise InvalidConfig("exclude_lean_runtime applies to version-compatible plans only; set version_compatible too")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input: (min, opt, max) shape} for inputs with a dynamic batch dimension."""
        opt = self.opt_batch if self.opt_batch is not None else self.max_batch
        shapes = {}
        for spec in self.inputs:
            dynamic = [axis for axis, dim in enumerate(spec.shape) if dim < 0]
            if not dynamic:
                continue
            if dynamic != [0]:
                raise InvalidConfig(
                    f"input '{spec.name}' has shape {list(spec.shape)}: forward-fleet profiles only a "
                    f"dynamic batch (first) dimension; export the model with the other dimensions fixed"
                )
            rest = spec.shape[1:]
            shapes[spec.name] = ((self.min_batch, *rest), (opt, *rest), (self.max_batch, *rest))
        return shapes


@dataclass(frozen=True)
class PlanInfo:
    plan_path: Path
    plan_bytes: int
    trt_version: str
    precision_plan: PrecisionPlan
    network_flags: int
    builder_messages: tuple[str, ...] = ()


class OnnxParserFailed(BuildError):
    """TensorRT's ONNX parser refused the model; the message names every failing node.

    A BuildError like any other; its own type so that a build can fall back to ONNX
    Runtime for this failure only.
    """


def build_plan(
    onnx_path: str | Path,
    out_path: str | Path,
    options: TrtBuildOptions,
    calibration: CalibrationResult | None = None,
    api: TrtApi | None = None,
) -> PlanInfo:
    """Build a serialized plan from the float32 ONNX model ``onnx_path`` into ``out_path``.

    Prepares what the precision needs (an FP16 model, the Q/DQ model or the calibration
    cache from ``calibration``), parses, configures and builds. Must run on the GPU the
    plan is for. ``api`` defaults to the installed ``tensorrt``.
    """
    api = api or TrtApi.load()
    api.require_builder()
    plan = api.plan_precision(options.precision, options.int8_mode)
    if (plan.uses_calibrator or plan.onnx_flavour == "qdq") and calibration is None:
        raise BuildError(
            f"{options.precision} needs the calibration of this source model, and there is none; "
            f"run `fleet build ... --precision int8_calib` first"
        )
    source = Path(onnx_path)
    with tempfile.TemporaryDirectory(prefix="fleet-trt-") as tmp:
        model_path = _model_for(plan, source, Path(tmp), calibration)
        logger = api.new_logger()
        builder: trt.Builder = api.require("Builder")(logger)
        if builder is None:
            raise BuildError(f"{api.label} could not create a builder: {'; '.join(logger.errors_since(0)) or 'no message'}")
        flags = api.network_flags(plan.strongly_typed)
        network = builder.create_network(flags)
        parser: trt.OnnxParser = api.require("OnnxParser")(network, logger)
        if not parser.parse_from_file(str(model_path)):
            errors = api.parser_errors(parser, _onnx_nodes(model_path))
            raise OnnxParserFailed(_parser_failure_message(api, source.name, errors))
        config = builder.create_builder_config()
        calibrator = _configure(api, config, builder, options, plan, calibration)
        timing_cache = _load_timing_cache(config, options.timing_cache_path)
        mark = logger.mark()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError(
                f"{api.label} could not build {source.name} ({options.precision}): "
                f"{'; '.join(logger.errors_since(mark)[-5:]) or 'TensorRT logged no error'}"
            )
        del calibrator  # TensorRT held a raw pointer to it until the build ended
        plan_bytes = bytes(memoryview(serialized))
        _write_atomically(Path(out_path), plan_bytes)
        if timing_cache is not None and options.timing_cache_path:
            _write_atomically(Path(options.timing_cache_path), bytes(memoryview(config.get_timing_cache().serialize())))
        return PlanInfo(
            plan_path=Path(out_path),
            plan_bytes=len(plan_bytes),
            trt_version=api.version,
            precision_plan=plan,
            network_flags=flags,
            builder_messages=tuple(logger.messages_since(mark)[-20:]),
        )


def _model_for(plan: PrecisionPlan, source: Path, tmp: Path, calibration: CalibrationResult | None) -> Path:
    if plan.onnx_flavour == "float16":
        return convert_float16(source, tmp / "model.fp16.onnx")
    if plan.onnx_flavour == "qdq":
        assert calibration is not None
        path = tmp / "model.qdq.onnx"
        path.write_bytes(calibration.qdq_model)
        return path
    return source


def _configure(
    api: TrtApi,
    config: "trt.IBuilderConfig",
    builder: "trt.Builder",
    options: TrtBuildOptions,
    plan: PrecisionPlan,
    calibration: CalibrationResult | None,
) -> Any:
    """Apply every option to ``config``; returns the calibrator (or None) to keep alive."""
    if options.workspace_bytes:
        config.set_memory_pool_limit(api.require("MemoryPoolType.WORKSPACE"), int(options.workspace_bytes))
    api.set_builder_flags(config, plan.builder_flags)
    calibrator = None
    if plan.uses_calibrator:
        assert calibration is not None
        # The header carries this TensorRT's version: TensorRT refuses a cache from another.
        cache = trt_calibration_cache(calibration.amax, api.version).encode()
        calibrator = api.attach_calibration_cache(config, cache)
    shapes = options.profile_shapes()
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (smallest, usual, largest) in shapes.items():
            # pybind11 converts tuples to Dims; the stubs do not say so.
            profile.set_shape(name, cast("trt.Dims", smallest), cast("trt.Dims", usual), cast("trt.Dims", largest))
        config.add_optimization_profile(profile)
    if options.tactic_sources:
        config.set_tactic_sources(api.tactic_source_mask(config.get_tactic_sources(), options.tactic_sources))
    api.set_hardware_compatibility(config, options.hardware_compatibility)
    if options.version_compatible:
        api.set_builder_flags(config, ["VERSION_COMPATIBLE"])
        if options.exclude_lean_runtime:
            api.set_builder_flags(config, ["EXCLUDE_LEAN_RUNTIME"])
    return calibrator


def _load_timing_cache(config: "trt.IBuilderConfig", path: str | None) -> Any:
    """Start from the timing cache at ``path`` (or an empty one); None when no path is set."""
    if not path:
        return None
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        # A cache from another device or TensorRT is refused; build with a fresh one.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _onnx_nodes(model_path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of each graph node by index, to name the nodes 8.6's parser errors point at."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # the parser already failed; naming nodes is best effort
        return []
    return [(node.name, node.op_type) for node in model.graph.node]


def _parser_failure_message(api: TrtApi, model_name: str, errors: list[ParserErrorInfo]) -> str:
    count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}" if errors else "no error reported"
    lines = [f"{api.label} cannot parse {model_name} ({count}):"]
    lines += [f"  - {error.describe()}" for error in errors]
    lines.append(FALLBACK_HINT)
    return "\n".join(lines)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- CUDA


class CudaRuntime:
    """The cuda-python runtime calls the engine makes, each checked at once."""

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


# --------------------------------------------------------------------------- runtime


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
    ) -> None:
        """``api`` and ``cuda_module`` (cuda-python's runtime module) default to the installed ones."""
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
        """Contexts, engine, runtime, then buffers and streams (DESIGN.md rule 5).

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
