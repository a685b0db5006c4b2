"""Serving an ONNX model with the inputs and outputs its Triton configuration declares.

Triton's ``reshape`` says: clients send (and get) ``dims``, the model takes (and gives)
``reshape.shape``. The fleet does it in the model itself, once, at import: a Reshape node
in front of each such input and behind each such output, so that every path (HTTP, gRPC,
shared memory, batch jobs, the dynamic batcher, the config and metadata endpoints) sees the
declared shapes with no reshaping per request. Outputs the configuration does not list are
dropped, as Triton returns only those.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.kserve.proto import model_config_pb2 as mc

SUFFIX = "__fleet_model_side"


def _set_shape(value_info: onnx.ValueInfoProto, dims: list[int], batched: bool) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for i, d in enumerate(([-1] if batched else []) + dims):
        dim = shape.dim.add()
        if d >= 0:
            dim.dim_value = d
        else:
            dim.dim_param = "batch" if batched and i == 0 else f"{value_info.name}_{i}"


def _shape_constant(name: str, dims: list[int], batched: bool) -> onnx.TensorProto:
    # Reshape's 0 keeps the input's dimension there: the batch, whatever its size
    return numpy_helper.from_array(np.array(([0] if batched else []) + dims, dtype=np.int64), name)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def edit_io(model: onnx.ModelProto, config: mc.ModelConfig) -> bool:
    """Apply the configuration's reshapes and output list to ``model`` in place; whether anything changed."""
    graph = model.graph
    batched = config.max_batch_size > 0
    changed = False
    front, back = [], []
    inputs = {v.name: v for v in graph.input}
    for tensor in config.input:
        if not tensor.HasField("reshape") or tensor.name not in inputs:
            continue
        inner = tensor.name + SUFFIX
        _rename_uses(graph, tensor.name, inner)
        graph.initializer.append(_shape_constant(inner + "_shape", list(tensor.reshape.shape), batched))
        front.append(helper.make_node("Reshape", [tensor.name, inner + "_shape"], [inner], name=inner + "_reshape"))
        _set_shape(inputs[tensor.name], list(tensor.dims), batched)
        changed = True
    outputs = {v.name: v for v in graph.output}
    for tensor in config.output:
        if not tensor.HasField("reshape") or tensor.name not in outputs:
            continue
        inner = tensor.name + SUFFIX
        for node in graph.node:
            node.output[:] = [inner if name == tensor.name else name for name in node.output]
        _rename_uses(graph, tensor.name, inner)
        graph.initializer.append(_shape_constant(inner + "_shape", list(tensor.dims), batched))
        back.append(helper.make_node("Reshape", [inner, inner + "_shape"], [tensor.name], name=inner + "_reshape"))
        _set_shape(outputs[tensor.name], list(tensor.dims), batched)
        changed = True
    listed = {t.name for t in config.output}
    if listed and any(v.name not in listed for v in graph.output):
        kept = [v for v in graph.output if v.name in listed]
        del graph.output[:]
        graph.output.extend(kept)
        changed = True
    if front or back:
        nodes = front + list(graph.node) + back
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def edited_source(data: bytes, config: mc.ModelConfig) -> bytes | None:
    """The ONNX model's bytes served as ``config`` declares its IO, or None when it already is."""
    model = onnx.load_model_from_string(data)
    if not edit_io(model, config):
        return None
    onnx.checker.check_model(model)
    return model.SerializeToString()


def is_onnx(data: bytes) -> bool:
    """Whether a "plan" file is an ONNX model (what a simulated fleet executes in place of a plan)."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # DecodeError and friends: not ONNX, as a real plan is not
        return False
    return model.ir_version > 0 and len(model.graph.output) > 0
