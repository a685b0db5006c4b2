"""A fake ``tensorrt`` module generated from the names a real binding wheel exports.

``FakeTensorRT("10.16.1.11")`` builds a module whose every class, method, property
and enum member is one listed in tests/data/trt_names/10.16.1.11.txt; anything else
raises AttributeError, exactly as the real module of that version would. Every name
the code touches is recorded (``fake.touched``), so a test can check the code's
declarations against what it really did.

Behind the names sits a small simulation of TensorRT, just enough to drive the
backend's paths without a GPU:

- the ONNX parser reads the model with ``onnx``; nodes outside the default domain
  (scikit-learn's ``ai.onnx.ml`` operators) fail as TensorRT's parser fails on them,
  through ``ParserError`` objects with that version's methods only;
- ``build_serialized_network`` returns a JSON "plan" recording how the builder was
  configured (flags, profile, tactic sources, calibrator cache ...);
- the runtime deserializes that JSON; ``execute_async_v3`` reads the inputs from
  (fake) device memory, runs the ONNX model with ONNX Runtime and writes the outputs
  back, so the engine's buffers, copies and shapes are checked end to end.

``FakeCuda`` is the matching fake of ``cuda.bindings.runtime``: device memory is host
memory, every allocation is tracked, and teardown events are logged in order.
"""

from __future__ import annotations

import base64
import ctypes
import enum
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

NAMES_DIR = Path(__file__).resolve().parent.parent / "data" / "trt_names"
VERSION_LABELS = ("8.6.1", "10.16.1.11", "11.4.0.106")
LEAN_LABELS = ("lean-8.6.1", "lean-10.16.1.11", "lean-11.4.0.106")

# TensorRT's own values where the code depends on them (severity comparisons).
_KNOWN_VALUES = {
    "ILogger.Severity": {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4},
}
_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
}
_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                 "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def load_names(label: str) -> frozenset[str]:
    """The names of one data file (comment lines skipped)."""
    lines = (NAMES_DIR / f"{label}.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def version_of(label: str) -> str:
    first = (NAMES_DIR / f"{label}.txt").read_text().splitlines()[0]
    return first.rsplit(" ", 1)[-1]


class EnumValue(int):
    """A pybind11 enum member: an int with a name."""

    def __new__(cls, owner: str, name: str, value: int) -> "EnumValue":
        member = super().__new__(cls, value)
        member.name = name  # type: ignore[attr-defined]
        member.owner = owner  # type: ignore[attr-defined]
        return member

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}: {int(self)}>"  # type: ignore[attr-defined]

    __str__ = __repr__


class _FakeMeta(type):
    """Class-level attributes (enum members, nested classes) come from the name list."""

    _trt_name: str
    _trt_fake: "FakeTensorRT"

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return cls._trt_fake._class_attribute(cls._trt_name, attr)

    def __dir__(cls) -> list[str]:
        prefix = cls._trt_name + "."
        return sorted({n[len(prefix):].split(".")[0] for n in cls._trt_fake.names if n.startswith(prefix)})


class FakeObject(metaclass=_FakeMeta):
    """An instance of a fake TensorRT class: listed attributes only."""

    _trt_name = "object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fake = type(self)._trt_fake
        object.__setattr__(self, "_state", {})
        hook = fake.constructors.get(type(self)._trt_name)
        if hook is not None:
            hook(fake, self, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return type(self)._trt_fake._instance_attribute(self, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        """Properties TensorRT lets you set (int8_calibrator, ...) land in ``_state``."""
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
            return
        owner = _listed_owner(type(self), attr)
        if owner is None:
            raise AttributeError(f"'{type(self)._trt_name}' object has no attribute '{attr}'")
        type(self)._trt_fake.touch(f"{owner}.{attr}")
        self._state[attr] = value

    def __del__(self) -> None:
        fake = getattr(type(self), "_trt_fake", None)
        if fake is not None:
            fake.events.append(f"destroy {type(self)._trt_name}")


def _listed_owner(cls: type, attr: str) -> str | None:
    """The TensorRT class (this one or a fake base) whose list has ``attr``."""
    for klass in cls.__mro__:
        name = klass.__dict__.get("_trt_name")
        fake = getattr(klass, "_trt_fake", None)
        if name and fake is not None and f"{name}.{attr}" in fake.names:
            return str(name)
    return None


class FakeTensorRT(types.ModuleType):
    """One fake TensorRT module for one data file (a version, full or lean)."""

    def __init__(self, label: str, world: "FakeWorld | None" = None) -> None:
        lean = label.startswith("lean-")
        super().__init__("tensorrt_lean" if lean else "tensorrt")
        self.label = label
        self.names = load_names(label)
        self.touched: set[str] = set()
        self.events: list[str] = []
        self.world = world or FakeWorld()
        self.__version__ = version_of(label)
        self._classes: dict[str, type] = {}
        self.constructors: dict[str, Callable[..., None]] = dict(_CONSTRUCTORS)
        self.behaviours: dict[str, Any] = dict(_BEHAVIOURS)

    # --------------------------------------------------------------- name lookups

    def touch(self, name: str) -> None:
        self.touched.add(name)

    def __getattr__(self, attr: str) -> Any:  # module-level names
        if attr.startswith("_") and attr != "__version__":
            raise AttributeError(attr)
        if attr not in self.names:
            raise AttributeError(f"module '{self.__name__}' ({self.label}) has no attribute '{attr}'")
        self.touch(attr)
        if self._is_class(attr):
            return self._class(attr)
        behaviour = self.behaviours.get(attr)
        if behaviour is None:
            raise AttributeError(f"the fake has no behaviour for module function {attr}")
        return lambda *args, **kwargs: behaviour(self, *args, **kwargs)

    def __dir__(self) -> list[str]:
        return sorted({n.split(".")[0] for n in self.names})

    def _is_class(self, dotted: str) -> bool:
        return any(n.startswith(dotted + ".") for n in self.names) or dotted[:1].isupper()

    def _class(self, dotted: str) -> type:
        if dotted not in self._classes:
            self._classes[dotted] = _FakeMeta(dotted.rsplit(".", 1)[-1], (FakeObject,), {"_trt_name": dotted, "_trt_fake": self})
        return self._classes[dotted]

    def _class_attribute(self, owner: str, attr: str, record: bool = True) -> Any:
        full = f"{owner}.{attr}"
        if full not in self.names:
            raise AttributeError(f"type object '{owner}' ({self.label}) has no attribute '{attr}'")
        if record:
            self.touch(full)
        if any(n.startswith(full + ".") for n in self.names):
            return self._class(full)
        if attr.isupper() or attr[:1].isupper():
            return self._enum_member(owner, attr)
        return lambda *args, **kwargs: self.behaviours[full](self, *args, **kwargs)

    def _enum_member(self, owner: str, attr: str) -> EnumValue:
        known = _KNOWN_VALUES.get(owner, {})
        if attr in known:
            return EnumValue(owner, attr, known[attr])
        members = sorted(n.rsplit(".", 1)[-1] for n in self.names if n.startswith(owner + ".") and n.count(".") == owner.count(".") + 1 and n.rsplit(".", 1)[-1].isupper())
        return EnumValue(owner, attr, members.index(attr))

    def _instance_attribute(self, instance: FakeObject, attr: str) -> Any:
        owner = _listed_owner(type(instance), attr)
        if owner is None:
            raise AttributeError(f"'{type(instance)._trt_name}' object ({self.label}) has no attribute '{attr}'")
        full = f"{owner}.{attr}"
        self.touch(full)
        behaviour = self.behaviours.get(full)
        if behaviour is None:
            if attr in instance._state:
                return instance._state[attr]  # a property set earlier
            raise AttributeError(f"the fake has no behaviour for {full}")
        if isinstance(behaviour, Property):
            return behaviour.get(self, instance)
        return lambda *args, **kwargs: behaviour(self, instance, *args, **kwargs)

    # --------------------------------------------------------------- helpers for behaviours

    def new(self, dotted: str, **state: Any) -> FakeObject:
        obj = self._class(dotted).__new__(self._class(dotted))
        object.__setattr__(obj, "_state", dict(state))
        return obj

    def member(self, dotted: str) -> EnumValue:
        """An enum member the simulation hands out (not a name the code touched)."""
        owner, _, attr = dotted.rpartition(".")
        value = self._class_attribute(owner, attr, record=False)
        assert isinstance(value, EnumValue)
        return value

    def log(self, logger: Any, severity: str, message: str) -> None:
        logger.log(self._enum_member("ILogger.Severity", severity), message)


class Property:
    def __init__(self, get: Callable[[FakeTensorRT, FakeObject], Any]) -> None:
        self.get = get


# --------------------------------------------------------------------------- the simulated world


class FakeWorld:
    """Knobs a test turns: what the parser says, whether TensorRT refuses things."""

    def __init__(self) -> None:
        self.unsupported_domains = {"ai.onnx.ml"}
        self.runtime_error: str | None = None  # logged while Runtime() is created (no CUDA device ...)
        self.deserialize_error: str | None = None
        self.build_error: str | None = None
        self.device_memory_size = 1 << 20
        self.default_tactic_mask = 0b11111


def _io_of(model_path: str) -> list[dict[str, Any]]:
    model = onnx.load(model_path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    io = []
    for mode, values in (("INPUT", model.graph.input), ("OUTPUT", model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            io.append({"name": value.name, "mode": mode, "dtype": _ONNX_TO_TRT[value.type.tensor_type.elem_type], "shape": dims})
    return io


def _parse(fake: FakeTensorRT, parser: FakeObject, path: str) -> bool:
    model = onnx.load(path, load_external_data=False)
    errors = []
    for index, node in enumerate(model.graph.node):
        if node.domain in fake.world.unsupported_domains:
            errors.append({"node": index, "name": node.name, "op": node.op_type, "code": "UNSUPPORTED_NODE",
                           "desc": f"No importer registered for op: {node.op_type}"})
    parser._state["errors"] = errors
    network = parser._state["network"]
    network._state["io"] = _io_of(path)
    network._state["onnx"] = path
    return not errors


def _get_error(fake: FakeTensorRT, parser: FakeObject, index: int) -> FakeObject:
    return fake.new("ParserError", **parser._state["errors"][index])


def _build(fake: FakeTensorRT, builder: FakeObject, network: FakeObject, config: FakeObject) -> bytes | None:
    if fake.world.build_error:
        fake.log(builder._state["logger"], "ERROR", fake.world.build_error)
        return None
    calibrator = config._state.get("int8_calibrator")
    cache = None
    if calibrator is not None:
        assert calibrator.get_batch_size() >= 1
        assert calibrator.get_batch(["input"]) is None
        cache = bytes(calibrator.read_calibration_cache()).decode()
    profile = config._state.get("profiles", [{}])
    io = []
    for tensor in network._state["io"]:
        entry = dict(tensor)
        if tensor["name"] in profile[0]:
            entry["profile"] = profile[0][tensor["name"]]
        io.append(entry)
    plan = {
        "trt": fake.__version__,
        "network_flags": network._state["flags"],
        "builder_flags": sorted(config._state.get("flags", [])),
        "workspace": config._state.get("workspace"),
        "tactic_mask": config._state.get("tactic_mask"),
        "hardware_compatibility_level": getattr(config._state.get("hardware_compatibility_level"), "name", None),
        "calibration_cache": cache,
        "timing_cache": config._state.get("timing_cache_data"),
        "io": io,
        "onnx": base64.b64encode(Path(network._state["onnx"]).read_bytes()).decode(),  # the "weights"
    }
    return json.dumps(plan).encode()


def _set_flag(fake: FakeTensorRT, config: FakeObject, flag: EnumValue) -> None:
    config._state.setdefault("flags", []).append(flag.name)  # type: ignore[attr-defined]


def _set_profile_shape(fake: FakeTensorRT, profile: FakeObject, name: str, smallest: Any, usual: Any, largest: Any) -> None:
    profile._state.setdefault("shapes", {})[name] = [list(smallest), list(usual), list(largest)]


def _add_profile(fake: FakeTensorRT, config: FakeObject, profile: FakeObject) -> int:
    config._state.setdefault("profiles", []).append(profile._state.get("shapes", {}))
    return len(config._state["profiles"]) - 1


def _set(key: str) -> Callable[..., Any]:
    def setter(fake: FakeTensorRT, obj: FakeObject, *values: Any) -> bool:
        obj._state[key] = values[0] if len(values) == 1 else values
        return True

    return setter


def _runtime_init(fake: FakeTensorRT, runtime: FakeObject, logger: Any) -> None:
    runtime._state["logger"] = logger
    if fake.world.runtime_error:
        fake.log(logger, "ERROR", fake.world.runtime_error)


def _deserialize(fake: FakeTensorRT, runtime: FakeObject, data: bytes) -> FakeObject | None:
    try:
        plan = json.loads(bytes(data))
    except ValueError:
        plan = None
    if fake.world.deserialize_error or plan is None or plan.get("trt") != fake.__version__:
        fake.log(runtime._state["logger"], "ERROR", fake.world.deserialize_error or "Serialization assertion failed: plan is not from this TensorRT")
        return None
    return fake.new("ICudaEngine", plan=plan, logger=runtime._state["logger"])


def _io(engine: FakeObject, name: str) -> dict[str, Any]:
    return next(t for t in engine._state["plan"]["io"] if t["name"] == name)


def _create_context(fake: FakeTensorRT, engine: FakeObject) -> FakeObject:
    fake.events.append("create IExecutionContext")
    return fake.new("IExecutionContext", engine=engine, shapes={}, addresses={})


def _context_shape(fake: FakeTensorRT, context: FakeObject, name: str) -> list[int]:
    engine = context._state["engine"]
    tensor = _io(engine, name)
    if tensor["mode"] == "INPUT":
        return list(context._state["shapes"].get(name, tensor["shape"]))
    batch = next(iter(context._state["shapes"].values()), [1])[0]
    return [batch if d < 0 else d for d in tensor["shape"]]


def _set_input_shape(fake: FakeTensorRT, context: FakeObject, name: str, shape: Any) -> bool:
    tensor = _io(context._state["engine"], name)
    largest = tensor.get("profile", [None, None, tensor["shape"]])[2]
    if len(shape) != len(largest) or any(s > m for s, m in zip(shape, largest)):
        return False
    context._state["shapes"][name] = list(shape)
    return True


def _execute(fake: FakeTensorRT, context: FakeObject, stream: int) -> bool:
    """Run the ONNX model with ONNX Runtime on the tensors at the context's device addresses."""
    import onnxruntime as ort

    engine = context._state["engine"]
    plan = engine._state["plan"]
    feeds = {}
    for tensor in plan["io"]:
        if tensor["mode"] == "INPUT":
            shape = context._state["shapes"][tensor["name"]]
            dtype = np.dtype(_TRT_TO_NUMPY[tensor["dtype"]])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = ctypes.string_at(context._state["addresses"][tensor["name"]], nbytes)
            feeds[tensor["name"]] = np.frombuffer(raw, dtype).reshape(shape)
    session = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for tensor in plan["io"]:
        if tensor["mode"] == "OUTPUT":
            data = np.ascontiguousarray(outputs[tensor["name"]], _TRT_TO_NUMPY[tensor["dtype"]]).tobytes()
            ctypes.memmove(context._state["addresses"][tensor["name"]], data, len(data))
    fake.events.append(f"execute on stream {stream}")
    return True


def _nptype(fake: FakeTensorRT, dtype: EnumValue) -> type:
    return _TRT_TO_NUMPY[dtype.name]  # type: ignore[attr-defined,no-any-return]


def _logger_init(fake: FakeTensorRT, logger: FakeObject) -> None:
    return None


_CONSTRUCTORS: dict[str, Callable[..., None]] = {
    "Builder": lambda fake, b, logger: b._state.update(logger=logger),
    "OnnxParser": lambda fake, p, network, logger: p._state.update(network=network, logger=logger),
    "Runtime": _runtime_init,
    "ILogger": _logger_init,
}

_BEHAVIOURS: dict[str, Any] = {
    "nptype": _nptype,
    # build
    "Builder.create_network": lambda fake, b, flags=0: fake.new("INetworkDefinition", flags=flags),
    "Builder.create_builder_config": lambda fake, b: fake.new("IBuilderConfig", tactic_mask=fake.world.default_tactic_mask),
    "Builder.create_optimization_profile": lambda fake, b: fake.new("IOptimizationProfile"),
    "Builder.build_serialized_network": _build,
    "OnnxParser.parse_from_file": _parse,
    "OnnxParser.num_errors": Property(lambda fake, p: len(p._state.get("errors", []))),
    "OnnxParser.get_error": _get_error,
    "ParserError.node": lambda fake, e: e._state["node"],
    "ParserError.node_name": lambda fake, e: e._state["name"],
    "ParserError.node_operator": lambda fake, e: e._state["op"],
    "ParserError.code": lambda fake, e: fake.member(f"ErrorCode.{e._state['code']}"),
    "ParserError.desc": lambda fake, e: e._state["desc"],
    "IBuilderConfig.set_flag": _set_flag,
    "IBuilderConfig.set_memory_pool_limit": lambda fake, c, pool, size: c._state.update(workspace=[pool.name, size]),
    "IBuilderConfig.add_optimization_profile": _add_profile,
    "IOptimizationProfile.set_shape": _set_profile_shape,
    "IBuilderConfig.create_timing_cache": lambda fake, c, data: fake.new("ITimingCache", data=bytes(data)),
    "IBuilderConfig.set_timing_cache": lambda fake, c, cache, ignore_mismatch: c._state.update(
        timing_cache=cache, timing_cache_data=cache._state["data"].decode()) or True,
    "IBuilderConfig.get_timing_cache": lambda fake, c: c._state["timing_cache"],
    "ITimingCache.serialize": lambda fake, t: t._state["data"] + b"+tuned",
    "IBuilderConfig.get_tactic_sources": lambda fake, c: c._state["tactic_mask"],
    "IBuilderConfig.set_tactic_sources": _set("tactic_mask"),
    # runtime
    "Runtime.deserialize_cuda_engine": _deserialize,
    "ICudaEngine.num_io_tensors": Property(lambda fake, e: len(e._state["plan"]["io"])),
    "ICudaEngine.get_tensor_name": lambda fake, e, i: e._state["plan"]["io"][i]["name"],
    "ICudaEngine.get_tensor_mode": lambda fake, e, n: fake.member(f"TensorIOMode.{_io(e, n)['mode']}"),
    "ICudaEngine.get_tensor_dtype": lambda fake, e, n: fake.member(f"DataType.{_io(e, n)['dtype']}"),
    "ICudaEngine.get_tensor_shape": lambda fake, e, n: list(_io(e, n)["shape"]),
    "ICudaEngine.get_tensor_profile_shape": lambda fake, e, n, i: _io(e, n)["profile"],
    "ICudaEngine.create_execution_context": _create_context,
    "ICudaEngine.device_memory_size": Property(lambda fake, e: fake.world.device_memory_size),
    "ICudaEngine.device_memory_size_v2": Property(lambda fake, e: fake.world.device_memory_size),
    "IExecutionContext.set_input_shape": _set_input_shape,
    "IExecutionContext.get_tensor_shape": _context_shape,
    "IExecutionContext.set_tensor_address": lambda fake, c, n, p: c._state["addresses"].update({n: p}) or True,
    "IExecutionContext.execute_async_v3": _execute,
}


# --------------------------------------------------------------------------- fake cuda-python runtime


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
