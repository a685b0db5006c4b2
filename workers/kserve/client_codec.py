"""The client's direction of KServe v2: build request bodies, read response bodies."""

from __future__ import annotations

import json

import numpy as np

from workers.kserve.codec import ShmInput, decode_binary_tensor, shm_entry, split_body, tensor_entry, with_blobs
from workers.shm import ShmRef
from workers.tensors import DATATYPE_TO_NUMPY


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
    """A request body and its headers.

    ``shm_inputs`` are inputs already written into registered shared memory regions;
    ``shm_outputs`` names outputs to be written into them (these need ``outputs``)."""
    binary_output = binary if binary_output is None else binary_output
    blobs: "list[bytes | memoryview]" = []
    items = []
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        items.append(tensor_entry(name, array, binary, blobs))
    items += [shm_entry(name, item) for name, item in (shm_inputs or {}).items()]
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
    return with_blobs(body, blobs)


def decode_response(body: bytes, header_length: str | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The response JSON and its outputs as numpy arrays (not those the server wrote into
    shared memory: their entries have no data)."""
    header_bytes, binary = split_body(body, header_length)
    header = json.loads(header_bytes)
    offset = 0
    arrays: dict[str, np.ndarray] = {}
    for out in header.get("outputs", []):
        name, shape, datatype = out["name"], tuple(out["shape"]), out["datatype"]
        params = out.get("parameters") or {}
        if "shared_memory_region" in params or ("data" not in out and "binary_data_size" not in params):
            continue  # written into shared memory: the entry only describes it
        size = params.get("binary_data_size")
        if size is not None:
            arrays[name] = decode_binary_tensor(name, datatype, shape, binary[offset:offset + size]).copy()
            offset += size
        elif datatype == "BYTES":
            arrays[name] = np.array([x.encode() for x in out["data"]], dtype=np.object_).reshape(shape)
        else:
            arrays[name] = np.asarray(out["data"], dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)
    return header, arrays
