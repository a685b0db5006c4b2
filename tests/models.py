"""Small ONNX models made with the onnx helper API, for protocol and datatype tests."""

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_add_sub(path: Path) -> Path:
    """Two FP32 inputs [N,4] -> sum and difference [N,4]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("sum", "diff")]
    return _save(helper.make_graph(nodes, "add-sub", [a, b], outs), path)


def make_fp16_scale(path: Path) -> Path:
    """FP16 [N,8] -> x * 2 (FP16)."""
    two = helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 8])
    return _save(helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "fp16-scale", [x], [y], [two]), path)


def make_int64_add(path: Path) -> Path:
    """INT64 [N,3] -> x + 7 (INT64)."""
    seven = helper.make_tensor("seven", TensorProto.INT64, [], [7])
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 3])
    return _save(helper.make_graph([helper.make_node("Add", ["x", "seven"], ["y"])], "int64-add", [x], [y], [seven]), path)


def make_heavy_mlp(path: Path, width: int = 2048, layers: int = 3) -> Path:
    """FP32 [N,64] -> `layers` Gemm(width) + Relu -> [N,10]: little to send, much to compute (overload tests)."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x, fan_in = [], [], "input", 64
    for i, fan_out in enumerate([width] * layers + [10]):
        inits += [numpy_helper.from_array((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32), f"w{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
        x = f"m{i}"
        if i < layers:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
        fan_in = fan_out
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    return _save(helper.make_graph(nodes, "heavy-mlp", [inp], [out], inits), path)


def make_simple(path: Path) -> Path:
    """Triton's example model "simple": INT32 INPUT0, INPUT1 [N,16] -> OUTPUT0 sum, OUTPUT1 difference."""
    ins = [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", 16]) for n in ("INPUT0", "INPUT1")]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    return _save(helper.make_graph(nodes, "simple", ins, outs), path)


def make_simple_string(path: Path) -> Path:
    """Triton's example "simple_string": BYTES INPUT0, INPUT1 [N,16] holding integers as text ->
    OUTPUT0 their sum, OUTPUT1 their difference, as text."""
    ins = [helper.make_tensor_value_info(n, TensorProto.STRING, ["N", 16]) for n in ("INPUT0", "INPUT1")]
    nodes = [helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
             helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
             helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"]),
             helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
             helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING)]
    outs = [helper.make_tensor_value_info(n, TensorProto.STRING, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    return _save(helper.make_graph(nodes, "simple_string", ins, outs), path)


def make_simple_identity(path: Path) -> Path:
    """Triton's example "simple_identity": BYTES INPUT0 [N, M] -> OUTPUT0, the same bytes."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["N", "M"])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["N", "M"])
    return _save(helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "simple_identity",
                                   [x], [y]), path)


def make_mixed_scale(path: Path) -> Path:
    """Two inputs of different types, one with a dynamic dimension besides the batch: FP32 x [N, D]
    and INT64 k [N, 1] -> y = x * k (FP32 [N, D])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"])
    nodes = [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "kf"], ["y"])]
    return _save(helper.make_graph(nodes, "mixed-scale", [x, k], [y]), path)


def make_custom_op_mlp(path: Path) -> Path:
    """FP32 [N,16] -> MatMul + Add -> NegPos (onnxruntime-extensions' ai.onnx.contrib custom op, two
    float outputs) -> Relu(pos) @ W2 + neg @ W3 -> logits [N,4]: standard float ops around a custom one,
    so that float16 and int8 have something to convert and quantize beside it."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("W1", rng.standard_normal((16, 32)) * 0.5), ("b1", rng.standard_normal(32) * 0.1),
        ("W2", rng.standard_normal((32, 4)) * 0.5), ("W3", rng.standard_normal((32, 4)) * 0.5))]
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("NegPos", ["h1"], ["neg", "pos"], domain="ai.onnx.contrib", name="negpos"),
        helper.make_node("Relu", ["pos"], ["relu"], name="relu"),
        helper.make_node("MatMul", ["relu", "W2"], ["a"], name="mm2"),
        helper.make_node("MatMul", ["neg", "W3"], ["b"], name="mm3"),
        helper.make_node("Add", ["a", "b"], ["logits"], name="add2"),
    ]
    graph = helper.make_graph(nodes, "custom_op_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)],
                              ir_version=8)
    onnx.save(model, path)  # onnx.checker knows no custom domain
    return path


def custom_op_rows(rows: int, seed: int = 0):
    """Inputs for make_custom_op_mlp: four clusters, so that its top-1 answers have margins to keep."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(42).standard_normal((4, 16)) * 2
    return (centers[rng.integers(0, 4, rows)] + rng.standard_normal((rows, 16)) * 0.3).astype(np.float32)
