"""The one place where TensorRT versions differ: 8.6, 10.x and 11.x (and their lean runtimes).

Polygraphy style: where the API forks, ``TrtApi`` picks a ``_v1``/``_v2`` path by the
version of the module it wraps; elsewhere a missing attribute becomes "X is not
available on TensorRT 8.6.1" instead of an AttributeError deep in a build.

The forks this backend meets:

==============================  ===============  ===============  ===============
                                8.6              10.x             11.x
==============================  ===============  ===============  ===============
network creation flags          EXPLICIT_BATCH   none, or         STRONGLY_TYPED
                                                 STRONGLY_TYPED   (always)
float16                         FP16 ONNX +      FP16 ONNX,       FP16 ONNX,
                                BuilderFlag.FP16 strongly typed   strongly typed
int8 "calibrator" (implicit)    INT8 flag +      INT8 flag +      removed
                                IInt8Entropy-    IInt8Entropy-
                                Calibrator2      Calibrator2
int8 "qdq" (explicit)           Q/DQ + INT8 flag Q/DQ, strongly   Q/DQ, strongly
                                                 typed            typed
engine device memory            device_memory_   device_memory_   device_memory_
                                size             size_v2          size_v2
parser error node               node() index,    node_name(),     node_name(),
                                looked up in     node_operator()  node_operator()
                                the ONNX graph
tactic sources                  CUBLAS,          CUBLAS,          EDGE_MASK_CONV.,
                                CUBLAS_LT,       CUBLAS_LT,       JIT_CONV. only
                                CUDNN, ...       CUDNN, ...
hardware compatibility          AMPERE_PLUS      + SAME_COMPUTE_  + SAME_COMPUTE_
                                                 CAPABILITY       CAPABILITY
plugin libraries                ctypes.CDLL      IPluginRegistry. IPluginRegistry.
(custom layers)                 (RTLD_GLOBAL) +  load_library,    load_library,
                                init_libnvinfer_ deregister_      deregister_
                                plugins (full)   library          library
lean runtime (tensorrt_lean)    runtime names only, no Builder/OnnxParser
==============================  ===============  ===============  ===============

Every TensorRT name a version path touches is declared in names.py
(``TrtApi.names_used``).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from workers.engines.tensorrt.names import NAMES_USED
from workers.errors import IncompatibleArtifact, InvalidConfig, NotReady
from workers.targets import HARDWARE_COMPATIBILITY, parse_version

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) describe 10.13; the module itself is optional
    import tensorrt as trt

_log = logging.getLogger(__name__)

SUPPORTED_MAJORS = (8, 10, 11)
INT8_MODES = ("calibrator", "qdq")
LOGGER_HISTORY = 200  # messages kept per logger, for error reports
# Runtimes TensorRT returned half-initialised (see TrtApi.create_runtime): never destroyed.
_UNUSABLE_RUNTIMES: list[tuple[Any, Any]] = []

_HW_LEVELS = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}
assert set(_HW_LEVELS) == set(HARDWARE_COMPATIBILITY)


# --------------------------------------------------------------------------- loading


def load_tensorrt(lean: bool = False) -> Any:
    """Import ``tensorrt`` (or ``tensorrt_lean``); NotReady with the fix when it is missing.

    Imported here, lazily, because TensorRT is an optional extra most workers lack.
    A ``tensorrt`` without ``__version__`` is a namespace package left by type stubs
    (tensorrt-stubs installs ``tensorrt/__init__.pyi``), not TensorRT.
    """
    name = "tensorrt_lean" if lean else "tensorrt"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise NotReady(
            f"{name} is not installed on this worker ({exc}); install forward-fleet[trt] "
            f"with the TensorRT release the plan was built with, or serve the model with ONNX Runtime"
        ) from exc
    if not hasattr(module, "__version__"):
        raise NotReady(f"'{name}' on this worker is type stubs only (no __version__), not TensorRT")
    return module


@dataclass(frozen=True)
class ParserErrorInfo:
    """One ONNX parser error, with the node it happened in (-1 and '' when none)."""

    node_index: int
    node_name: str
    operator: str
    code: str
    reason: str

    def describe(self) -> str:
        where = "the model" if self.node_index < 0 and not self.node_name else (
            f"node {self.node_index} '{self.node_name or '?'}' (operator {self.operator or '?'})"
        )
        return f"{where}: {self.code}: {self.reason}"


@dataclass(frozen=True)
class PrecisionPlan:
    """How a precision mode is built on one TensorRT version."""

    precision: str
    onnx_flavour: str  # which model to parse: "source" (float32) | "float16" | "qdq"
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # BuilderFlag member names to set
    uses_calibrator: bool  # implicit INT8 from the stored calibration cache


class TrtApi:
    """One TensorRT module (real, lean or fake) and the version path it takes."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.version: str = str(module.__version__)
        self.lean = str(getattr(module, "__name__", "")).startswith("tensorrt_lean")
        parts = parse_version(self.version)
        self.major = parts[0]
        self.version_tuple = parts
        if self.major not in SUPPORTED_MAJORS:
            raise InvalidConfig(
                f"TensorRT {self.version} is not supported: forward-fleet supports TensorRT "
                f"{', '.join(map(str, SUPPORTED_MAJORS))}.x"
            )
        self._logger_class: type | None = None
        self._calibrator_class: type | None = None

    @classmethod
    def load(cls, lean: bool = False) -> "TrtApi":
        return cls(load_tensorrt(lean))

    # ------------------------------------------------------------------ names

    @property
    def label(self) -> str:
        return f"TensorRT {'lean ' if self.lean else ''}{self.version}"

    @property
    def names_used(self) -> frozenset[str]:
        return NAMES_USED[(self.major, self.lean)]

    def has(self, dotted: str) -> bool:
        try:
            self._resolve(dotted)
        except AttributeError:
            return False
        return True

    def require(self, dotted: str, why: str = "") -> Any:
        """``module.A.B`` for ``dotted`` 'A.B', or InvalidConfig naming this version."""
        try:
            return self._resolve(dotted)
        except AttributeError:
            hint = f" ({why})" if why else ""
            raise InvalidConfig(f"{dotted} is not available on {self.label}{hint}") from None

    def _resolve(self, dotted: str) -> Any:
        value = self.module
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    # ------------------------------------------------------------------ logging

    def new_logger(self) -> "CapturingLogger":
        """A TensorRT logger that keeps recent messages, for error reports (one per engine/build)."""
        if self._logger_class is None:
            self._logger_class = _make_logger_class(self.require("ILogger"))
        logger: CapturingLogger = self._logger_class(self)
        return logger

    def is_error(self, severity: Any) -> bool:
        return int(severity) <= int(self.require("ILogger.Severity.ERROR"))

    # ------------------------------------------------------------------ runtime

    def create_runtime(self, logger: "CapturingLogger") -> "trt.Runtime":
        """``Runtime(logger)``, refused when TensorRT logged an error while creating it.

        Without a usable CUDA device TensorRT logs "CUDA initialization failure" yet
        still returns a Runtime, which crashes the process on the first
        deserialization (seen with the real tensorrt_lean 11.4 on a machine without a
        GPU); so the logger is checked before the Runtime is used.
        """
        mark = logger.mark()
        runtime: trt.Runtime | None = self.require("Runtime")(logger)
        errors = logger.errors_since(mark)
        if runtime is None or errors:
            if runtime is not None:
                # Destroying such a Runtime crashes the process too (same machine, same
                # TensorRT): keep it, and its logger, for the life of the process.
                _UNUSABLE_RUNTIMES.append((runtime, logger))
            raise NotReady(f"{self.label} could not create a runtime: {'; '.join(errors) or 'no message'}")
        return runtime

    def allow_engine_host_code(self, runtime: "trt.Runtime") -> None:
        """Version-compatible plans embed the lean runtime, which is host code TensorRT must be allowed to run."""
        runtime.engine_host_code_allowed = True

    def device_memory_size(self, engine: "trt.ICudaEngine") -> int:
        return self._device_memory_size_v1(engine) if self.major < 10 else self._device_memory_size_v2(engine)

    @staticmethod
    def _device_memory_size_v1(engine: "trt.ICudaEngine") -> int:
        return int(engine.device_memory_size)

    @staticmethod
    def _device_memory_size_v2(engine: "trt.ICudaEngine") -> int:
        # v2 includes weight-streaming scratch memory; v1 is deprecated in 10 and gone in 11.
        return int(engine.device_memory_size_v2)

    # ------------------------------------------------------------------ plugin libraries (plugins.py counts users)

    def load_plugin_library(self, path: str, logger: "CapturingLogger") -> Any:
        """Load one custom-layer plugin library into the process's plugin registry; its handle."""
        return self._load_plugin_library_v1(path, logger) if self.major < 10 else self._load_plugin_library_v2(path, logger)

    def _load_plugin_library_v1(self, path: str, logger: "CapturingLogger") -> Any:
        # 8.6: a plugin library registers its creators as it loads (REGISTER_TENSORRT_PLUGIN), globally
        # so that the parser and the runtime see them; full TensorRT then adds its own plugins
        # (init_libnvinfer_plugins; the lean runtime has none).
        try:
            handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise IncompatibleArtifact(f"{self.label} could not load the plugin library {path.rsplit('/', 1)[-1]}: {exc}") from None
        if not self.lean and not self.require("init_libnvinfer_plugins")(logger, ""):
            raise IncompatibleArtifact(f"{self.label} could not initialise its plugins (init_libnvinfer_plugins)")
        return handle

    def _load_plugin_library_v2(self, path: str, logger: "CapturingLogger") -> Any:
        mark = logger.mark()
        handle = self.require("get_plugin_registry")().load_library(path)
        if handle is None:
            said = "; ".join(logger.errors_since(mark)[-3:]) or "TensorRT logged no error"
            raise IncompatibleArtifact(f"{self.label} could not load the plugin library {path.rsplit('/', 1)[-1]}: {said}")
        return handle

    def unload_plugin_library(self, handle: Any) -> None:
        """Deregister a library no engine or runtime uses any more (10.x, 11.x). On 8.6 it stays for the
        life of the process: its creators registered themselves and cannot be taken back, so unloading
        it would leave the registry pointing into freed code."""
        if self.major >= 10:
            self.require("get_plugin_registry")().deregister_library(handle)

    # ------------------------------------------------------------------ build

    def require_builder(self) -> None:
        if self.lean:
            raise InvalidConfig(
                f"{self.label} cannot build plans: the lean runtime only deserializes and runs "
                f"version-compatible plans; build on a worker with full TensorRT"
            )

    def network_flags(self, strongly_typed: bool) -> int:
        return self._network_flags_v1(strongly_typed) if self.major < 10 else self._network_flags_v2(strongly_typed)

    def _network_flags_v1(self, strongly_typed: bool) -> int:
        if strongly_typed:
            raise InvalidConfig(f"strongly typed networks are not available on {self.label} (TensorRT 10 or newer)")
        # 8.6 defaults to implicit batch, which ONNX models cannot use.
        return 1 << int(self.require("NetworkDefinitionCreationFlag.EXPLICIT_BATCH"))

    def _network_flags_v2(self, strongly_typed: bool) -> int:
        # 10+: explicit batch is the only mode (the flag is deprecated, then gone in 11).
        if strongly_typed or self.major >= 11:
            return 1 << int(self.require("NetworkDefinitionCreationFlag.STRONGLY_TYPED"))
        return 0

    def plan_precision(self, precision: str, int8_mode: str | None = None) -> PrecisionPlan:
        """How to build ``precision`` here; InvalidConfig when this version cannot."""
        if int8_mode is not None and int8_mode not in INT8_MODES:
            raise InvalidConfig(f"int8_mode must be one of {', '.join(INT8_MODES)}, got {int8_mode!r}")
        typed = self.major >= 10
        if precision == "float32":
            return PrecisionPlan(precision, "source", self.major >= 11, (), False)
        if precision == "float16":
            # Weakly typed 8.6 picks FP16 kernels only with the flag; 10+ follow the model's types.
            return PrecisionPlan(precision, "float16", typed, () if typed else ("FP16",), False)
        if precision in ("int8", "int8_calib"):
            mode = int8_mode or ("qdq" if self.major >= 11 else "calibrator")
            if mode == "calibrator":
                if self.major >= 11:
                    raise InvalidConfig(
                        f"implicit INT8 calibration (IInt8EntropyCalibrator2, BuilderFlag.INT8) is not "
                        f"available on {self.label}: build int8 from the Q/DQ model (int8_mode: qdq)"
                    )
                return PrecisionPlan(precision, "source", False, ("INT8",), True)
            return PrecisionPlan(precision, "qdq", typed, () if typed else ("INT8",), False)
        raise InvalidConfig(f"unknown precision {precision!r}")

    def set_builder_flags(self, config: "trt.IBuilderConfig", names: Iterable[str]) -> None:
        for name in names:
            flag = self.require(f"BuilderFlag.{name}", "TensorRT 11 builds precision from the model's types")
            config.set_flag(flag)

    def attach_calibration_cache(self, config: "trt.IBuilderConfig", cache: bytes) -> Any:
        """Give the builder an IInt8EntropyCalibrator2 that returns the stored cache (8.6, 10.x).

        Returns the calibrator: the caller keeps it alive until the build ends
        (TensorRT holds only a raw pointer to it).
        """
        if self.major >= 11:
            raise InvalidConfig(f"IInt8EntropyCalibrator2 is not available on {self.label}; use int8_mode: qdq")
        if self._calibrator_class is None:
            self._calibrator_class = _make_calibrator_class(self.require("IInt8EntropyCalibrator2"))
        calibrator = self._calibrator_class(cache)
        config.int8_calibrator = calibrator
        return calibrator

    def tactic_source_mask(self, current: int, wanted: dict[str, bool]) -> int:
        """``current`` with each named tactic source switched on (True) or off (False)."""
        mask = int(current)
        sources = self.require("TacticSource")
        for name, enabled in wanted.items():
            member = getattr(sources, str(name).upper(), None)
            if member is None:
                known = sorted(n for n in dir(sources) if n.isupper())
                raise InvalidConfig(
                    f"tactic source {name} is not available on {self.label}"
                    f"{' (CUBLAS, CUBLAS_LT and CUDNN tactics were removed in TensorRT 11)' if self.major >= 11 else ''}; "
                    f"it has {', '.join(known) or 'none'}"
                )
            bit = 1 << int(member)
            mask = (mask | bit) if enabled else (mask & ~bit)
        return mask

    def set_hardware_compatibility(self, config: "trt.IBuilderConfig", level: str) -> None:
        if level not in _HW_LEVELS:
            raise InvalidConfig(f"hardware_compatibility must be one of {', '.join(_HW_LEVELS)}, got {level!r}")
        if level == "none":
            return  # TensorRT's default; 8.6 plans stay untouched
        config.hardware_compatibility_level = self.require(
            f"HardwareCompatibilityLevel.{_HW_LEVELS[level]}", "SAME_COMPUTE_CAPABILITY came with TensorRT 10"
        )

    def parser_errors(self, parser: "trt.OnnxParser", onnx_nodes: list[tuple[str, str]]) -> list[ParserErrorInfo]:
        """Every error of a failed parse; ``onnx_nodes`` is the graph's (name, op_type) by index."""
        read = self._parser_error_v1 if self.major < 10 else self._parser_error_v2
        return [read(parser.get_error(i), onnx_nodes) for i in range(int(parser.num_errors))]

    @staticmethod
    def _parser_error_v1(error: "trt.ParserError", onnx_nodes: list[tuple[str, str]]) -> ParserErrorInfo:
        # 8.6's ParserError has node() (an index) but neither node_name() nor node_operator().
        index = int(error.node())
        name, operator = onnx_nodes[index] if 0 <= index < len(onnx_nodes) else ("", "")
        return ParserErrorInfo(index, name, operator, _enum_name(error.code()), str(error.desc()))

    @staticmethod
    def _parser_error_v2(error: "trt.ParserError", onnx_nodes: list[tuple[str, str]]) -> ParserErrorInfo:
        index = int(error.node())
        name, operator = str(error.node_name()), str(error.node_operator())
        if not (name or operator) and 0 <= index < len(onnx_nodes):
            name, operator = onnx_nodes[index]
        return ParserErrorInfo(index, name, operator, _enum_name(error.code()), str(error.desc()))


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- subclasses of TensorRT interfaces
# Defined when a module is loaded: their base classes live in that (lazily imported) module.


class CapturingLogger(Protocol):
    """What the logger from new_logger() offers besides being the module's ILogger."""

    def mark(self) -> int: ...

    def messages_since(self, mark: int) -> list[str]: ...

    def errors_since(self, mark: int) -> list[str]: ...


def _make_logger_class(base: Any) -> type:
    class _Logger(base):  # type: ignore[misc]  # base: ILogger of the loaded module
        """Keeps the last messages (TensorRT logs from its own threads) and forwards them to logging."""

        def __init__(self, api: TrtApi) -> None:
            super().__init__()  # pybind11 needs the base initialised explicitly
            self._api = api
            self._lock = threading.Lock()
            self._count = 0
            self._history: deque[tuple[int, bool, str]] = deque(maxlen=LOGGER_HISTORY)

        def log(self, severity: Any, msg: str) -> None:
            error = self._api.is_error(severity)
            with self._lock:
                self._count += 1
                self._history.append((self._count, error, str(msg)))
            _log.log(logging.ERROR if error else logging.DEBUG, "TensorRT: %s", msg)

        def mark(self) -> int:
            with self._lock:
                return self._count

        def messages_since(self, mark: int) -> list[str]:
            with self._lock:
                return [text for n, _, text in self._history if n > mark]

        def errors_since(self, mark: int) -> list[str]:
            with self._lock:
                return [text for n, error, text in self._history if n > mark and error]

    return _Logger


def _make_calibrator_class(base: Any) -> type:
    class _StoredCacheCalibrator(base):  # type: ignore[misc]  # base: its IInt8EntropyCalibrator2
        """Hands TensorRT the cache from int8_calib and no batches: calibration already ran."""

        def __init__(self, cache: bytes) -> None:
            super().__init__()
            self._cache = bytes(cache)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            # None means "no more data": if TensorRT rejects the cache it fails the build
            # (reported with the logger's words) instead of calibrating on nothing.
            return None

        def read_calibration_cache(self) -> bytes:
            return self._cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None  # the stored cache is the source of truth

    return _StoredCacheCalibrator
