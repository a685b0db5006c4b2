"""A Triton model repository as teams keep one, written with real files, for the import tests.

- ``simple``: Triton's example model (ONNX), dynamic batching, two instances, a warm-up from a file;
- ``plan-cc``: "plans" per compute capability (``cc_model_filenames`` 7.5 / 6.1 / 7.0), each an ONNX
  model standing in for a plan (what a simulated fleet executes), adding its own constant
  (75, 61, 70) so an answer says which file computed it;
- ``versioned``: versions 1-3 (each adds 100 x its version), ``latest { num_versions: 2 }``;
- ``stateful``: sequence batching (refused), ``pythonic``: the python backend (refused).
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import make_simple

PLAN_CONSTANTS = {"7.5": 75.0, "6.1": 61.0, "7.0": 70.0}
PLAN_FILES = {"7.5": "model_t4.plan", "6.1": "model_p4.plan", "7.0": "model_v100.plan"}
TENSORRT = {"7.5": "10.16.1", "6.1": "8.6.1", "7.0": "10.4.0"}  # as configs/hetero-sim.yaml's GPUs have

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 200 }
instance_group [ { count: 2 kind: KIND_GPU } ]
parameters { key: "team" value { string_value: "search" } }
model_warmup [ {
  name: "ones" batch_size: 4 count: 3
  inputs { key: "INPUT0" value { data_type: TYPE_INT32 dims: [ 16 ] input_data_file: "ones.bin" } }
  inputs { key: "INPUT1" value { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } }
} ]
"""

PLAN_CONFIG = """
platform: "tensorrt_plan"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
cc_model_filenames [ { key: "7.5" value: "model_t4.plan" }, { key: "6.1" value: "model_p4.plan" },
                     { key: "7.0" value: "model_v100.plan" } ]
parameters { key: "tensorrt_version" value { string_value: "10.16.1" } }
parameters { key: "tensorrt_version:6.1" value { string_value: "8.6.1" } }
parameters { key: "tensorrt_version:7.0" value { string_value: "10.4.0" } }
dynamic_batching { }
"""

VERSIONED_CONFIG = """
backend: "onnxruntime"
max_batch_size: 4
version_policy { latest { num_versions: 2 } }
"""

STATEFUL_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 4
sequence_batching { max_sequence_idle_microseconds: 5000000 }
model_transaction_policy { decoupled: true }
"""

PYTHON_CONFIG = """
backend: "python"
max_batch_size: 4
"""


def save(graph, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_add_constant(path: Path, constant: float, width: int = 4) -> Path:
    """FP32 x [N, width] -> y = x + constant."""
    c = numpy_helper.from_array(np.array(constant, np.float32), "c")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    return save(helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "add-constant", [x], [y], [c]), path)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_triton_repository(root: Path) -> Path:
    """The repository of the module docstring under ``root``."""
    (root / "simple" / "1").mkdir(parents=True)
    make_simple(root / "simple" / "1" / "model.onnx")
    write(root / "simple" / "config.pbtxt", SIMPLE_CONFIG)
    (root / "simple" / "warmup").mkdir()
    (root / "simple" / "warmup" / "ones.bin").write_bytes(np.ones(16, np.int32).tobytes())
    for cc, filename in PLAN_FILES.items():
        make_add_constant(root / "plan-cc" / "1" / filename, PLAN_CONSTANTS[cc])
    write(root / "plan-cc" / "config.pbtxt", PLAN_CONFIG)
    for version in (1, 2, 3):
        make_add_constant(root / "versioned" / str(version) / "model.onnx", 100.0 * version)
    write(root / "versioned" / "config.pbtxt", VERSIONED_CONFIG)
    make_add_constant(root / "stateful" / "1" / "model.onnx", 1.0)
    write(root / "stateful" / "config.pbtxt", STATEFUL_CONFIG)
    write(root / "pythonic" / "config.pbtxt", PYTHON_CONFIG)
    write(root / "pythonic" / "1" / "model.py", "class TritonPythonModel: pass\n")
    return root
