"""Probe, don't declare: what this worker's runtimes can really do on its device, found at start.

- ONNX Runtime: its version, its providers, the highest ai.onnx opset it loads (a tiny model
  per opset, bisected), a tiny run on the CPU, and on a real GPU a tiny run on the CUDA
  provider alone, which proves the build has kernels for this architecture;
- TensorRT (real GPUs): its version, whether the builder is there (the lean runtime has none)
  and whether a builder can be made on this device.

A runtime that fails its probe is left out of the worker's runtimes (so ``can_run`` never
sends work there) and the failure is reported, with the device's name, in ``problems``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np

from workers.devices import Device
from workers.targets import Runtime

log = logging.getLogger("forward-fleet.probe")

OPSET_RANGE = (13, 40)  # bisected: the oldest every supported ONNX Runtime loads, and beyond any known
_IR_VERSION = 8  # old enough for every ONNX Runtime the fleet supports, new enough for the opsets probed


@dataclass(frozen=True)
class ProbeReport:
    """What the probe found (shown by `fleet status` and `fleet doctor`)."""

    python: str
    onnxruntime: str | None = None
    onnxruntime_path: str = ""
    providers: tuple[str, ...] = ()
    max_opset: int = 0
    cuda_run: str | None = None  # "ok", or why the CUDA provider could not run on this device; None: not tried
    tensorrt: str | None = None
    tensorrt_builder: bool | None = None
    environment: tuple[str, ...] = ()  # the requirements of the environment this worker was started in
    problems: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _tiny_model(opset: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=_IR_VERSION)
    return model.SerializeToString()


def _runs(ort, opset: int, providers: list, check_provider: str | None = None) -> str | None:
    """None when a tiny model at ``opset`` loads and computes right with ``providers``, else why not."""
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(_tiny_model(opset), options, providers=providers)
        if check_provider and check_provider not in session.get_providers():
            return f"the session fell back to {session.get_providers()}"
        out = session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0]
        if not np.allclose(out, [2.0, 4.0]):
            return f"a tiny Add computed {out.tolist()}"
    except Exception as exc:  # any failure is the answer; ONNX Runtime raises several types
        return str(exc).splitlines()[0][:300]
    return None


def _max_opset(ort) -> int:
    low, high = OPSET_RANGE
    if _runs(ort, low, ["CPUExecutionProvider"]) is not None:
        return 0
    while low < high:  # the highest opset that loads: each probe is a session of one node (~ms)
        mid = (low + high + 1) // 2
        if _runs(ort, mid, ["CPUExecutionProvider"]) is None:
            low = mid
        else:
            high = mid - 1
    return low


def _probe_tensorrt(device: Device, problems: list[str]) -> tuple[Runtime | None, str | None, bool | None]:
    try:
        import tensorrt as trt  # optional: forward-fleet[trt], or the GPU type's environment
    except ImportError:
        return None, None, None
    version = getattr(trt, "__version__", "unknown")
    builder = hasattr(trt, "Builder")
    if builder:
        try:
            made = trt.Builder(trt.Logger(trt.Logger.ERROR))
            builder = made is not None
        except Exception as exc:
            problems.append(f"TensorRT {version} cannot make a builder on {device.describe()}: {exc}")
            builder = False
    return Runtime("tensorrt", version, "tensorrt", lean=not hasattr(trt, "Builder")), version, builder


def probe_runtimes(device: Device, environment: tuple[str, ...] = ()) -> tuple[tuple[Runtime, ...], ProbeReport]:
    """This process's runtimes as they really are on ``device``, and the report of the probe."""
    problems: list[str] = []
    runtimes: list[Runtime] = []
    try:
        import onnxruntime as ort
    except ImportError as exc:
        problems.append(f"ONNX Runtime does not import in {sys.executable}: {exc}")
        return (), ProbeReport(sys.executable, environment=environment, problems=tuple(problems))
    providers = tuple(ort.get_available_providers())
    max_opset = _max_opset(ort)
    cpu_error = _runs(ort, OPSET_RANGE[0], ["CPUExecutionProvider"])
    if cpu_error is None:
        runtimes.append(Runtime("onnxruntime", ort.__version__, "cpu", max_opset=max_opset))
    else:
        problems.append(f"ONNX Runtime {ort.__version__} cannot run a tiny model on the CPU: {cpu_error}")
    cuda_run = None
    if device.is_real_gpu:
        if "CUDAExecutionProvider" not in providers:
            cuda_run = "no CUDA provider in this ONNX Runtime build"
            problems.append(f"ONNX Runtime {ort.__version__} has no CUDA provider: {device.describe()} is unused "
                            f"(install onnxruntime-gpu in this GPU type's environment)")
        else:
            cuda = [("CUDAExecutionProvider", {"device_id": device.cuda_ordinal or 0})]
            cuda_run = _runs(ort, OPSET_RANGE[0], cuda, check_provider="CUDAExecutionProvider") or "ok"
            if cuda_run == "ok":
                runtimes.append(Runtime("onnxruntime", ort.__version__, "cuda", max_opset=max_opset,
                                        min_compute_capability=device.compute_capability or "6.0"))
            else:
                problems.append(f"ONNX Runtime {ort.__version__}'s CUDA provider cannot run on {device.describe()}: "
                                f"{cuda_run}")
    trt_version = builder = None
    if device.is_real_gpu:
        trt_runtime, trt_version, builder = _probe_tensorrt(device, problems)
        if trt_runtime is not None:
            runtimes.append(trt_runtime)
    report = ProbeReport(sys.executable, ort.__version__, getattr(ort, "__file__", "") or "", providers, max_opset,
                         cuda_run, trt_version, builder, environment, tuple(problems))
    for problem in problems:
        log.error("%s", problem)
    return tuple(runtimes), report
