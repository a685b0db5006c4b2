"""Engine backends, one per module, behind ``workers.engines.base.Engine``.

``open_engine`` is the one place that picks the backend for an artifact: a real
TensorRT plan opens with TensorRT; ONNX Runtime artifacts and simulated plans (built
for a declared GPU, executed on the CPU) open with ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from workers.custom_ops import ONNXRUNTIME, TENSORRT, LibraryFile, for_backend
from workers.engines.base import Engine
from workers.engines.onnxruntime import OnnxRuntimeEngine
from workers.engines.tensorrt import TensorRTEngine
from workers.targets import Target

__all__ = ["Engine", "executes_on_cpu", "open_engine"]


def executes_on_cpu(target: Target) -> bool:
    """Whether this artifact runs on the host's CPU (simulated plans included)."""
    return target.simulated or (target.backend == "onnxruntime" and target.provider == "cpu")


def open_engine(
    path: str | Path,
    target: Target,
    *,
    device_id: int = 0,
    slots: int = 1,
    intra_op_threads: int = 0,
    lean: bool = False,
    gpu_mem_limit: int | None = None,
    footprint_bytes: int | None = None,
    trt_api=None,
    cuda_module=None,
    allow_tf32: bool = False,
    custom_ops: Sequence[LibraryFile] = (),
) -> Engine:
    """An engine (not yet activated) for the artifact at ``path`` built for ``target``.

    ``lean``: the worker has only TensorRT's lean runtime; ``gpu_mem_limit``: the most
    device memory ONNX Runtime's CUDA arena may take (the budget left for it); ``trt_api`` and
    ``cuda_module``: the TensorRT and cuda-python modules to use (default: the installed ones);
    ``custom_ops``: the model's custom-op libraries on this host (trusted by the caller), each given
    to the backend that takes it."""
    if target.needs_tensorrt:
        return TensorRTEngine(path, device_id=device_id, slots=slots, version_compatible=target.version_compatible,
                              lean=lean, footprint_bytes=footprint_bytes, api=trt_api, cuda_module=cuda_module,
                              plugin_libraries=for_backend(custom_ops, TENSORRT))
    use_cuda = target.backend == "onnxruntime" and target.provider == "cuda" and not target.simulated
    return OnnxRuntimeEngine(
        path,
        provider="cuda" if use_cuda else "cpu",
        device_id=device_id,
        intra_op_threads=intra_op_threads,
        gpu_mem_limit=gpu_mem_limit if use_cuda else None,
        footprint_bytes=footprint_bytes,
        allow_tf32=allow_tf32,
        custom_ops=for_backend(custom_ops, ONNXRUNTIME),
    )
