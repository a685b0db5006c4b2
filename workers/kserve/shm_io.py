"""Tensors in system shared memory regions: inputs read in place, outputs written there."""

from __future__ import annotations

import math

import numpy as np

from workers.errors import SharedMemoryError
from workers.kserve.codec import InferRequest, ShmWritten, decode_binary_tensor, encode_bytes_tensor
from workers.shm import SharedMemoryRegistry, ShmRef
from workers.tensors import TensorSpec, batch_shape, numpy_to_datatype


def shm_feeds(request: InferRequest, registry: SharedMemoryRegistry) -> dict[str, np.ndarray]:
    """All inputs of ``request``, those in shared memory read in place (no copy)."""
    if not request.shm_inputs:
        return request.inputs
    feeds = dict(request.inputs)
    for name, item in request.shm_inputs.items():
        feeds[name] = decode_binary_tensor(name, item.datatype, item.shape, registry.buffer(item.ref, f"input '{name}'"))
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
        return dict(outputs)
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
