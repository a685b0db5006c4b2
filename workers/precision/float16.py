"""``float16``: an FP16 copy of the source model (inputs and outputs stay float32).

TensorRT 10+ builds it as a strongly typed network; ONNX Runtime runs it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from workers.errors import BuildError
from workers.precision.custom_nodes import name_custom_nodes, type_custom_outputs
from workers.precision.reference import cpu_session


def convert_float16(src_path: str | Path, dst_path: str | Path, custom_ops: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of ``src_path`` (inputs and outputs stay float32) and check it loads.

    Custom operators (outside the ONNX and Microsoft domains) stay float32, with casts
    around them: their kernels are float32 ones, and a library need not have others.

    Uses ONNX Runtime's converter: onnxconverter-common's produced models ONNX Runtime
    refuses ("Type parameter (T) of Optype (MatMul) bound to different types"), so
    whatever the converter, the result is loaded before anyone stores it.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src_path), Path(dst_path)
    try:
        model = onnx.load(src)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... here
        raise BuildError(f"cannot read ONNX model {src}: {exc}") from exc
    kept = name_custom_nodes(model)
    try:
        if kept:
            type_custom_outputs(model, custom_ops)
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                             node_block_list=kept)
    except Exception as exc:
        raise BuildError(f"ONNX Runtime's float16 converter failed on {src.name}: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, dst)
    try:
        cpu_session(dst, custom_ops)
    except Exception as exc:
        raise BuildError(
            f"the float16 model converted from {src.name} does not load in ONNX Runtime: {exc}; "
            f"build float32, or exclude the failing operator from the conversion"
        ) from exc
    return dst

