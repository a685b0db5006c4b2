"""Build side of the TensorRT backend: ONNX model -> serialized plan (``build_plan``).

Prepares what the precision needs (FP16 model, Q/DQ model or calibration cache),
parses with TensorRT's ONNX parser (every failing node named, OnnxParserFailed so a
build can fall back to ONNX Runtime), configures the builder (profile, workspace,
timing cache, tactic sources, hardware and version compatibility) through
compat.TrtApi, and writes the plan atomically.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from workers.engines.tensorrt.compat import CapturingLogger, ParserErrorInfo, PrecisionPlan, TrtApi
from workers.engines.tensorrt.plugins import load_plugin_libraries, release_plugin_libraries
from workers.errors import BuildError, InvalidConfig
from workers.precision import CalibrationResult, convert_float16, trt_calibration_cache
from workers.targets import PRECISIONS
from workers.tensors import TensorSpec

if TYPE_CHECKING:  # tensorrt-stubs; TensorRT itself is imported lazily by compat
    import tensorrt as trt

FALLBACK_HINT = "set `fallback: onnxruntime` in the model config to serve it with ONNX Runtime instead"


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
    plugin_libraries: tuple[str, ...] = ()  # custom-layer plugin libraries (paths), loaded before parsing
    custom_ops: tuple[str, ...] = ()  # ONNX Runtime custom-op libraries (paths), for the float16 model's check

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
        model_path = _model_for(plan, source, Path(tmp), calibration, options.custom_ops)
        logger = api.new_logger()
        plugins = load_plugin_libraries(api, options.plugin_libraries, logger)  # the parser looks their layers up
        try:
            return _build(api, logger, source, model_path, out_path, options, plan, calibration)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # the builder, network and parser go before their plugins
            raise
        finally:
            release_plugin_libraries(api, plugins)


def _build(api: TrtApi, logger: CapturingLogger, source: Path, model_path: Path, out_path: str | Path, options: TrtBuildOptions,
           plan: PrecisionPlan, calibration: CalibrationResult | None) -> PlanInfo:
    """Parse, configure and build (the plugin libraries are loaded)."""
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


def _model_for(plan: PrecisionPlan, source: Path, tmp: Path, calibration: CalibrationResult | None,
               custom_ops: tuple[str, ...] = ()) -> Path:
    if plan.onnx_flavour == "float16":
        return convert_float16(source, tmp / "model.fp16.onnx", custom_ops)
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

