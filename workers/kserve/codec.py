"""KServe v2 request bodies -> ``InferRequest``; outputs -> response bodies.

Supports JSON and Triton's binary tensor extension (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data``, ``binary_data_output``), its system shared
memory extension (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``: the tensor's bytes stay in a registered region, see
``workers/shm.py`` and ``shm_io``) and gzip/deflate request bodies.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from workers.errors import InvalidInput, PayloadTooLarge
from workers.shm import ShmRef
from workers.tensors import DATATYPE_TO_NUMPY, numpy_to_datatype

HEADER_LENGTH = "inference-header-content-length"
MAX_DIMENSION = 1 << 31
_KIND_OK = {
    "BOOL": "b",
    "UINT8": "iu", "UINT16": "iu", "UINT32": "iu", "UINT64": "iu",
    "INT8": "iu", "INT16": "iu", "INT32": "iu", "INT64": "iu",
    "FP16": "iuf", "FP32": "iuf", "FP64": "iuf",
}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    shm: ShmRef | None = None  # written into a shared memory region instead of the answer


@dataclass(frozen=True)
class ShmInput:
    """An input whose bytes lie in a shared memory region (read by the worker that has it)."""

    ref: ShmRef
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShmWritten:
    """An output the worker wrote into a shared memory region: the answer carries only this."""

    ref: ShmRef
    datatype: str
    shape: tuple[int, ...]


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: all outputs
    binary_output: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)
    shm_inputs: dict[str, ShmInput] = field(default_factory=dict)  # not in ``inputs`` until read

    def regions(self) -> set[str]:
        """The shared memory regions this request names (inputs and outputs)."""
        names = {s.ref.region for s in self.shm_inputs.values()}
        return names | {o.shm.region for o in self.outputs or () if o.shm is not None}


# ---- bodies -------------------------------------------------------------------------
def read_infer_request(body: bytes, content_encoding: str | None, header_length: str | None, *, limit: int) -> InferRequest:
    """An infer request body as it came over HTTP -> a checked InferRequest (400/413 otherwise)."""
    return decode_request(decompress(body, content_encoding, limit), header_length, limit=limit)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    try:
        if encoding == "gzip":
            data = gzip.decompress(body)
        elif encoding == "deflate":
            d = zlib.decompressobj()
            data = d.decompress(body, limit + 1)
        else:
            raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)")
    except (OSError, zlib.error, EOFError) as exc:
        raise InvalidInput(f"request body is not valid {encoding}: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return data


def split_body(body: bytes, header_length: str | int | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) of a body with Triton's binary extension."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except (TypeError, ValueError):
        raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
    if not 0 <= n <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def decode_request(body: bytes, header_length: str | int | None = None, *, limit: int = 64 << 20) -> InferRequest:
    """Parse a KServe v2 infer request body (already decompressed)."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes is over the limit of {limit} bytes")
    header_bytes, binary = split_body(body, header_length)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    reader = _BinaryReader(binary)
    request = InferRequest(inputs={})
    for i, item in enumerate(raw_inputs):
        _decode_input(i, item, reader, request)
    if reader.left:
        raise InvalidInput(f"{reader.left} bytes of binary data follow the inputs but no input claims them")
    request.outputs = _decode_outputs(header.get("outputs"))
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string (the protocol says so), got {type(request_id).__name__}: {request_id!r}")
    request.id = request_id
    request.binary_output = bool(params.get("binary_data_output", False))
    request.parameters = params
    return request


class _BinaryReader:
    """Hands out the binary section of a body input by input, in order."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.offset = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def take(self, name: str, size: int) -> memoryview:
        """The next ``size`` bytes, not copied: the tensor made of them is a view of the body."""
        if size > self.left:
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the body ({self.left} bytes left)")
        raw = self.data[self.offset:self.offset + size]
        self.offset += size
        return raw


def _decode_input(index: int, item, reader: _BinaryReader, request: InferRequest) -> None:
    """One entry of 'inputs' into ``request.inputs`` (or ``shm_inputs``)."""
    if not isinstance(item, dict):
        raise InvalidInput(f"inputs[{index}] must be an object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a 'name'")
    if name in request.inputs or name in request.shm_inputs:
        raise InvalidInput(f"input '{name}' appears twice")
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(
            f"input '{name}': datatype {datatype!r} is not a KServe v2 datatype ({', '.join(DATATYPE_TO_NUMPY)})")
    shape = parse_shape(name, item.get("shape"))
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    ref = ShmRef.from_params(params, f"input '{name}'")
    if ref is not None:
        if "data" in item or size is not None:
            raise InvalidInput(f"input '{name}': names a shared memory region and also carries data")
        check_shm_size(name, datatype, shape, ref)
        request.shm_inputs[name] = ShmInput(ref, datatype, shape)
    elif size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        if "data" in item:
            raise InvalidInput(f"input '{name}': has both 'data' and binary_data_size")
        request.inputs[name] = decode_binary_tensor(name, datatype, shape, reader.take(name, size))
    elif "data" not in item:
        raise InvalidInput(f"input '{name}': needs 'data' or parameters.binary_data_size")
    else:
        request.inputs[name] = _decode_json_data(name, datatype, shape, item["data"])


def _decode_outputs(raw_outputs) -> list[RequestedOutput] | None:
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise InvalidInput("'outputs' must be a list")
    outputs = []
    for i, item in enumerate(raw_outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] needs a 'name'")
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise InvalidInput(f"output '{item['name']}': 'parameters' must be an object")
        shm = ShmRef.from_params(p, f"output '{item['name']}'")
        if shm is not None and p.get("binary_data"):
            raise InvalidInput(f"output '{item['name']}': asks for binary data and for a shared memory region")
        outputs.append(RequestedOutput(item["name"], bool(p.get("binary_data", False)), shm))
    return outputs


# ---- tensors ------------------------------------------------------------------------
def parse_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers, got {shape!r}")
    for d in shape:
        if d < 0:
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        if d > MAX_DIMENSION:
            raise InvalidInput(f"input '{name}': shape {shape} has an absurd dimension")
    return tuple(shape)


def element_count(shape: "tuple[int, ...] | list[int]") -> int:
    return math.prod(shape) if shape else 1


def decode_bytes_tensor(name: str, raw: bytes, count: int) -> np.ndarray:
    """``count`` BYTES elements, each a 4-byte little-endian length and then the bytes."""
    items = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input '{name}': BYTES data ends early")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInput(f"input '{name}': BYTES element of {n} bytes runs past the data")
        items.append(raw[offset : offset + n])
        offset += n
    if offset != len(raw):
        raise InvalidInput(f"input '{name}': {len(raw) - offset} bytes left over after {count} BYTES elements")
    return np.array(items, dtype=np.object_)


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def decode_binary_tensor(name: str, datatype: str, shape: "tuple[int, ...]", raw: "bytes | memoryview") -> np.ndarray:
    """A tensor from its raw little-endian bytes (a body's binary section or a shared memory region)."""
    if datatype == "BYTES":
        return decode_bytes_tensor(name, bytes(raw), element_count(shape)).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}': binary_data_size {len(raw)} does not match shape {list(shape)} of {datatype} "
            f"({expected} bytes)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(DATATYPE_TO_NUMPY[datatype], copy=False)


def _decode_json_data(name: str, datatype: str, shape: tuple[int, ...], data) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        try:
            flat = np.array(data, dtype=np.object_).reshape(-1)
        except ValueError:
            raise InvalidInput(f"input '{name}': 'data' is ragged") from None
        array = np.array([x.encode() if isinstance(x, str) else x for x in flat], dtype=np.object_)
    else:
        if datatype == "FP16":
            raise InvalidInput(f"input '{name}': FP16 travels only as binary data (binary tensor extension)")
        try:
            array = np.asarray(data)
        except ValueError:
            raise InvalidInput(f"input '{name}': 'data' is ragged (nested lists of different lengths)") from None
        if array.size and array.dtype.kind not in _KIND_OK[datatype]:
            raise InvalidInput(
                f"input '{name}': 'data' holds {array.dtype.kind!r}-kind values ({array.dtype}), "
                f"which are not {datatype}"
            )
        if datatype.startswith(("INT", "UINT")) and array.size:
            info = np.iinfo(DATATYPE_TO_NUMPY[datatype])
            if array.min() < info.min or array.max() > info.max:
                raise InvalidInput(f"input '{name}': values out of range for {datatype}")
        array = array.astype(DATATYPE_TO_NUMPY[datatype])
    if array.size != element_count(shape):
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {element_count(shape)} values, 'data' has {array.size}"
        )
    return array.reshape(shape)


def check_shm_size(name: str, datatype: str, shape: tuple[int, ...], ref: ShmRef) -> None:
    if datatype == "BYTES":
        return  # serialized strings: their length is known once read
    expected = element_count(shape) * DATATYPE_TO_NUMPY[datatype].itemsize
    if ref.byte_size != expected:
        raise InvalidInput(
            f"input '{name}': shared_memory_byte_size {ref.byte_size} does not match shape {list(shape)} of "
            f"{datatype} ({expected} bytes)"
        )


def check_finite(inputs: dict[str, np.ndarray]) -> None:
    """400 for NaN or Inf in float inputs (when the model config asks for it)."""
    for name, array in inputs.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InvalidInput(f"input '{name}': {bad} NaN or Inf value(s); this model's config rejects non-finite inputs")


# ---- responses ----------------------------------------------------------------------
def _json_ready(array: np.ndarray) -> list:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    return array.reshape(-1).tolist()


def encode_response(
    model: str,
    version: str,
    outputs: "dict[str, np.ndarray | ShmWritten]",
    request: InferRequest,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; binary where the request asked for it (outputs already
    written into shared memory, ``shm_io.write_shm_outputs``, are only described)."""
    header, blobs, headers = encode_response_parts(model, version, outputs, request, parameters)
    return b"".join([header, *blobs]) if blobs else header, headers


def encode_response_parts(
    model: str,
    version: str,
    outputs: "dict[str, np.ndarray | ShmWritten]",
    request: InferRequest,
    parameters: dict | None = None,
) -> "tuple[bytes, list[bytes | memoryview], dict[str, str]]":
    """``encode_response`` as the JSON header and the binary tensors that follow it, views of the
    outputs themselves: a server writes them to its socket as they are, not joined first."""
    if request.outputs is None:
        wanted = [RequestedOutput(name, request.binary_output) for name in outputs]
    else:
        wanted = request.outputs
        unknown = [o.name for o in wanted if o.name not in outputs]
        if unknown:
            raise InvalidInput(
                f"requested output {', '.join(repr(u) for u in unknown)} does not exist; "
                f"the model's outputs are {', '.join(repr(n) for n in outputs)}"
            )
    blobs: "list[bytes | memoryview]" = []
    out_list = [written_entry(req.name, value) if isinstance(value := outputs[req.name], ShmWritten)
                else tensor_entry(req.name, np.asarray(value), req.binary, blobs) for req in wanted]
    body = {"model_name": model, "model_version": version, "outputs": out_list}
    if request.id is not None:
        body["id"] = request.id
    if parameters:
        body["parameters"] = parameters
    header, headers = header_of(body, blobs)
    return header, blobs, headers


def tensor_entry(name: str, array: np.ndarray, binary: bool, blobs: "list[bytes | memoryview]") -> dict:
    """One tensor's JSON entry; binary data (always for FP16) is appended to ``blobs``."""
    datatype = numpy_to_datatype(array.dtype)
    entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary or datatype == "FP16":
        if datatype == "BYTES":
            blob = encode_bytes_tensor(array)
        else:  # a view of the array's own bytes: copied once, into the socket or the joined body
            little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            blob = memoryview(little_endian.reshape(-1).view(np.uint8))
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    else:
        entry["data"] = _json_ready(array)
    return entry


def written_entry(name: str, tensor: ShmWritten) -> dict:
    """An output written into shared memory, as Triton answers it: no data and no parameters (the
    client knows where it asked for it; Triton's C++ client reads any output's ``parameters`` as
    binary data)."""
    return {"name": name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def shm_entry(name: str, tensor: "ShmWritten | ShmInput") -> dict:
    """The entry of a tensor that lies in a shared memory region: only where it is."""
    return {"name": name, "datatype": tensor.datatype, "shape": list(tensor.shape), "parameters": tensor.ref.to_params()}


def with_blobs(body: dict, blobs: "list[bytes | memoryview]") -> tuple[bytes, dict[str, str]]:
    """The JSON header, followed by the binary tensors if there are any, as one body."""
    header, headers = header_of(body, blobs)
    return b"".join([header, *blobs]) if blobs else header, headers


def header_of(body: dict, blobs: "list[bytes | memoryview]") -> tuple[bytes, dict[str, str]]:
    """The JSON header of a body whose binary tensors (``blobs``) follow it, and the HTTP headers."""
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
