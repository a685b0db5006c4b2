"""ONNX Runtime on the CPU: reference runs (the float32 model every build is judged
against) and load checks of the models this package writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def cpu_session(model: str | Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_model(model: str | Path | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``feeds``, with ONNX Runtime on the CPU (reference runs)."""
    session = cpu_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))

