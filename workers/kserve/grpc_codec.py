"""KServe v2 over gRPC (``inference.GRPCInferenceService``): messages <-> the fleet's tensors.

Both directions, as ``codec`` and ``client_codec`` are for HTTP:

- ``read_grpc_request``: a ``ModelInferRequest`` -> a checked ``InferRequest`` (typed
  ``contents`` or ``raw_input_contents``, BYTES too, shared memory parameters);
- ``grpc_response``: outputs -> a ``ModelInferResponse`` (``raw_output_contents``, one entry
  per output, empty for an output written into shared memory, as Triton sends them);
- ``grpc_request`` and ``read_grpc_response``: the client's side (``FleetClient(protocol="grpc")``);
- ``model_name_of``: the model and version of a serialized request, read from its first
  fields without parsing the rest (the fleet's gRPC router forwards the bytes as they are).
"""

from __future__ import annotations

import numpy as np

from workers.errors import InvalidInput, PayloadTooLarge
from workers.kserve.codec import (
    InferRequest,
    RequestedOutput,
    ShmInput,
    ShmWritten,
    check_shm_size,
    decode_binary_tensor,
    element_count,
    encode_bytes_tensor,
    parse_shape,
)
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.shm import ShmRef
from workers.tensors import DATATYPE_TO_NUMPY, numpy_to_datatype

# The typed ``contents`` field of each datatype (FP16 has none: raw only, as in Triton).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


# ---- parameters ------------------------------------------------------------------
def params_dict(params) -> dict:
    """A map of ``InferParameter`` -> plain values."""
    out = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def set_params(target, values: dict) -> None:
    """Plain values -> a map of ``InferParameter`` (bool, int, float, str)."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


# ---- the server's side -------------------------------------------------------------
def read_grpc_request(message: pb.ModelInferRequest, *, limit: int = 64 << 20) -> InferRequest:
    """A ``ModelInferRequest`` -> a checked InferRequest (InvalidInput naming the problem)."""
    if not message.inputs:
        raise InvalidInput("request needs at least one input")
    raw = list(message.raw_input_contents)
    if sum(len(r) for r in raw) > limit:
        raise PayloadTooLarge(f"raw_input_contents are over the limit of {limit} bytes")
    request = InferRequest(inputs={}, id=message.id or None, parameters=params_dict(message.parameters))
    taken = 0
    for i, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}] needs a 'name'")
        if name in request.inputs or name in request.shm_inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        datatype = tensor.datatype
        if datatype not in DATATYPE_TO_NUMPY:
            raise InvalidInput(
                f"input '{name}': datatype {datatype!r} is not a KServe v2 datatype ({', '.join(DATATYPE_TO_NUMPY)})")
        shape = parse_shape(name, list(tensor.shape))
        ref = ShmRef.from_params(params_dict(tensor.parameters), f"input '{name}'")
        if ref is not None:
            check_shm_size(name, datatype, shape, ref)
            request.shm_inputs[name] = ShmInput(ref, datatype, shape)
        elif tensor.HasField("contents"):
            request.inputs[name] = _typed_contents(name, datatype, shape, tensor.contents)
        elif taken < len(raw):
            request.inputs[name] = decode_binary_tensor(name, datatype, shape, raw[taken])
            taken += 1
        else:
            raise InvalidInput(f"input '{name}': needs contents, raw_input_contents or a shared memory region")
    if taken != len(raw):
        raise InvalidInput(f"{len(raw) - taken} raw_input_contents entries follow the inputs but no input claims them")
    request.outputs = [RequestedOutput(o.name, True, ShmRef.from_params(params_dict(o.parameters), f"output '{o.name}'"))
                       for o in message.outputs] or None
    return request


def _typed_contents(name: str, datatype: str, shape: tuple[int, ...], contents) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} travels only in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': shape {list(shape)} needs {count} values, contents has {len(values)}")
    if datatype == "BYTES":
        return np.array(list(values), dtype=np.object_).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    array = np.array(values)
    if datatype.startswith(("INT", "UINT")) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input '{name}': values out of range for {datatype}")
    return array.astype(dtype).reshape(shape)


def _raw(array: np.ndarray) -> bytes:
    if numpy_to_datatype(array.dtype) == "BYTES":
        return encode_bytes_tensor(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def grpc_response(model: str, version: str, outputs: "dict[str, np.ndarray | ShmWritten]", request: InferRequest,
                  parameters: dict | None = None) -> pb.ModelInferResponse:
    """A ``ModelInferResponse``: every requested output (all when none was named) as raw bytes, in order."""
    names = [o.name for o in request.outputs] if request.outputs is not None else list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise InvalidInput(f"requested output {', '.join(repr(u) for u in unknown)} does not exist; "
                           f"the model's outputs are {', '.join(repr(n) for n in outputs)}")
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    set_params(response.parameters, parameters or {})
    for name in names:
        value = outputs[name]
        tensor = response.outputs.add(name=name)
        if isinstance(value, ShmWritten):
            tensor.datatype, tensor.shape[:] = value.datatype, list(value.shape)
            set_params(tensor.parameters, value.ref.to_params())
            response.raw_output_contents.append(b"")  # keeps the entries aligned with the outputs
        else:
            array = np.asarray(value)
            tensor.datatype, tensor.shape[:] = numpy_to_datatype(array.dtype), list(array.shape)
            response.raw_output_contents.append(_raw(array))
    return response


# ---- the client's side -------------------------------------------------------------
def grpc_request(model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
                 outputs: list[str] | None = None, shm_inputs: dict[str, ShmInput] | None = None,
                 shm_outputs: dict[str, ShmRef] | None = None) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` with raw inputs (those in shared memory only described)."""
    message = pb.ModelInferRequest(model_name=model, model_version=version or "")
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        message.inputs.add(name=name, datatype=numpy_to_datatype(array.dtype), shape=list(array.shape))
        message.raw_input_contents.append(_raw(array))
    for name, item in (shm_inputs or {}).items():
        tensor = message.inputs.add(name=name, datatype=item.datatype, shape=list(item.shape))
        set_params(tensor.parameters, item.ref.to_params())
    shm_outputs = shm_outputs or {}
    for name in outputs or ():
        out = message.outputs.add(name=name)
        if name in shm_outputs:
            set_params(out.parameters, shm_outputs[name].to_params())
    return message


def read_grpc_response(response: pb.ModelInferResponse) -> tuple[dict, dict[str, np.ndarray], dict[str, ShmWritten]]:
    """(parameters, outputs that came in the answer, outputs the server wrote into shared memory)."""
    arrays: dict[str, np.ndarray] = {}
    written: dict[str, ShmWritten] = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        ref = ShmRef.from_params(params_dict(tensor.parameters), f"output '{tensor.name}'")
        if ref is not None:
            written[tensor.name] = ShmWritten(ref, tensor.datatype, shape)
        elif i < len(response.raw_output_contents):
            raw = response.raw_output_contents[i]
            arrays[tensor.name] = decode_binary_tensor(tensor.name, tensor.datatype, shape, raw).copy()
        else:
            arrays[tensor.name] = _typed_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return params_dict(response.parameters), arrays, written


# ---- routing -------------------------------------------------------------------------
def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidInput("the request is not a valid ModelInferRequest (truncated varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def model_name_of(data: bytes) -> tuple[str, str]:
    """(model_name, model_version) of a serialized ``ModelInferRequest`` (fields 1 and 2), skipping
    every other top-level field by its length: the tensors are never parsed or copied."""
    name, version = "", ""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise InvalidInput("the request is not a valid ModelInferRequest (a field runs past its end)")
            if number in (1, 2):
                try:
                    text = data[pos:pos + size].decode()
                except UnicodeDecodeError:
                    raise InvalidInput("model_name and model_version must be UTF-8") from None
                name, version = (text, version) if number == 1 else (name, text)
            pos += size
        else:
            raise InvalidInput(f"the request is not a valid ModelInferRequest (wire type {wire})")
    return name, version
