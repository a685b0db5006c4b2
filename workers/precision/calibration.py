"""INT8 calibration: ``int8_calib`` computes it, ``int8`` builds from it.

- ``calibration_data_sha256`` and ``calibration_key`` say where a calibration is stored
  (by the source model's sha256, never by model name); the data itself is read by
  ``calibration_data.load_calibration_data``;
- ``calibrate``: ONNX Runtime's static quantizer, symmetric (zero points 0, as
  TensorRT requires): a Q/DQ model and the activation ranges read back from it;
- the stored files (``write_calibration`` / ``read_calibration``): tensor ranges
  (JSON), the Q/DQ ONNX model and a TensorRT calibration cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from workers.custom_ops import session_options
from workers.errors import BuildError, InvalidConfig, InvalidInput
from workers.precision.custom_nodes import name_custom_nodes
from workers.precision.reference import cpu_session

CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
DEFAULT_CALIBRATION_METHOD = "entropy"
INT8_MAX = 127  # symmetric INT8: scale = amax / 127, zero point 0

# Files of one stored calibration (see write_calibration).
RANGES_FILE = "ranges.json"
QDQ_MODEL_FILE = "model.qdq.onnx"
TRT_CACHE_FILE = "calibration.cache"
HELDOUT_FILE = "heldout.npz"  # rows kept out of the calibration, to judge its builds on (optional)
CALIBRATION_FILES = (RANGES_FILE, QDQ_MODEL_FILE, TRT_CACHE_FILE)

# The TensorRT release whose header a freshly written cache carries; a build re-renders
# the header for its own TensorRT (trt_calibration_cache), which rejects a foreign one.
DEFAULT_CACHE_TRT_VERSION = "10.16.1"


def calibration_data_sha256(batches: Sequence[dict[str, np.ndarray]]) -> str:
    """Stable digest of the calibration data: batch order, input names, dtypes, shapes, bytes."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            header = f"{name}|{array.dtype.str}|{','.join(map(str, array.shape))}|"
            digest.update(header.encode())
            digest.update(array.tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def calibration_key(source_sha256: str, data_sha256: str, method: str) -> str:
    """Where a calibration is stored: found by the source model's sha256, never by model name."""
    check_calibration_method(method)
    for label, value in (("source", source_sha256), ("calibration data", data_sha256)):
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(f"{label} sha256 must be 64 lowercase hex digits, got {value!r}")
    return f"{source_sha256}-{data_sha256[:16]}-{method}"


def parse_calibration_key(key: str) -> tuple[str, str, str]:
    """(source sha256, calibration-data sha256 prefix, method) of a key from calibration_key."""
    match = re.fullmatch(r"([0-9a-f]{64})-([0-9a-f]{16})-([a-z]+)", key)
    if not match or match.group(3) not in CALIBRATION_METHODS:
        raise ValueError(f"not a calibration key: {key!r}")
    return match.group(1), match.group(2), match.group(3)


def check_calibration_method(method: str) -> str:
    if method not in CALIBRATION_METHODS:
        raise InvalidConfig(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    return method


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationResult:
    """What ``int8_calib`` keeps and ``int8`` builds from."""

    amax: dict[str, float]  # activation tensor -> absolute max (symmetric range)
    qdq_model: bytes  # serialized Q/DQ ONNX model, zero points all 0
    method: str = DEFAULT_CALIBRATION_METHOD
    heldout: dict[str, np.ndarray] | None = None  # rows not calibrated on, to judge its builds on

    def trt_cache(self, trt_version: str = DEFAULT_CACHE_TRT_VERSION) -> str:
        return trt_calibration_cache(self.amax, trt_version)


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __len__(self) -> int:
        return len(self._batches)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def calibrate(
    src_path: str | Path,
    calib_feeds: Sequence[dict[str, np.ndarray]],
    method: str = DEFAULT_CALIBRATION_METHOD,
    custom_ops: Sequence[str] = (),
) -> CalibrationResult:
    """Calibrate with ONNX Runtime's static quantizer: symmetric QInt8 activations and weights, Q/DQ format.

    Symmetric scales give zero points of 0, which TensorRT requires of Q/DQ models; the
    ranges are read back from the Q/DQ model, so the JSON, the model and the TensorRT
    cache can never disagree. Custom operators (``custom_ops``: their libraries) are not
    quantized: they compute in float32 between a DequantizeLinear and a QuantizeLinear.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    check_calibration_method(method)
    if not calib_feeds:
        raise InvalidInput("no calibration data: give at least one batch")
    ort_method = {
        "entropy": CalibrationMethod.Entropy,
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
    }[method]

    class Reader(_FeedReader, CalibrationDataReader):
        pass

    src = Path(src_path)
    with tempfile.TemporaryDirectory(prefix="fleet-calib-") as tmp:
        out = Path(tmp) / QDQ_MODEL_FILE
        model_path, excluded, ranges = str(src), [], None
        if custom_ops:
            model = onnx.load(str(src))
            excluded = name_custom_nodes(model)
            model_path = str(Path(tmp) / "source.onnx")
            onnx.save(model, model_path)
        try:
            if custom_ops:  # ONNX Runtime's calibrator cannot register libraries: its ranges are computed here
                ranges = str(Path(tmp) / "ranges.json")
                _collect_ranges(model_path, Reader(calib_feeds), method, custom_ops, Path(tmp), ranges)
            quantize_static(
                model_path,
                str(out),
                None if ranges else Reader(calib_feeds),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=ort_method,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                calibration_cache_path=ranges,
            )
        except InvalidInput:
            raise
        except Exception as exc:  # the calibrator raises ValueError, RuntimeError, ORT errors ...
            raise BuildError(f"INT8 calibration ({method}) of {src.name} failed: {exc}") from exc
        qdq_bytes = out.read_bytes()
    amax = activation_ranges(onnx.load_from_string(qdq_bytes))
    if not amax:
        raise BuildError(f"INT8 calibration of {src.name} quantized no activation: no operator it can quantize")
    try:
        cpu_session(qdq_bytes, custom_ops)
    except Exception as exc:
        raise BuildError(f"the Q/DQ model calibrated from {src.name} does not load in ONNX Runtime: {exc}") from exc
    return CalibrationResult(amax=amax, qdq_model=qdq_bytes, method=method)


def _collect_ranges(model_path: str, reader, method: str, custom_ops: Sequence[str], tmp: Path, out: str) -> None:
    """ONNX Runtime's calibrator, as ``quantize_static`` sets it up (the same operators, the same
    defaults per method), run in a session with the custom-op libraries; its ranges saved to ``out``
    (``quantize_static``'s calibration cache)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    augmented = str(tmp / "augmented_model.onnx")
    calibrator = {
        "minmax": lambda: MinMaxCalibrater(model_path, op_types, augmented),
        "entropy": lambda: EntropyCalibrater(model_path, op_types, augmented, num_bins=128, num_quantized_bins=128),
        "percentile": lambda: PercentileCalibrater(model_path, op_types, augmented, num_bins=2048, percentile=99.999,
                                                   symmetric=True),
    }[method]()
    calibrator.augment_graph()
    options = session_options(custom_ops)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    calibrator.infer_session = ort.InferenceSession(augmented, sess_options=options, providers=["CPUExecutionProvider"])
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), out)


def activation_ranges(qdq_model: onnx.ModelProto) -> dict[str, float]:
    """{activation tensor: amax} from the QuantizeLinear nodes of a symmetric Q/DQ model."""
    initializers = {init.name: init for init in qdq_model.graph.initializer}
    ranges: dict[str, float] = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue  # weights are stored already quantized, not as activations
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        if len(node.input) > 2 and node.input[2]:
            zero_point = numpy_helper.to_array(initializers[node.input[2]])
            if np.any(zero_point != 0):
                raise BuildError(
                    f"Q/DQ model has a non-zero zero point on '{node.input[0]}'; TensorRT needs "
                    f"symmetric quantization (ActivationSymmetric/WeightSymmetric)"
                )
        if scale.size != 1:
            continue  # per-channel scales belong to weights, not activations
        ranges[node.input[0]] = float(scale.reshape(()) * INT8_MAX)
    return ranges


def trt_version_tag(trt_version: str) -> str:
    """TensorRT's NV_TENSORRT_VERSION, as calibration cache headers carry it.

    8.x: major*1000 + minor*100 + patch ("8.6.1" -> 8601); 10 and later:
    major*10000 + minor*100 + patch ("10.16.1" -> 101601).
    """
    parts = [int(p) for p in re.findall(r"\d+", trt_version)[:3]]
    if len(parts) < 2:
        raise ValueError(f"not a TensorRT version: {trt_version!r}")
    major, minor, patch = (parts + [0, 0])[:3]
    return str(major * (1000 if major < 10 else 10000) + minor * 100 + patch)


def trt_calibration_cache(amax: dict[str, float], trt_version: str = DEFAULT_CACHE_TRT_VERSION) -> str:
    """TensorRT's native calibration cache: a header, then ``name: <big-endian float32 scale, hex>``.

    The header always names EntropyCalibration2 whatever method computed the ranges:
    the cache is read back by an IInt8EntropyCalibrator2, and TensorRT refuses a cache
    whose header names another algorithm or another TensorRT version.
    """
    lines = [f"TRT-{trt_version_tag(trt_version)}-EntropyCalibration2"]
    for name in sorted(amax):
        if "\n" in name or ": " in name:
            raise BuildError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        scale = float(amax[name]) / INT8_MAX
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def parse_trt_calibration_cache(text: str) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a TensorRT calibration cache."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not re.fullmatch(r"TRT-\d+-\w+", lines[0]):
        raise BuildError("calibration cache has no 'TRT-<version>-<algorithm>' header")
    scales = {}
    for line in lines[1:]:
        name, sep, hex_scale = line.rpartition(": ")
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", hex_scale):
            raise BuildError(f"calibration cache line {line!r} is not 'name: <hex float32>'")
        scales[name] = struct.unpack(">f", bytes.fromhex(hex_scale.zfill(8)))[0]
    return lines[0], scales


def write_calibration(result: CalibrationResult, directory: str | Path, trt_version: str = DEFAULT_CACHE_TRT_VERSION) -> Path:
    """Write ranges.json, model.qdq.onnx and calibration.cache into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / RANGES_FILE).write_text(json.dumps(result.amax, indent=2, sort_keys=True))
    (out / QDQ_MODEL_FILE).write_bytes(result.qdq_model)
    (out / TRT_CACHE_FILE).write_text(result.trt_cache(trt_version))
    if result.heldout is not None:
        np.savez(out / HELDOUT_FILE, **result.heldout)
    return out


def read_calibration(directory: str | Path, method: str = DEFAULT_CALIBRATION_METHOD) -> CalibrationResult:
    """The calibration stored by write_calibration; BuildError naming what is missing or wrong."""
    where = Path(directory)
    missing = [name for name in CALIBRATION_FILES if not (where / name).is_file()]
    if missing:
        raise BuildError(
            f"calibration in {where} is incomplete (missing {', '.join(missing)}); "
            f"run `fleet build ... --precision int8_calib` again"
        )
    try:
        raw = json.loads((where / RANGES_FILE).read_text())
        amax = {str(k): float(v) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise BuildError(f"{where / RANGES_FILE} is not a JSON object of tensor -> amax: {exc}") from exc
    if any(not math.isfinite(v) or v < 0 for v in amax.values()):
        raise BuildError(f"{where / RANGES_FILE} has a negative or non-finite range")
    heldout = None
    if (where / HELDOUT_FILE).is_file():
        with np.load(where / HELDOUT_FILE, allow_pickle=False) as archive:
            heldout = {k: archive[k] for k in archive.files}
    return CalibrationResult(amax=amax, qdq_model=(where / QDQ_MODEL_FILE).read_bytes(), method=method, heldout=heldout)

