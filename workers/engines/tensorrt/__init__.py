"""TensorRT backend: ``build_plan`` (ONNX -> plan) and ``TensorRTEngine`` (runs a plan).

- builder.py: TrtBuildOptions, build_plan, OnnxParserFailed;
- runner.py: TensorRTEngine (contexts, streams, buffers per slot) and plan_footprint;
- cuda.py: the cuda-python calls the runner makes, each checked;
- compat.py: the one place where TensorRT 8.6, 10.x and 11.x (and lean) differ;
- names.py: every TensorRT name each version path touches.

TensorRT cannot be installed on our development machines, so no plan has been built
or executed by this package against real TensorRT. What stands behind it instead:
mypy against tensorrt-stubs, the names and call signatures every published binding
wheel it supports exports (tests/data/trt_names/, tests/data/trt_signatures/), a fake
module generated from those (tests/unit/fake_tensorrt.py), the real ``tensorrt_lean``
runtime where it imports (on a GPU it refused an undeserializable plan with
TensorRT's own message), and the CUDA side (pinned and device buffers, streams,
concurrent slots, teardown back to the baseline) run on a real GPU with the fake
(tests/gpu/test_trt_engine_gpu.py).
"""

from workers.engines.tensorrt.builder import FALLBACK_HINT, OnnxParserFailed, PlanInfo, TrtBuildOptions, build_plan
from workers.engines.tensorrt.runner import DEFAULT_SLOTS, TensorRTEngine, plan_footprint

__all__ = [
    "DEFAULT_SLOTS",
    "FALLBACK_HINT",
    "OnnxParserFailed",
    "PlanInfo",
    "TensorRTEngine",
    "TrtBuildOptions",
    "build_plan",
    "plan_footprint",
]
