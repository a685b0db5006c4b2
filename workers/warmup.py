"""Warm-up requests (Triton's ``model_warmup``): run on a new engine before it takes traffic.

A ``WarmupSample`` is a plain value that travels with the load options (by value: rule 8, a
data file's bytes come with it, never its path). ``run_warmup`` runs each sample ``runs`` times
on the engine; a failure fails the load with ``WarmupFailed`` naming the sample.

Pure: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.errors import WarmupFailed
from workers.tensors import DATATYPE_TO_NUMPY, TensorSpec

KINDS = ("zero", "random", "file")


@dataclass(frozen=True)
class WarmupInput:
    name: str
    datatype: str  # KServe v2 name ("FP32")
    dims: tuple[int, ...]  # one sample, without the batch dimension
    kind: str = "zero"  # "zero" | "random" | "file"
    data: bytes = b""  # kind "file": the sample, row-major (BYTES: 4-byte little-endian length + bytes each)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"warm-up input kind must be one of {KINDS}, got {self.kind!r}")
        if self.datatype not in DATATYPE_TO_NUMPY:
            raise ValueError(f"unknown datatype {self.datatype!r}")

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One sample of shape ``dims``; ValueError saying what does not fit."""
        dtype = DATATYPE_TO_NUMPY[self.datatype]
        count = int(np.prod(self.dims)) if self.dims else 1
        if self.kind == "file":
            values = _strings(self.data) if self.datatype == "BYTES" else np.frombuffer(self.data, dtype)
            if values.size != count:
                raise ValueError(f"its data file holds {values.size} {self.datatype} values, dims {list(self.dims)} "
                                 f"need {count}")
            return values.reshape(self.dims)
        if self.datatype == "BYTES":
            return np.full(self.dims, b"", dtype=object)
        if self.kind == "zero":
            return np.zeros(self.dims, dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, self.dims).astype(dtype)
        if dtype.kind in "iu":
            return rng.integers(0, 8, self.dims).astype(dtype)
        return rng.random(self.dims).astype(dtype)


def _strings(data: bytes) -> np.ndarray:
    """Triton's serialized BYTES: each element a 4-byte little-endian length, then its bytes."""
    values, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset:offset + 4], "little")
        values.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


@dataclass(frozen=True)
class WarmupSample:
    """One of Triton's ``model_warmup`` entries: ``batch_size`` rows of the same sample, ``runs`` times."""

    name: str
    inputs: tuple[WarmupInput, ...]
    batch_size: int = 1  # 0: the model has no batch dimension (max_batch_size 0)
    runs: int = 1

    def feeds(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in self.inputs:
            sample = spec.sample(rng)
            feeds[spec.name] = np.repeat(sample[None], self.batch_size, axis=0) if self.batch_size else sample
        return feeds


def check_warmup(sample: WarmupSample, inputs: tuple[TensorSpec, ...], batched: bool) -> str | None:
    """What is wrong with a warm-up sample for a model with these inputs, or None."""
    specs = {s.name: s for s in inputs}
    for given in sample.inputs:
        spec = specs.get(given.name)
        if spec is None:
            return f"input '{given.name}' is not one of the model's ({', '.join(specs)})"
        if given.datatype != spec.datatype:
            return f"input '{given.name}' is {spec.datatype} in the model, the warm-up says {given.datatype}"
        dims = spec.shape[1:] if batched else spec.shape
        if len(dims) != len(given.dims) or any(d >= 0 and d != g for d, g in zip(dims, given.dims)):
            return f"input '{given.name}' has dims {list(dims)} in the model, the warm-up says {list(given.dims)}"
    missing = [s.name for s in inputs if not s.optional and s.name not in {g.name for g in sample.inputs}]
    if missing:
        return f"it gives no data for input(s) {', '.join(missing)}"
    if batched != (sample.batch_size > 0):
        return (f"batch_size {sample.batch_size} does not fit a model "
                f"{'with' if batched else 'without'} a batch dimension")
    try:
        sample.feeds()
    except ValueError as exc:
        return str(exc)
    return None


def run_warmup(run, model: str, samples: tuple[WarmupSample, ...]) -> int:
    """Run every sample on an engine (``run``: its ``run(feeds)``); the number of runs.
    WarmupFailed naming the sample when one fails."""
    done = 0
    for sample in samples:
        try:
            feeds = sample.feeds()
            for _ in range(sample.runs):
                run(feeds)
                done += 1
        except Exception as exc:
            raise WarmupFailed(f"model '{model}': warm-up sample '{sample.name}' failed, so the engine takes no "
                               f"traffic: {exc}") from exc
    return done
