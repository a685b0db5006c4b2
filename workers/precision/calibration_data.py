"""Calibration data: what ``int8_calib`` calibrates on, and the rows kept out to judge its build on.

``load_calibration_data`` reads a ``.npz``, a directory of ``.npy`` or a ``module:function``
generator, checks every array against the model's inputs and cuts equal batches (ONNX
Runtime's histogram calibrators need them).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.errors import InvalidInput
from workers.tensors import TensorSpec

# Rows per calibration batch when the data is one big array: bounds the calibrator's memory.
DEFAULT_CALIBRATION_BATCH = 64
# Of the calibration rows, this share (within bounds) is kept out to judge the int8 build on.
HELDOUT_FRACTION = 0.2
HELDOUT_MIN_ROWS = 16
HELDOUT_MAX_ROWS = 1024

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class CalibrationData:
    """Calibration batches, and the rows kept out of them to judge the int8 build on."""

    batches: list[dict[str, np.ndarray]]
    heldout: dict[str, np.ndarray] | None = None
    samples: int = 0  # distinct rows calibrated on (the last batch is filled up from the first rows)

    @property
    def heldout_rows(self) -> int:
        return len(next(iter(self.heldout.values()))) if self.heldout else 0


def load_calibration_data(
    source: str | Path,
    input_specs: Sequence[TensorSpec],
    batch_size: int = DEFAULT_CALIBRATION_BATCH,
    *,
    keep_out: bool = False,
) -> CalibrationData:
    """Calibration batches (feed dicts) from a ``.npz``, a directory of ``.npy``, or ``module:function``.

    - ``.npz``: one array per input, keyed by input name (any key for a one-input model);
    - directory: one ``<input name>.npy`` per input (any single file for a one-input model);
    - ``module:function``: called with no arguments, returns an iterable of feed dicts.

    Arrays are checked against ``input_specs``; a wrong shape raises InvalidInput naming
    the input and both shapes. Float data is cast to the input's float type (``np.save``
    writes float64 by default). Whole arrays are split into ``batch_size`` rows.

    ``keep_out``: the last rows (a fifth, 16 to 1,024) are kept out of the batches, to
    judge the build on data the calibration did not see (``heldout``); none when there
    are fewer than 32 rows or an input has no batch axis.
    """
    specs = tuple(input_specs)
    if not specs:
        raise InvalidInput("the model has no inputs to calibrate")
    rows = _read_rows(source, specs)
    heldout = None
    if isinstance(rows, dict):
        where = str(source)
        if keep_out:
            rows, heldout = _keep_out(rows, specs)
        batches = _split(rows, specs, batch_size, where)
        samples = len(next(iter(rows.values())))
    else:
        batches = rows  # a generator's feeds for a model without a batch axis: as they came
        samples = len(batches)
    if not batches:
        raise InvalidInput(f"calibration data {source} holds no samples")
    return CalibrationData(batches, heldout, samples)


def _read_rows(source: str | Path, specs: tuple[TensorSpec, ...]) -> "dict[str, np.ndarray] | list[dict[str, np.ndarray]]":
    """All calibration rows, checked: one array per input, or a list of feeds when an input has no batch axis."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        return _checked_rows(_match_inputs(arrays, specs, path.name), specs, path.name)
    if path.is_dir():
        arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
        return _checked_rows(_match_inputs(arrays, specs, f"directory {path}"), specs, f"directory {path}")
    if path.exists():
        raise InvalidInput(f"calibration data {path} is neither a .npz file nor a directory of .npy files")
    if not _ENTRY_POINT.match(str(source)):
        raise InvalidInput(
            f"calibration data {source} not found: give a .npz, a directory of .npy files, "
            f"or a generator entry point 'module:function'"
        )
    feeds = [_checked_feed(feed, specs, f"{source} batch {i}") for i, feed in enumerate(_call_entry_point(str(source)))]
    if not feeds or not all(s.shape and s.shape[0] < 0 for s in specs):
        return feeds
    return {s.name: np.concatenate([f[s.name] for f in feeds]) for s in specs}


def _checked_rows(arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], where: str) -> dict[str, np.ndarray]:
    checked = {s.name: _checked_array(arrays[s.name], s, where) for s in specs}
    counts = {n: a.shape[0] for n, a in checked.items() if any(s.name == n and s.shape and s.shape[0] < 0 for s in specs)}
    if len(set(counts.values())) > 1:
        raise InvalidInput(f"calibration data {where}: the inputs have different numbers of rows {counts}")
    return checked


def _keep_out(rows: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(rows to calibrate on, the last rows kept out) for a model whose inputs all have a batch axis."""
    if not all(s.shape and s.shape[0] < 0 for s in specs):
        return rows, None
    total = len(next(iter(rows.values())))
    if total < 2 * HELDOUT_MIN_ROWS:
        return rows, None
    kept = min(HELDOUT_MAX_ROWS, max(HELDOUT_MIN_ROWS, int(total * HELDOUT_FRACTION)))
    return {n: a[: total - kept] for n, a in rows.items()}, {n: a[total - kept:] for n, a in rows.items()}


def _match_inputs(arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidInput(
            f"calibration data {where} has no array for input {', '.join(repr(m) for m in missing)}; "
            f"it holds {sorted(arrays) or 'nothing'}, the model's inputs are {names}"
        )
    return {n: arrays[n] for n in names}


def _checked_feed(feed: Any, specs: tuple[TensorSpec, ...], where: str) -> dict[str, np.ndarray]:
    if not isinstance(feed, dict):
        raise InvalidInput(f"calibration data {where} is a {type(feed).__name__}, expected a dict of input name -> array")
    unknown = sorted(set(feed) - {s.name for s in specs})
    if unknown:
        raise InvalidInput(f"calibration data {where} has unknown input(s) {unknown}; the model's inputs are {[s.name for s in specs]}")
    checked = {}
    for spec in specs:
        if spec.name not in feed:
            raise InvalidInput(f"calibration data {where} has no array for input '{spec.name}'")
        checked[spec.name] = _checked_array(np.asarray(feed[spec.name]), spec, where)
    return checked


def _checked_array(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if array.dtype.kind == "f" and spec.numpy_dtype.kind == "f":
        array = array.astype(spec.numpy_dtype, copy=False)
    try:
        spec.check(array)
    except InvalidInput as exc:
        raise InvalidInput(f"calibration data {where}: {exc.message}") from None
    return np.ascontiguousarray(array)


def _split(
    arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], batch_size: int, where: str
) -> list[dict[str, np.ndarray]]:
    """Equal-sized batches of ``batch_size`` rows; the last one is filled up from the first rows.

    Equal sizes because ONNX Runtime's histogram calibrators (entropy, percentile) stack
    each tensor's batches into one array and fail on a short last batch.
    """
    checked = {s.name: _checked_array(arrays[s.name], s, where) for s in specs}
    batched = [s.name for s in specs if s.shape and s.shape[0] < 0]
    if not batched:
        return [checked]  # fixed-shape model: the data is one sample
    counts = {n: checked[n].shape[0] for n in batched}
    if len(set(counts.values())) != 1:
        raise InvalidInput(f"calibration data {where}: the inputs have different numbers of rows {counts}")
    total = counts[batched[0]]
    if total == 0:
        return []
    step = max(1, min(int(batch_size), total))
    rows = np.arange(math.ceil(total / step) * step) % total
    return [
        {n: (a[rows[start : start + step]] if n in batched else a) for n, a in checked.items()}
        for start in range(0, len(rows), step)
    ]


def _call_entry_point(entry_point: str) -> Iterable[Any]:
    module_name, _, function_name = entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"calibration generator {entry_point}: cannot import {module_name}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidInput(f"calibration generator {entry_point}: {module_name} has no function {function_name}")
    return function()  # type: ignore[no-any-return]


