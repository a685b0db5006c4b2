"""The custom-op test model's library and builds, shared by the unit and integration tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tests.models import custom_op_rows
from tests.needs import skip_unless


def extensions_library() -> str:
    """onnxruntime-extensions' custom-op library (a dev dependency)."""
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        skip_unless(False, f"onnxruntime-extensions is not installed: {exc}")
        raise
    return str(onnxruntime_extensions.get_library_path())


def extensions_sha256() -> str:
    """The library's sha256: what a fleet config pins (models.<m>.trusted_sha256) to load it."""
    return hashlib.sha256(Path(extensions_library()).read_bytes()).hexdigest()


def calibration_data(path: Path) -> Path:
    """320 rows: 256 calibrated on, the last 64 kept out to judge the int8 build on."""
    np.savez(path, input=custom_op_rows(320))
    return path


def direct(source: str | Path, rows: np.ndarray, library: str) -> np.ndarray:
    """The source model run by ONNX Runtime itself with the same library: what the fleet must answer."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": rows})[0]


def within_precision(precision: str, reference: np.ndarray, answer: np.ndarray) -> dict:
    """Each precision's own threshold (workers/precision/accuracy.py): float32 exact, float16 1e-2
    relative L2, int8 97 % top-1 agreement."""
    error = float(np.abs(reference - answer).max())
    rel_l2 = float(np.linalg.norm(reference - answer) / np.linalg.norm(reference))
    agreement = float(np.mean(reference.argmax(1) == answer.argmax(1)))
    if precision == "float32":
        assert np.array_equal(reference, answer), error
    elif precision == "float16":
        assert rel_l2 <= 1e-2, rel_l2
    else:
        assert agreement >= 0.97, agreement
    return {"max_abs_error": error, "rel_l2": rel_l2, "top1_agreement": agreement}
