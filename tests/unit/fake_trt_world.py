"""The simulation behind the fake TensorRT: just enough of TensorRT to drive the backend.

- the ONNX parser reads the model with ``onnx``; nodes outside the default domain
  (scikit-learn's ``ai.onnx.ml`` operators) fail as TensorRT's parser fails on them;
- ``build_serialized_network`` returns a JSON "plan" recording how the builder was
  configured (flags, profile, tactic sources, calibrator cache ...);
- the runtime deserializes that JSON (refusing, as full TensorRT does, a
  version-compatible plan unless ``engine_host_code_allowed`` was set to True first);
  ``execute_async_v3`` reads the inputs from (fake) device memory, runs the ONNX
  model with ONNX Runtime and writes the outputs back.

Each behaviour is called as ``behaviour(fake, instance, *arguments)`` once the fake
has checked the arguments against the real signature (fake_signatures.py).
"""

from __future__ import annotations

import base64
import ctypes
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

if TYPE_CHECKING:
    from tests.unit.fake_tensorrt import EnumValue, FakeObject, FakeTensorRT

ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
}
TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


class FakeWorld:
    """Knobs a test turns: what the parser says, whether TensorRT refuses things."""

    def __init__(self) -> None:
        self.unsupported_domains = {"ai.onnx.ml"}
        self.runtime_error: str | None = None  # logged while Runtime() is created (no CUDA device ...)
        self.deserialize_error: str | None = None
        self.build_error: str | None = None
        self.device_memory_size = 1 << 20
        self.default_tactic_mask = 0b11111
        self.registry: Any = None  # the process's plugin registry (get_plugin_registry), made on first use
        self.refused_plugins: set[str] = set()  # plugin library paths load_library fails on


def _io_of(model_path: str) -> list[dict[str, Any]]:
    model = onnx.load(model_path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    io = []
    for mode, values in (("INPUT", model.graph.input), ("OUTPUT", model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            io.append({"name": value.name, "mode": mode, "dtype": ONNX_TO_TRT[value.type.tensor_type.elem_type], "shape": dims})
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
    # A version-compatible plan embeds the lean runtime: host code that full TensorRT runs
    # only when allowed (the lean runtime deserializes such plans without it).
    if "VERSION_COMPATIBLE" in plan["builder_flags"] and not fake.lean and runtime._state.get("engine_host_code_allowed") is not True:
        fake.log(runtime._state["logger"], "ERROR", "Error Code 1: Serialization (the plan is version compatible and "
                 "embeds host code; set Runtime.engine_host_code_allowed = True to deserialize it) [fake's wording]")
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
            dtype = np.dtype(TRT_TO_NUMPY[tensor["dtype"]])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = ctypes.string_at(context._state["addresses"][tensor["name"]], nbytes)
            feeds[tensor["name"]] = np.frombuffer(raw, dtype).reshape(shape)
    session = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for tensor in plan["io"]:
        if tensor["mode"] == "OUTPUT":
            data = np.ascontiguousarray(outputs[tensor["name"]], TRT_TO_NUMPY[tensor["dtype"]]).tobytes()
            ctypes.memmove(context._state["addresses"][tensor["name"]], data, len(data))
    fake.events.append(f"execute on stream {stream}")
    return True


def _plugin_registry(fake: FakeTensorRT) -> FakeObject:
    if fake.world.registry is None:
        fake.world.registry = fake.new("IPluginRegistry")
    return fake.world.registry  # type: ignore[no-any-return]


def _load_library(fake: FakeTensorRT, registry: FakeObject, path: str) -> Any:
    if path in fake.world.refused_plugins:
        return None
    fake.events.append(f"load plugin library {Path(path).name}")
    return ("plugin library handle", path)  # a capsule in the real binding


def _deregister_library(fake: FakeTensorRT, registry: FakeObject, handle: Any) -> None:
    fake.events.append(f"deregister plugin library {Path(handle[1]).name}")


def _init_plugins(fake: FakeTensorRT, logger: Any, namespace: str) -> bool:
    fake.events.append("init_libnvinfer_plugins")
    return True


def _nptype(fake: FakeTensorRT, dtype: EnumValue) -> type:
    return TRT_TO_NUMPY[dtype.name]  # type: ignore[attr-defined,no-any-return]


def _logger_init(fake: FakeTensorRT, logger: FakeObject) -> None:
    return None


CONSTRUCTORS: dict[str, Callable[..., None]] = {
    "Builder": lambda fake, b, logger: b._state.update(logger=logger),
    "OnnxParser": lambda fake, p, network, logger: p._state.update(network=network, logger=logger),
    "Runtime": _runtime_init,
    "ILogger": _logger_init,
}

BEHAVIOURS: dict[str, Any] = {
    "nptype": _nptype,
    # plugin libraries
    "get_plugin_registry": _plugin_registry,
    "init_libnvinfer_plugins": _init_plugins,
    "IPluginRegistry.load_library": _load_library,
    "IPluginRegistry.deregister_library": _deregister_library,
    # build
    "Builder.create_network": lambda fake, b, flags=0: fake.new("INetworkDefinition", flags=flags),
    "Builder.create_builder_config": lambda fake, b: fake.new("IBuilderConfig", tactic_mask=fake.world.default_tactic_mask),
    "Builder.create_optimization_profile": lambda fake, b: fake.new("IOptimizationProfile"),
    "Builder.build_serialized_network": _build,
    "OnnxParser.parse_from_file": _parse,
    "OnnxParser.num_errors": lambda fake, p: len(p._state.get("errors", [])),
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
    "ICudaEngine.num_io_tensors": lambda fake, e: len(e._state["plan"]["io"]),
    "ICudaEngine.get_tensor_name": lambda fake, e, i: e._state["plan"]["io"][i]["name"],
    "ICudaEngine.get_tensor_mode": lambda fake, e, n: fake.member(f"TensorIOMode.{_io(e, n)['mode']}"),
    "ICudaEngine.get_tensor_dtype": lambda fake, e, n: fake.member(f"DataType.{_io(e, n)['dtype']}"),
    "ICudaEngine.get_tensor_shape": lambda fake, e, n: list(_io(e, n)["shape"]),
    "ICudaEngine.get_tensor_profile_shape": lambda fake, e, n, i: _io(e, n)["profile"],
    "ICudaEngine.create_execution_context": _create_context,
    "ICudaEngine.device_memory_size": lambda fake, e: fake.world.device_memory_size,
    "ICudaEngine.device_memory_size_v2": lambda fake, e: fake.world.device_memory_size,
    "Runtime.engine_host_code_allowed": lambda fake, r: r._state.get("engine_host_code_allowed", False),
    "IExecutionContext.set_input_shape": _set_input_shape,
    "IExecutionContext.get_tensor_shape": _context_shape,
    "IExecutionContext.set_tensor_address": lambda fake, c, n, p: c._state["addresses"].update({n: p}) or True,
    "IExecutionContext.execute_async_v3": _execute,
}
