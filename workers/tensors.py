"""Tensor specs and the datatype tables shared by ONNX, numpy and KServe v2."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from workers.errors import InvalidInput

# KServe v2 datatype name -> numpy dtype. BYTES travels as numpy object arrays.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_NUMPY.items()}

# ONNX Runtime's type strings ("tensor(float)") -> KServe v2 datatype.
ONNX_TYPE_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def batch_shape(shape: "tuple[int, ...] | list[int]", rows: int) -> tuple[int, ...] | None:
    """A model tensor's shape for a request of ``rows`` (``-1`` first = the batch); None when
    another dimension is dynamic too, so that only the run itself can tell."""
    concrete = tuple(rows if (i == 0 and d < 0) else d for i, d in enumerate(shape))
    return None if any(d < 0 for d in concrete) else concrete


def batch_rows(feeds: "dict[str, np.ndarray]") -> int:
    """Rows of a request: the smallest first dimension among its inputs (1 without any)."""
    return min((a.shape[0] for a in feeds.values() if a.ndim), default=1)


def numpy_to_datatype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no KServe v2 datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, KServe datatype, shape (-1 = dynamic). An ``optional`` input
    may be left out of a request (the model has a default for it; Triton's ``optional: true``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    @property
    def numpy_dtype(self) -> np.dtype:
        return DATATYPE_TO_NUMPY[self.datatype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not self.optional:
            del d["optional"]  # manifests of models without optional inputs read as they always did
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        if d["datatype"] not in DATATYPE_TO_NUMPY:
            raise ValueError(f"unknown datatype {d['datatype']!r}")
        return cls(name=str(d["name"]), datatype=str(d["datatype"]), shape=tuple(int(x) for x in d["shape"]),
                   optional=bool(d.get("optional", False)))

    def check(self, array: np.ndarray, *, max_batch: int | None = None) -> None:
        """Raise InvalidInput naming this tensor when ``array`` does not fit it."""
        got = numpy_to_datatype(array.dtype)
        if got != self.datatype:
            raise InvalidInput(
                f"input '{self.name}': datatype {got} does not match the model's {self.datatype}"
            )
        if array.ndim != len(self.shape):
            raise InvalidInput(
                f"input '{self.name}': rank {array.ndim} (shape {list(array.shape)}) does not "
                f"match the model's shape {list(self.shape)}"
            )
        for axis, (have, want) in enumerate(zip(array.shape, self.shape)):
            if want >= 0 and have != want:
                raise InvalidInput(
                    f"input '{self.name}': shape {list(array.shape)} does not match the model's "
                    f"shape {list(self.shape)} (dimension {axis} is {have}, expected {want})"
                )
            if want < 0 and have == 0:
                what = "a batch of 0 rows" if axis == 0 else f"dimension {axis} of size 0"
                raise InvalidInput(
                    f"input '{self.name}': shape {list(array.shape)} has {what}; a request needs at least one "
                    f"element in every dynamic dimension"
                )
        if max_batch is not None and self.shape and self.shape[0] < 0 and array.shape[0] > max_batch:
            raise InvalidInput(
                f"input '{self.name}': batch {array.shape[0]} is over the model's max batch {max_batch}"
            )

