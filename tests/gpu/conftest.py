import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_big_mlp(path: Path, width: int = 4096, layers: int = 4, seed: int = 0) -> Path:
    """A compute-heavy MLP: `layers` x Gemm(width x width) + Relu, input [N, width]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        out = "output" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}" if i < layers - 1 else out]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        x = out
    graph = helper.make_graph(nodes, "big-mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def big_mlp(tmp_path_factory):
    return make_big_mlp(tmp_path_factory.mktemp("big") / "big-mlp.onnx")


@pytest.fixture(scope="session")
def results_dir():
    """Where GPU test numbers go ($OUT on the device machine, else a temp dir)."""
    out = Path(os.environ.get("OUT") or "/tmp/fleet-gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    return out
