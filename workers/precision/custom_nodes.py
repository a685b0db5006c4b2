"""Nodes of custom operators, which every precision keeps in float32.

A custom-op library's kernels are its own (usually float32 only): float16 conversion and
INT8 quantization leave those nodes as they are, with casts or Q/DQ pairs around them.
They are found by domain: anything outside ONNX's and Microsoft's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnxruntime as ort

from workers.custom_ops import session_options

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def is_custom(node: onnx.NodeProto) -> bool:
    return node.domain not in STANDARD_DOMAINS


def name_custom_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the model's custom-operator nodes (top-level graph), naming those that have none
    (the converters exclude nodes by name), in place."""
    taken = {node.name for node in model.graph.node}
    names = []
    for index, node in enumerate(model.graph.node):
        if not is_custom(node):
            continue
        if not node.name:
            candidate = f"custom_{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
        names.append(node.name)
    return names


def type_custom_outputs(model: onnx.ModelProto, custom_ops: Sequence[str]) -> None:
    """Give the custom nodes' outputs their types in ``value_info`` (in place), as ONNX Runtime infers
    them with the libraries loaded: ONNX's shape inference knows no custom operator, and the float16
    converter casts back only the outputs it knows to be float."""
    typed = {v.name for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    wanted = [out for node in model.graph.node if is_custom(node) for out in node.output if out and out not in typed]
    if not wanted:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in wanted:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), session_options(custom_ops), providers=["CPUExecutionProvider"])
    for out in session.get_outputs():
        if out.name in wanted and out.type.startswith("tensor("):
            elem = onnx.TensorProto.DataType.Value(out.type[len("tensor("):-1].upper())
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(out.name, elem, None))
