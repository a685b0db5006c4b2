"""KServe v2 / Open Inference Protocol: decode requests, encode responses.

Knows nothing about the web framework: bytes and headers in, bytes and headers
out. Supports JSON and Triton's binary tensor extension
(``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``), its system shared memory extension (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset``: the tensor's bytes stay in a
registered region, see ``workers/shm.py``) and gzip/deflate request bodies.
"""

from __future__ import annotations

import gzip
import hmac
import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from workers.errors import InvalidInput, PayloadTooLarge, SharedMemoryError, Unauthorized
from workers.shm import SharedMemoryRegistry, ShmRef
from workers.tensors import DATATYPE_TO_NUMPY, TensorSpec, batch_shape, numpy_to_datatype

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


def check_bearer(authorization: str | None, token: str) -> None:
    """401 unless ``authorization`` is ``Bearer <token>`` (constant-time compare)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("this call needs 'Authorization: Bearer <token>' with the fleet's auth token")


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading a body whose declared length is over the limit."""
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"request body of {content_length} bytes is over the limit of {limit} bytes")


def read_infer_request(
    body: bytes, content_encoding: str | None, header_length: str | None, *, limit: int, reject_non_finite: bool
) -> "InferRequest":
    """An infer request body as it came over HTTP -> a checked InferRequest (400/413 otherwise)."""
    parsed = decode_request(decompress(body, content_encoding, limit), header_length, limit=limit)
    if reject_non_finite:
        check_finite(parsed.inputs)
    return parsed


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


def _parse_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers, got {shape!r}")
    for d in shape:
        if d < 0:
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        if d > MAX_DIMENSION:
            raise InvalidInput(f"input '{name}': shape {shape} has an absurd dimension")
    return tuple(shape)


def _element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _decode_bytes_tensor(name: str, raw: bytes, count: int) -> np.ndarray:
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
    if array.size != _element_count(shape):
        raise InvalidInput(
            f"input '{name}': shape {list(shape)} needs {_element_count(shape)} values, 'data' has {array.size}"
        )
    return array.reshape(shape)


def decode_request(
    body: bytes,
    header_length: str | int | None = None,
    *,
    limit: int = 64 << 20,
) -> InferRequest:
    """Parse a KServe v2 infer request body (already decompressed)."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes is over the limit of {limit} bytes")
    if header_length is not None:
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes"
            )
        header_bytes, binary = body[:n], memoryview(body)[n:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    shm_inputs: dict[str, ShmInput] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{i}] needs a 'name'")
        if name in inputs or name in shm_inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
            raise InvalidInput(
                f"input '{name}': datatype {datatype!r} is not a KServe v2 datatype "
                f"({', '.join(DATATYPE_TO_NUMPY)})"
            )
        shape = _parse_shape(name, item.get("shape"))
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"input '{name}': 'parameters' must be an object")
        size = params.get("binary_data_size")
        ref = ShmRef.from_params(params, f"input '{name}'")
        if ref is not None:
            if "data" in item or size is not None:
                raise InvalidInput(f"input '{name}': names a shared memory region and also carries data")
            _check_shm_size(name, datatype, shape, ref)
            shm_inputs[name] = ShmInput(ref, datatype, shape)
            continue
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidInput(f"input '{name}': has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
            count = _element_count(shape)
            if datatype == "BYTES":
                array = _decode_bytes_tensor(name, raw, count).reshape(shape)
            else:
                dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
                if size != count * dtype.itemsize:
                    raise InvalidInput(
                        f"input '{name}': binary_data_size {size} does not match shape {list(shape)} of "
                        f"{datatype} ({count * dtype.itemsize} bytes)"
                    )
                array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(DATATYPE_TO_NUMPY[datatype], copy=False)
        else:
            if "data" not in item:
                raise InvalidInput(f"input '{name}': needs 'data' or parameters.binary_data_size")
            array = _decode_json_data(name, datatype, shape, item["data"])
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs but no input claims them")

    outputs = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
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
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = header.get("id")
    return InferRequest(
        inputs=inputs,
        id=str(request_id) if request_id is not None else None,
        outputs=outputs,
        binary_output=bool(params.get("binary_data_output", False)),
        parameters=params,
        shm_inputs=shm_inputs,
    )


def _check_shm_size(name: str, datatype: str, shape: tuple[int, ...], ref: ShmRef) -> None:
    if datatype == "BYTES":
        return  # serialized strings: their length is known once read
    expected = _element_count(shape) * DATATYPE_TO_NUMPY[datatype].itemsize
    if ref.byte_size != expected:
        raise InvalidInput(
            f"input '{name}': shared_memory_byte_size {ref.byte_size} does not match shape {list(shape)} of "
            f"{datatype} ({expected} bytes)"
        )


def shm_feeds(request: InferRequest, registry: SharedMemoryRegistry,
              reject_non_finite: bool = False) -> dict[str, np.ndarray]:
    """All inputs of ``request``, those in shared memory read in place (no copy); with
    ``reject_non_finite``, those are checked as ``read_infer_request`` checked the others."""
    if not request.shm_inputs:
        return request.inputs
    feeds = dict(request.inputs)
    for name, item in request.shm_inputs.items():
        buf = registry.buffer(item.ref, f"input '{name}'")
        if item.datatype == "BYTES":
            feeds[name] = _decode_bytes_tensor(name, bytes(buf), _element_count(item.shape)).reshape(item.shape)
        else:
            dtype = DATATYPE_TO_NUMPY[item.datatype].newbyteorder("<")
            feeds[name] = np.frombuffer(buf, dtype=dtype).reshape(item.shape).astype(DATATYPE_TO_NUMPY[item.datatype],
                                                                                 copy=False)
    if reject_non_finite:
        check_finite({name: feeds[name] for name in request.shm_inputs})
    return feeds


def shm_output_arrays(request: InferRequest, registry: SharedMemoryRegistry, specs: "tuple[TensorSpec, ...]",
                      rows: int) -> dict[str, np.ndarray]:
    """Arrays over the shared memory where ``request`` wants its outputs, for an engine to write
    into: those whose shape follows from the model (``-1`` only in the first dimension, which is
    ``rows``) and that fit. ``write_shm_outputs`` copies the others."""
    by_name = {s.name: s for s in specs}
    arrays = {}
    for o in request.outputs or ():
        spec = by_name.get(o.name)
        if o.shm is None or spec is None or spec.datatype == "BYTES":
            continue
        shape = batch_shape(spec.shape, rows)
        if shape is None:
            continue
        nbytes = math.prod(shape) * spec.numpy_dtype.itemsize
        if nbytes > o.shm.byte_size:
            continue
        buf = registry.buffer(ShmRef(o.shm.region, nbytes, o.shm.offset), f"output '{o.name}'")
        arrays[o.name] = np.frombuffer(buf, dtype=spec.numpy_dtype).reshape(shape)
    return arrays


def write_shm_outputs(request: InferRequest, outputs: dict[str, np.ndarray],
                      registry: SharedMemoryRegistry) -> dict[str, "np.ndarray | ShmWritten"]:
    """Copy the outputs that ``request`` wants in shared memory there; the rest stay as they are."""
    wanted = {o.name: o.shm for o in request.outputs or () if o.shm is not None}
    if not wanted:
        return outputs
    result: dict[str, np.ndarray | ShmWritten] = dict(outputs)
    for name, ref in wanted.items():
        if name not in outputs:
            continue  # encode_response names the unknown output
        array = np.asarray(outputs[name])
        datatype = numpy_to_datatype(array.dtype)
        if datatype == "BYTES":
            data = np.frombuffer(encode_bytes_tensor(array), dtype=np.uint8)
        else:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        if data.size > ref.byte_size:
            raise SharedMemoryError(
                f"output '{name}' needs {data.size} bytes ({datatype} {list(array.shape)}); shared memory region "
                f"'{ref.region}' was given {ref.byte_size} (shared_memory_byte_size)"
            )
        target = np.frombuffer(registry.buffer(ShmRef(ref.region, data.size, ref.offset), f"output '{name}'"), np.uint8)
        if target.ctypes.data != data.ctypes.data:  # not already written there by the engine
            target[:] = data
        result[name] = ShmWritten(ShmRef(ref.region, data.size, ref.offset), datatype, tuple(array.shape))
    return result


def check_finite(inputs: dict[str, np.ndarray]) -> None:
    """400 for NaN or Inf in float inputs (when the model config asks for it)."""
    for name, array in inputs.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InvalidInput(f"input '{name}': {bad} NaN or Inf value(s); this model's config rejects non-finite inputs")


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
    written into shared memory, ``write_shm_outputs``, are only described)."""
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
    blobs: list[bytes] = []
    out_list = [_shm_entry(req.name, value) if isinstance(value := outputs[req.name], ShmWritten)
                else _tensor_entry(req.name, np.asarray(value), req.binary, blobs) for req in wanted]
    body = {"model_name": model, "model_version": version, "outputs": out_list}
    if request.id is not None:
        body["id"] = request.id
    if parameters:
        body["parameters"] = parameters
    return _with_blobs(body, blobs)


def _tensor_entry(name: str, array: np.ndarray, binary: bool, blobs: list[bytes]) -> dict:
    """One tensor's JSON entry; binary data (always for FP16) is appended to ``blobs``."""
    datatype = numpy_to_datatype(array.dtype)
    entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary or datatype == "FP16":
        if datatype == "BYTES":
            blob = encode_bytes_tensor(array)
        else:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    else:
        entry["data"] = _json_ready(array)
    return entry


def _shm_entry(name: str, written: ShmWritten) -> dict:
    return {"name": name, "datatype": written.datatype, "shape": list(written.shape),
            "parameters": written.ref.to_params()}


def _with_blobs(body: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The JSON header, followed by the binary tensors if there are any."""
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def encode_request(
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[str] | None = None,
    request_id: str | None = None,
    binary_output: bool | None = None,
    shm_inputs: dict[str, ShmInput] | None = None,
    shm_outputs: dict[str, ShmRef] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Client side: build a request body and its headers.

    ``shm_inputs`` are inputs already written into registered shared memory regions;
    ``shm_outputs`` names outputs to be written into them (these need ``outputs``)."""
    binary_output = binary if binary_output is None else binary_output
    blobs: list[bytes] = []
    items = []
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        items.append(_tensor_entry(name, array, binary, blobs))
    for name, item in (shm_inputs or {}).items():
        items.append({"name": name, "datatype": item.datatype, "shape": list(item.shape), "parameters": item.ref.to_params()})
    body: dict = {"inputs": items}
    if request_id is not None:
        body["id"] = request_id
    shm_outputs = shm_outputs or {}
    if shm_outputs and outputs is None:
        raise ValueError("shm_outputs needs the list of outputs")
    if outputs is not None:
        body["outputs"] = [{"name": o, "parameters": shm_outputs[o].to_params() if o in shm_outputs
                            else {"binary_data": binary_output}} for o in outputs]
    else:
        body["parameters"] = {"binary_data_output": binary_output}
    return _with_blobs(body, blobs)


def decode_response(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """Client side: the response JSON and its outputs as numpy arrays (not those the server
    wrote into shared memory: their entries in the JSON say where they are)."""
    n = int(header_length) if header_length is not None else len(body)
    header = json.loads(body[:n])
    binary = memoryview(body)[n:]
    offset = 0
    arrays: dict[str, np.ndarray] = {}
    for out in header.get("outputs", []):
        shape = tuple(out["shape"])
        datatype = out["datatype"]
        params = out.get("parameters") or {}
        if "shared_memory_region" in params:
            continue
        size = params.get("binary_data_size")
        if size is not None:
            raw = bytes(binary[offset : offset + size])
            offset += size
            if datatype == "BYTES":
                arrays[out["name"]] = _decode_bytes_tensor(out["name"], raw, _element_count(shape)).reshape(shape)
            else:
                dtype = DATATYPE_TO_NUMPY[datatype].newbyteorder("<")
                arrays[out["name"]] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(DATATYPE_TO_NUMPY[datatype])
        elif datatype == "BYTES":
            arrays[out["name"]] = np.array([x.encode() for x in out["data"]], dtype=np.object_).reshape(shape)
        else:
            arrays[out["name"]] = np.asarray(out["data"], dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)
    return header, arrays
