"""KServe v2 / Open Inference Protocol: decode requests, encode responses.

Knows nothing about the web framework: bytes and headers in, bytes and headers
out. Supports JSON and Triton's binary tensor extension
(``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``) and gzip/deflate request bodies.
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

from workers.errors import InvalidInput, PayloadTooLarge, Unauthorized
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


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: all outputs
    binary_output: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)


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
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{i}] needs a 'name'")
        if name in inputs:
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
            outputs.append(RequestedOutput(item["name"], bool(p.get("binary_data", False)) if isinstance(p, dict) else False))
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
    )


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
    outputs: dict[str, np.ndarray],
    request: InferRequest,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; binary where the request asked for it."""
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
    out_list = [_tensor_entry(req.name, np.asarray(outputs[req.name]), req.binary, blobs) for req in wanted]
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
) -> tuple[bytes, dict[str, str]]:
    """Client side: build a request body and its headers."""
    binary_output = binary if binary_output is None else binary_output
    blobs: list[bytes] = []
    items = []
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        items.append(_tensor_entry(name, array, binary, blobs))
    body: dict = {"inputs": items}
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": o, "parameters": {"binary_data": binary_output}} for o in outputs]
    else:
        body["parameters"] = {"binary_data_output": binary_output}
    return _with_blobs(body, blobs)


def decode_response(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """Client side: the response JSON and its outputs as numpy arrays."""
    n = int(header_length) if header_length is not None else len(body)
    header = json.loads(body[:n])
    binary = memoryview(body)[n:]
    offset = 0
    arrays: dict[str, np.ndarray] = {}
    for out in header.get("outputs", []):
        shape = tuple(out["shape"])
        datatype = out["datatype"]
        size = (out.get("parameters") or {}).get("binary_data_size")
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
