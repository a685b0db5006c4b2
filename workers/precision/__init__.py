"""Precision preparation shared by every backend: float16 models, INT8 calibration, accuracy checks.

The four modes users know from Tencent Forward:

- ``float32``: the source model as it is.
- ``float16``: an FP16 ONNX model (``convert_float16``, float16.py); TensorRT 10+
  builds it as a strongly typed network, ONNX Runtime runs it as it is.
- ``int8_calib``: ``calibrate`` the source on user data (``load_calibration_data``,
  calibration_data.py, which keeps some rows out to judge the build on) and keep the result
  (``write_calibration``): tensor ranges (JSON), a Q/DQ ONNX model with symmetric
  scales (zero points 0, as TensorRT requires) and a TensorRT calibration cache
  (calibration.py).
- ``int8``: built from a stored calibration (``read_calibration``).

Every build compares its artifact with the float32 reference (``run_model``,
reference.py; ``compare_outputs``) and fails when the loss is over the mode's
threshold (``check_accuracy``, accuracy.py).

Pure functions, no Ray, no TensorRT: they run on any worker or on the controller.
"""

from workers.precision.accuracy import (
    FLOAT16_MAX_REL_L2,
    FLOAT32_MAX_REL_L2,
    INT8_MAX_REL_L2_WITHOUT_CLASSIFIER,
    INT8_MIN_TOP1_AGREEMENT,
    accuracy_threshold,
    check_accuracy,
    compare_outputs,
)
from workers.precision.calibration import (
    CALIBRATION_FILES,
    CALIBRATION_METHODS,
    DEFAULT_CACHE_TRT_VERSION,
    DEFAULT_CALIBRATION_METHOD,
    HELDOUT_FILE,
    INT8_MAX,
    QDQ_MODEL_FILE,
    RANGES_FILE,
    TRT_CACHE_FILE,
    CalibrationResult,
    activation_ranges,
    calibrate,
    calibration_data_sha256,
    calibration_key,
    check_calibration_method,
    parse_calibration_key,
    parse_trt_calibration_cache,
    read_calibration,
    trt_calibration_cache,
    trt_version_tag,
    write_calibration,
)
from workers.precision.calibration_data import DEFAULT_CALIBRATION_BATCH, CalibrationData, load_calibration_data
from workers.precision.float16 import convert_float16
from workers.precision.reference import run_model

__all__ = [
    "CALIBRATION_FILES",
    "CALIBRATION_METHODS",
    "DEFAULT_CACHE_TRT_VERSION",
    "DEFAULT_CALIBRATION_BATCH",
    "DEFAULT_CALIBRATION_METHOD",
    "HELDOUT_FILE",
    "FLOAT16_MAX_REL_L2",
    "FLOAT32_MAX_REL_L2",
    "INT8_MAX",
    "INT8_MAX_REL_L2_WITHOUT_CLASSIFIER",
    "INT8_MIN_TOP1_AGREEMENT",
    "QDQ_MODEL_FILE",
    "RANGES_FILE",
    "TRT_CACHE_FILE",
    "CalibrationData",
    "CalibrationResult",
    "accuracy_threshold",
    "activation_ranges",
    "calibrate",
    "calibration_data_sha256",
    "calibration_key",
    "check_accuracy",
    "check_calibration_method",
    "compare_outputs",
    "convert_float16",
    "load_calibration_data",
    "parse_calibration_key",
    "parse_trt_calibration_cache",
    "read_calibration",
    "run_model",
    "trt_calibration_cache",
    "trt_version_tag",
    "write_calibration",
]
