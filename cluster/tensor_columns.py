"""Tensors in Parquet columns, both ways: as lists (of lists) of numbers, or as bytes.

*Lists* are what most writers produce (``pa.list_(pa.float32(), 4096)``, Ray Data's tensor
columns, pandas). Parquet keeps a definition and a repetition level per number, so a row of
4,096 floats costs 8,192 levels to decode or encode: ~45,000 such rows per core-second to read
on the CPU machine, ~35,000 to write.

*Bytes* are one ``fixed_size_binary`` value per row: the row's tensor, C order, little-endian,
with the field's metadata naming it (``dtype``: a numpy name, ``shape``: the row's shape as
JSON, e.g. ``{"dtype": "float32", "shape": "[4096]"}``). No levels per number: ~700,000 rows of
16 KB per core-second to read and ~120,000 to write, the speed a GPU that scores 300,000 rows a
second needs from one process. Write one with ``bytes_column(array)``; a bytes column without
the metadata is read as the model input's own dtype and shape.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from workers.errors import InvalidInput
from workers.tensors import TensorSpec

DTYPE_KEY, SHAPE_KEY = b"dtype", b"shape"
ENCODINGS = ("lists", "bytes")


def tensor_column(name: str, array: np.ndarray, encoding: str = "lists") -> tuple[pa.Field, pa.Array]:
    """``array``'s rows as one column ``name`` and its field: as bytes (``encoding="bytes"``, for
    arrays of 2 or more dimensions) or as lists of numbers (plain values for 1-D arrays)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"tensor encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    if encoding == "bytes" and array.ndim > 1:
        return bytes_field(name, array), bytes_column(array)
    column = list_column(array)
    return pa.field(name, column.type), column


def _row_bytes(array: np.ndarray) -> int:
    return int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize


def bytes_field(name: str, array: np.ndarray) -> pa.Field:
    """The Parquet/Arrow field of ``array``'s rows as bytes, with the metadata that reads them back."""
    return pa.field(name, pa.binary(_row_bytes(array)), nullable=False,
                    metadata={DTYPE_KEY: array.dtype.name.encode(), SHAPE_KEY: json.dumps(list(array.shape[1:])).encode()})


def bytes_column(array: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Each row of ``array`` as one fixed-size binary value (no copy of a C-contiguous little-endian array)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(_row_bytes(array)), len(array), [None, pa.py_buffer(array)])


def list_column(array: np.ndarray) -> pa.Array:
    """Each row of ``array`` as a (flat) fixed-size list of its values; 1-D arrays as plain values."""
    if array.ndim == 1:
        return pa.array(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), int(np.prod(array.shape[1:])))


def column_to_numpy(column: pa.Array | pa.ChunkedArray, name: str, field: pa.Field | None = None) -> np.ndarray:
    """A Parquet column as numpy: fixed-size lists (any depth) and lists of equal length as one
    [rows, ...] array without a per-row step; lists of unequal length as an array of row arrays;
    bytes as the dtype and shape their field's metadata names, or, without it, as raw rows (a
    numpy void dtype) that ``as_input`` reads as the model input's."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # e.g. Ray Data's tensor columns
        return column.to_numpy(zero_copy_only=False)
    if column.null_count:
        raise InvalidInput(f"column '{name}' has {column.null_count} null rows")
    if pa.types.is_fixed_size_binary(column.type):
        return _bytes_rows(column, name, field)
    rows, shape, values = len(column), [], column
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
        else:
            lengths = np.diff(values.offsets.to_numpy())
            if len(lengths) and (lengths != lengths[0]).any():
                return column.to_numpy(zero_copy_only=False)  # ragged: the job names the column and the input
            width = int(lengths[0]) if len(lengths) else 0
        if values.null_count:
            raise InvalidInput(f"column '{name}' has null values")
        shape.append(width)
        values = values.flatten()
    if values.null_count:
        raise InvalidInput(f"column '{name}' has null values")
    return values.to_numpy(zero_copy_only=False).reshape([rows, *shape])


def _bytes_rows(column: pa.FixedSizeBinaryArray, name: str, field: pa.Field | None) -> np.ndarray:
    width = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)[column.offset * width:(column.offset + len(column)) * width]
    meta = (field.metadata or {}) if field is not None else {}
    if DTYPE_KEY not in meta:
        return data.view(np.dtype((np.void, width))) if width else np.empty(len(column), np.dtype((np.void, 1)))
    try:
        dtype = np.dtype(meta[DTYPE_KEY].decode()).newbyteorder("<")
        shape = [int(d) for d in json.loads(meta.get(SHAPE_KEY, b"[]"))]
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"column '{name}': its metadata {dict(meta)} does not name a dtype and shape ({exc})") from None
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != width:
        raise InvalidInput(f"column '{name}' holds {width} bytes per row, not a {dtype.name} tensor of shape {shape} "
                           f"as its metadata says")
    return data.view(dtype).reshape([len(column), *shape])


def as_input(array: np.ndarray, spec: TensorSpec, name: str) -> np.ndarray:
    """Column ``name``'s rows as model input ``spec``: cast within a kind, raw bytes read as the input's
    dtype and shape, and checked; C-contiguous (a view where it already is)."""
    if array.dtype.kind == "V":  # bytes without metadata: the input's own dtype and shape
        array = _raw_rows(array, spec, name)
    if array.dtype == object:  # Parquet list columns arrive as arrays of arrays
        try:
            array = np.stack([np.asarray(x) for x in array])
        except ValueError:
            raise InvalidInput(f"column '{name}' for input '{spec.name}' has rows of different shapes") from None
    want = spec.numpy_dtype
    if array.dtype != want:
        if array.dtype.kind == want.kind or (array.dtype.kind in "iu" and want.kind in "iuf"):
            array = array.astype(want)
        else:
            raise InvalidInput(f"column '{name}' holds {array.dtype}, input '{spec.name}' needs {spec.datatype}")
    expected = tuple(spec.shape[1:])
    if array.ndim != len(spec.shape) or any(w >= 0 and h != w for h, w in zip(array.shape[1:], expected)):
        raise InvalidInput(
            f"column '{name}' has rows of shape {list(array.shape[1:])}, input '{spec.name}' needs {list(expected)}"
        )
    return np.ascontiguousarray(array)


def _raw_rows(array: np.ndarray, spec: TensorSpec, name: str) -> np.ndarray:
    want = spec.numpy_dtype.newbyteorder("<")
    dims = list(spec.shape[1:])
    known = int(np.prod([d for d in dims if d >= 0], dtype=np.int64)) * want.itemsize
    width = array.dtype.itemsize
    dynamic = [i for i, d in enumerate(dims) if d < 0]
    if len(dynamic) > 1 or (not dynamic and known != width) or (dynamic and (not known or width % known)):
        raise InvalidInput(f"column '{name}' holds {width} bytes per row: not a {spec.datatype} row of shape {dims} "
                           f"for input '{spec.name}' (give the column dtype and shape metadata: cluster/tensor_columns.py)")
    if dynamic:
        dims[dynamic[0]] = width // known
    return array.view(np.uint8).reshape(len(array), width).view(want).reshape([len(array), *dims])
