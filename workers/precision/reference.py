"""ONNX Runtime on the CPU: reference runs (the float32 model every build is judged
against) and load checks of the models this package writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from workers.custom_ops import session_options


def cpu_session(model: str | Path | bytes, custom_ops: Sequence[str] = ()) -> ort.InferenceSession:
    """``custom_ops``: paths of the custom-op libraries the model's operators need."""
    options = session_options(custom_ops)
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_model(model: str | Path | bytes, feeds: dict[str, np.ndarray], custom_ops: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``feeds``, with ONNX Runtime on the CPU (reference runs)."""
    session = cpu_session(model, custom_ops)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))

