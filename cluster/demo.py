"""The demo models: ``digits-mlp`` (scikit-learn MLP on the digits data) and ``cnn-small``.

Deterministic: fixed seeds and a fixed train/test split, so tests can compare
served outputs with scikit-learn and with ONNX Runtime run directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
TEST_SIZE = 0.25


def digits_split():
    """(X_train, X_test, y_train, y_test) of scikit-learn's bundled digits, float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    return train_test_split(X, digits.target, test_size=TEST_SIZE, random_state=SEED, stratify=digits.target)


def train_digits_mlp():
    from sklearn.neural_network import MLPClassifier

    X_train, _, y_train, _ = digits_split()
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED)
    clf.fit(X_train, y_train)
    return clf


def make_digits_mlp(path: Path) -> Path:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    clf = train_digits_mlp()
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    # skl2onnx names the outputs 'label' and 'probabilities' already; keep that contract explicit.
    names = [o.name for o in model.graph.output]
    if names != ["label", "probabilities"]:
        raise RuntimeError(f"skl2onnx produced outputs {names}, expected ['label', 'probabilities']")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def make_cnn_small(path: Path) -> Path:
    """Conv(3->16,3x3)-Relu-MaxPool-Conv(16->32)-Relu-MaxPool-Flatten-Gemm(->10), input [N,3,64,64]."""
    rng = np.random.default_rng(SEED)

    def weight(name, shape, fan_in):
        return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)

    inits = [
        weight("conv1_w", (16, 3, 3, 3), 27),
        numpy_helper.from_array(np.zeros(16, np.float32), "conv1_b"),
        weight("conv2_w", (32, 16, 3, 3), 144),
        numpy_helper.from_array(np.zeros(32, np.float32), "conv2_b"),
        weight("fc_w", (10, 32 * 16 * 16), 32 * 16 * 16),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn-small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    # IR version 8 (ONNX 1.13) so every ONNX Runtime and TensorRT parser we support reads it.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="forward-fleet", ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def make_big_mlp(path: Path, width: int = 4096, layers: int = 4, seed: int = 0) -> Path:
    """A compute-heavy MLP for GPUs: `layers` x (Gemm width x width + Relu), input/output [N, width]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        last = i == layers - 1
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], ["output" if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"]))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "big-mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


DEMO_MODELS = {
    "digits-mlp": (make_digits_mlp, 256),  # builder, max batch
    "cnn-small": (make_cnn_small, 64),
}


def make_demo_models(out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    made = {}
    for name, (builder, _) in DEMO_MODELS.items():
        path = out / f"{name}.onnx"
        if force or not path.exists():
            builder(path)
        made[name] = path
    return made
