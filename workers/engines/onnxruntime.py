"""ONNX Runtime backend: CPU provider everywhere, CUDA provider with onnxruntime-gpu."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as ort_c
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from workers.custom_ops import session_options
from workers.engines.base import Engine
from workers.errors import InvalidInput
from workers.tensors import ONNX_TYPE_TO_DATATYPE, TensorSpec

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# cuBLAS's own workspace took ~128 MiB per handle on an H200, and ONNX Runtime makes a handle per
# session and calling thread: the big MLP's engines ran as fast with 8 x 16 KiB, and took 288 / 158 MiB
# (float32 / float16) instead of 416 / 286 (docs/gpu-results.md). Set CUBLAS_WORKSPACE_CONFIG in the
# fleet's environment to choose otherwise.
CUBLAS_WORKSPACE = ":16:8"


def limit_cublas_workspace() -> None:
    """Before this process's first CUDA session (cuBLAS reads the setting once): see CUBLAS_WORKSPACE."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def cuda_provider_available() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def _specs(nodes: list, optional: bool = False) -> tuple[TensorSpec, ...]:
    specs = []
    for node in nodes:
        datatype = ONNX_TYPE_TO_DATATYPE.get(node.type)
        if datatype is None:
            raise InvalidInput(f"tensor '{node.name}' has type {node.type}, which forward-fleet cannot serve")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        specs.append(TensorSpec(node.name, datatype, shape, optional))
    return tuple(specs)


def estimate_footprint(model_path: str | Path, specs: tuple[TensorSpec, ...], max_batch: int) -> int:
    """Weights plus IO at max batch, doubled for activations, plus the arena's slack.

    Only an estimate for the ledger until a real GPU measures the load (NVML delta).
    """
    weights = os.path.getsize(model_path)
    io = 0
    for spec in specs:
        elems = 1
        for d in spec.shape:
            elems *= max_batch if d < 0 else d
        io += elems * max(spec.numpy_dtype.itemsize, 8 if spec.datatype == "BYTES" else 1)
    return int(weights + 4 * io + (16 << 20))


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        provider: str = "cpu",
        device_id: int = 0,
        intra_op_threads: int = 0,
        gpu_mem_limit: int | None = None,
        footprint_bytes: int | None = None,
        allow_tf32: bool = False,
        custom_ops: Sequence[str] = (),
    ) -> None:
        """``allow_tf32``: let the CUDA provider compute float32 matrix products in TF32 on tensor
        cores (about twice as fast on Ampere and newer, ~1e-3 relative error); off by default, so a
        float32 artifact computes in float32. ``custom_ops``: paths of the custom-op libraries the
        model needs (registered with the session; trusted by the caller)."""
        super().__init__()
        if provider not in ("cpu", "cuda"):
            raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
        self.model_path = Path(model_path)
        self.provider = provider
        self.device_id = device_id
        self.intra_op_threads = intra_op_threads
        self.gpu_mem_limit = gpu_mem_limit
        self._footprint = footprint_bytes
        self.allow_tf32 = allow_tf32
        self.custom_ops = tuple(str(p) for p in custom_ops)
        self._options: ort.SessionOptions | None = None  # holds the custom-op libraries loaded
        self._session: ort.InferenceSession | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: list[str] = []

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def defaulted_inputs(self) -> tuple[TensorSpec, ...]:
        """Inputs the model has defaults for (initializers that are graph inputs too), as optional inputs."""
        assert self._session is not None
        return _specs(self._session.get_overridable_initializers(), optional=True)

    @property
    def footprint_bytes(self) -> int:
        if self._footprint is None:
            self._footprint = estimate_footprint(self.model_path, self._inputs + self._outputs, 64)
        return self._footprint

    def _providers(self) -> list:
        if self.provider == "cpu":
            return [CPU_PROVIDER]
        if not cuda_provider_available():
            raise RuntimeError(
                "ONNX Runtime's CUDA provider is not available in this process; install "
                "forward-fleet[gpu] (onnxruntime-gpu) or build the model for the CPU"
            )
        limit_cublas_workspace()
        return [(CUDA_PROVIDER, self._cuda_options())]

    def _cuda_options(self) -> dict:
        # kSameAsRequested: the arena grows only by what is asked (its size is what we measure);
        # TF32 only when asked for, so that a float32 artifact computes in float32.
        options = {"device_id": self.device_id, "arena_extend_strategy": "kSameAsRequested",
                   "use_tf32": int(self.allow_tf32)}
        if self.gpu_mem_limit:
            options["gpu_mem_limit"] = int(self.gpu_mem_limit)
        return options

    def _activate(self) -> None:
        options = session_options(self.custom_ops)
        self._options = options
        options.intra_op_num_threads = self.intra_op_threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=self._providers())
        if self.provider == "cuda" and CUDA_PROVIDER not in session.get_providers():
            raise RuntimeError(f"ONNX Runtime could not create a CUDA session for {self.model_path.name}")
        self._session = session
        self._inputs = _specs(session.get_inputs())
        self._outputs = _specs(session.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    def _deactivate(self) -> None:
        # The session first, then the options that hold the custom-op libraries: a library's
        # code must outlive every kernel of it (unloaded under a live session, it crashes the process).
        self._session = None
        if self.custom_ops:
            gc.collect()  # a session caught in a reference cycle would outlive its libraries
        self._options = None

    def _refused(self, exc: Exception) -> InvalidInput:
        """ONNX Runtime's INVALID_ARGUMENT at run time is about the request's content (an index out of
        range, a shape an operator cannot take): the client's 400, not the server's 500."""
        said = str(exc).removeprefix("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ")
        return InvalidInput(f"the model {self.model_path.stem} refused the input: {said}")

    @property
    def provider_options(self) -> dict:
        """What ONNX Runtime applied (for checks on real GPUs)."""
        return self._session.get_provider_options() if self._session is not None else {}

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._session is not None
        try:
            results = self._session.run(self._output_names, {name: _ort_strings(name, a) for name, a in feeds.items()})
        except OrtInvalidArgument as exc:
            raise self._refused(exc) from None
        return dict(zip(self._output_names, results))

    def _infer_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ONNX Runtime writes the outputs straight into the arrays of ``out`` (with CUDA: the
        device-to-host copy lands there, a DMA when the memory is page-locked), so no output array
        is allocated and copied again.

        Not through an IOBinding: its ``bind_cpu_input`` copies the input to the GPU at once, holding
        the GIL, with ``cudaMemcpy`` on CUDA's legacy default stream, which waits for every run in
        flight on ONNX Runtime's (blocking) streams. Here the inputs are CPU values over the callers'
        memory, copied inside ``Run`` on the run's own stream with the GIL released, as ``session.run``
        does (alone, both ran as fast on an H200: docs/performance.md). When ``out`` lacks an output
        (its size known only after the run), the run allocates them all and those of ``out`` are copied."""
        assert self._session is not None
        if set(out) != set(self._output_names) or any(a.dtype == np.object_ for a in feeds.values()):
            return super()._infer_into(feeds, out)  # an output to be sized by the run: run, then copy
        cpu = _cpu_device()
        feed_values = ort_c.OrtValueVector()
        arrays = [np.ascontiguousarray(a) for a in feeds.values()]  # alive until Run returns
        for array in arrays:
            feed_values.push_back(ort_c.OrtValue.ortvalue_from_numpy(array, cpu))
        fetch_values = ort_c.OrtValueVector()
        for name in self._output_names:
            fetch_values.push_back(ort_c.OrtValue.ortvalue_from_numpy(out[name], cpu))
        try:
            self._session._sess.run_with_ortvaluevector(
                ort_c.RunOptions(), list(feeds), feed_values, self._output_names, fetch_values,
                [cpu] * len(self._output_names))
        except OrtInvalidArgument as exc:
            raise self._refused(exc) from None
        return dict(out)


def _cpu_device():
    """ONNX Runtime's name for ordinary host memory (page-locked or not: CUDA tells them apart itself)."""
    return ort_c.OrtDevice(ort_c.OrtDevice.cpu(), ort_c.OrtDevice.default_memory(), 0)


def _ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES tensors arrive as ``bytes`` objects; ONNX Runtime's string tensors take ``str``
    (bytes would become their repr, "b'...'"), and give ``str`` back (the codec encodes it)."""
    if array.dtype != np.object_ or not array.size or not isinstance(array.flat[0], bytes):
        return array
    try:
        return np.array([b.decode() if isinstance(b, bytes) else b for b in array.reshape(-1)],
                        dtype=np.object_).reshape(array.shape)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': ONNX Runtime takes strings as UTF-8; this BYTES element is not") from None


def describe_model(model_path: str | Path, optional: "tuple[str, ...] | list[str]" = (),
                   custom_ops: Sequence[str] = ()) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX model, as ONNX Runtime sees them (loads it on the CPU).

    ``optional``: inputs that requests may leave out, served as optional inputs: each must be one the
    model has a default for (an initializer that is also a graph input: ONNX Runtime's overridable
    initializers); InvalidInput naming it otherwise."""
    with OnnxRuntimeEngine(model_path, intra_op_threads=1, custom_ops=custom_ops) as engine:
        if not optional:
            return engine.inputs, engine.outputs
        defaults = {s.name: s for s in engine.defaulted_inputs()}
        missing = [name for name in optional if name not in defaults]
        if missing:
            raise InvalidInput(f"input(s) {', '.join(missing)} of {Path(model_path).name} cannot be optional: the model has "
                               f"no default for them (optional inputs: {', '.join(defaults) or 'none'})")
        return engine.inputs + tuple(defaults[name] for name in optional), engine.outputs
