"""The engine interface every backend implements.

Polygraphy-style: construct cheaply, ``activate()`` loads, ``infer()`` checks and runs,
``deactivate()`` frees; usable on its own as a context manager. ``infer(feeds, out)``
writes the outputs named in ``out`` into those arrays (e.g. a client's shared memory);
a backend that can have the device write there directly overrides ``_infer_into``.
``open_engine`` (``workers/engines/__init__.py``) is the one place a backend is chosen.
"""

from __future__ import annotations

import abc

import numpy as np

from workers.errors import InvalidInput
from workers.tensors import TensorSpec


class Engine(abc.ABC):
    """One loaded model on one device."""

    backend: str = ""

    def __init__(self) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def footprint_bytes(self) -> int:
        """Bytes of device memory this engine holds while active (estimate or measured)."""

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def activate(self) -> "Engine":
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate()

    def _infer_into(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run, then copy into ``out``; the returned dict holds those very arrays."""
        results = self._infer(feeds)
        for name, target in out.items():
            np.copyto(target, results[name], casting="no")
            results[name] = target
        return results

    def infer(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Check ``feeds`` against ``inputs`` (InvalidInput naming the problem), then ``run``."""
        check_feeds(self.inputs, feeds)
        return self.run(feeds, out)

    def run(self, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run ``feeds`` that were already checked (the worker's runner checks each request once).

        ``out``: arrays to write the outputs of those names into (writable, C-contiguous,
        the output's dtype); the returned dict then holds those very arrays."""
        if not self._active:
            raise RuntimeError(f"{type(self).__name__} is not active; call activate() first")
        if not out:
            return self._infer(feeds)
        by_name = {s.name: s for s in self.outputs}
        for name, target in out.items():
            spec = by_name.get(name)
            if spec is None or target.dtype != spec.numpy_dtype or not target.flags.c_contiguous or not target.flags.writeable:
                raise ValueError(f"out['{name}'] must be a writable C-contiguous {spec.numpy_dtype if spec else '?'} array "
                                 f"for an output of {type(self).__name__}")
        return self._infer_into(feeds, out)

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


def check_feeds(specs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray], max_batch: int | None = None) -> None:
    """Raise InvalidInput naming the first problem with ``feeds``."""
    expected = {s.name for s in specs}
    unknown = sorted(set(feeds) - expected)
    if unknown:
        raise InvalidInput(
            f"unknown input {', '.join(repr(u) for u in unknown)}; the model's inputs are "
            f"{', '.join(repr(s.name) for s in specs)}"
        )
    missing = [s.name for s in specs if s.name not in feeds and not s.optional]
    if missing:
        raise InvalidInput(f"missing input {', '.join(repr(m) for m in missing)}")
    batch = None
    for spec in specs:
        if spec.name not in feeds:
            continue  # an optional input left out: the model's default
        array = feeds[spec.name]
        spec.check(array, max_batch=max_batch)
        if spec.shape and spec.shape[0] < 0:
            if batch is not None and array.shape[0] != batch:
                raise InvalidInput(
                    f"input '{spec.name}': batch {array.shape[0]} differs from the other inputs' batch {batch}"
                )
            batch = array.shape[0]
