"""Precision preparation on the real demo models: float16, INT8 calibration, accuracy checks."""

import json
import struct
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cluster.demo import digits_split
from workers import precision
from workers.engines.onnxruntime import describe_model
from workers.errors import BuildError, InvalidConfig, InvalidInput


@pytest.fixture(scope="module")
def digits():
    X_train, X_test, y_train, y_test = digits_split()
    return X_train, X_test, y_train, y_test


@pytest.fixture(scope="module")
def mlp_inputs(demo_models):
    return describe_model(demo_models["digits-mlp"])[0]


@pytest.fixture(scope="module")
def mlp_calibration(demo_models, mlp_inputs, digits, tmp_path_factory):
    """Entropy calibration of digits-mlp on the training split, loaded from a real .npz."""
    path = tmp_path_factory.mktemp("calib") / "train.npz"
    np.savez(path, input=digits[0])
    batches = precision.load_calibration_data(path, mlp_inputs).batches
    return batches, precision.calibrate(demo_models["digits-mlp"], batches, "entropy")


def accuracy(model, X, y) -> float:
    return float(np.mean(precision.run_model(model, {"input": X})["label"] == y))


# --------------------------------------------------------------------------- float16


def test_digits_mlp_float16_keeps_accuracy_within_half_a_point(demo_models, digits, tmp_path):
    _, X_test, _, y_test = digits
    fp16 = precision.convert_float16(demo_models["digits-mlp"], tmp_path / "digits-fp16.onnx")
    fp32_acc, fp16_acc = accuracy(demo_models["digits-mlp"], X_test, y_test), accuracy(fp16, X_test, y_test)
    assert fp32_acc > 0.95
    assert abs(fp32_acc - fp16_acc) <= 0.005, (fp32_acc, fp16_acc)
    # Really float16 inside, float32 at the edges (keep_io_types).
    model = onnx.load(fp16)
    assert {i.data_type for i in model.graph.initializer if i.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_cnn_small_float16_relative_l2_within_1e2(demo_models, tmp_path):
    fp16 = precision.convert_float16(demo_models["cnn-small"], tmp_path / "cnn-fp16.onnx")
    x = np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32)
    metrics = precision.compare_outputs(
        precision.run_model(demo_models["cnn-small"], {"input": x}), precision.run_model(fp16, {"input": x})
    )
    assert metrics["rel_l2_error"] <= 1e-2
    assert precision.check_accuracy("float16", metrics)["passed"]


def test_float16_conversion_that_does_not_load_is_a_build_error(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BuildError, match="cannot read ONNX model"):
        precision.convert_float16(broken, tmp_path / "out.onnx")


# --------------------------------------------------------------------------- int8


def test_digits_mlp_int8_after_calibration_on_training_split_within_one_point(demo_models, digits, mlp_calibration):
    _, X_test, _, y_test = digits
    _, result = mlp_calibration
    fp32_acc, int8_acc = accuracy(demo_models["digits-mlp"], X_test, y_test), accuracy(result.qdq_model, X_test, y_test)
    assert abs(fp32_acc - int8_acc) <= 0.01, (fp32_acc, int8_acc)
    metrics = precision.compare_outputs(
        precision.run_model(demo_models["digits-mlp"], {"input": X_test}),
        precision.run_model(result.qdq_model, {"input": X_test}),
    )
    verdict = precision.check_accuracy("int8", metrics)
    assert verdict["metric"] == "top1_agreement" and verdict["passed"]


def test_qdq_model_is_symmetric_with_zero_points_all_zero(mlp_calibration):
    _, result = mlp_calibration
    model = onnx.load_from_string(result.qdq_model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert q_nodes
    for node in q_nodes:
        assert node.input[2] in inits
        assert not np.any(inits[node.input[2]]), node.name
        assert inits[node.input[2]].dtype == np.int8
    # The network input is one of the calibrated activations, and its range fits [0, 1] data.
    assert 0.9 <= result.amax["cast_input"] <= 1.0 + 1e-6


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_other_calibration_methods(demo_models, digits, mlp_calibration, method):
    batches, _ = mlp_calibration
    result = precision.calibrate(demo_models["digits-mlp"], batches[:4], method)
    assert result.method == method and result.amax
    _, X_test, _, y_test = digits
    assert accuracy(result.qdq_model, X_test, y_test) > 0.9


def test_unknown_calibration_method_is_a_config_error(demo_models, mlp_calibration):
    with pytest.raises(InvalidConfig, match="entropy, minmax, percentile"):
        precision.calibrate(demo_models["digits-mlp"], mlp_calibration[0], "kl")


# --------------------------------------------------------------------------- calibration data


def test_wrong_shape_calibration_data_names_the_input_and_both_shapes(mlp_inputs, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((10, 63), np.float32))
    with pytest.raises(InvalidInput) as err:
        precision.load_calibration_data(path, mlp_inputs)
    message = str(err.value)
    assert "'input'" in message and "[10, 63]" in message and "[-1, 64]" in message, message


def test_npz_with_any_key_for_one_input_and_float64_is_cast(mlp_inputs, digits, tmp_path):
    path = tmp_path / "any.npz"
    np.savez(path, whatever=digits[0][:100].astype(np.float64))
    batches = precision.load_calibration_data(path, mlp_inputs, batch_size=32).batches
    # Equal batches (ONNX Runtime's histogram calibrators need them): 4 x 32 rows, 100 unique.
    assert [b["input"].shape for b in batches] == [(32, 64)] * 4
    assert batches[0]["input"].dtype == np.float32
    np.testing.assert_array_equal(batches[3]["input"][:4], digits[0][96:100])


def test_directory_of_npy(mlp_inputs, digits, tmp_path):
    np.save(tmp_path / "input.npy", digits[0][:50])
    batches = precision.load_calibration_data(tmp_path, mlp_inputs).batches
    assert sum(len(b["input"]) for b in batches) >= 50


def test_npz_missing_an_input_of_a_two_input_model(tmp_path):
    from workers.tensors import TensorSpec

    specs = (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP32", (-1, 3)))
    path = tmp_path / "one.npz"
    np.savez(path, a=np.zeros((4, 2), np.float32), c=np.zeros((4, 3), np.float32))
    with pytest.raises(InvalidInput, match="no array for input 'b'"):
        precision.load_calibration_data(path, specs)


def test_generator_entry_point(mlp_inputs, tmp_path, monkeypatch):
    (tmp_path / "calib_gen.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            rng = np.random.default_rng(0)
            for size in (5, 7):
                yield {"input": rng.random((size, 64), dtype=np.float32)}
        def wrong():
            yield {"input": np.zeros((2, 8, 8), np.float32)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    batches = precision.load_calibration_data("calib_gen:batches", mlp_inputs, batch_size=4).batches
    assert [b["input"].shape for b in batches] == [(4, 64)] * 3
    with pytest.raises(InvalidInput, match=r"calib_gen:wrong batch 0: input 'input': rank 3"):
        precision.load_calibration_data("calib_gen:wrong", mlp_inputs)
    sys.modules.pop("calib_gen", None)


def test_missing_calibration_data_says_what_is_accepted(mlp_inputs, tmp_path):
    with pytest.raises(InvalidInput, match="module:function"):
        precision.load_calibration_data(tmp_path / "nope.npz", mlp_inputs)


def test_calibration_sha256_is_stable_and_sensitive(digits):
    X = digits[0][:64]
    a = precision.calibration_data_sha256([{"input": X}])
    assert a == precision.calibration_data_sha256([{"input": X.copy()}])
    assert a != precision.calibration_data_sha256([{"input": X[:63]}])
    assert a != precision.calibration_data_sha256([{"input": X.astype(np.float64)}])


def test_calibration_key_is_source_data_and_method():
    src, data = "a" * 64, "b" * 64
    key = precision.calibration_key(src, data, "entropy")
    assert key.startswith(src) and key.endswith("-entropy")
    assert precision.parse_calibration_key(key) == (src, "b" * 16, "entropy")
    assert precision.calibration_key(src, data, "minmax") != key
    with pytest.raises(ValueError):
        precision.calibration_key("not-a-sha", data, "entropy")


# --------------------------------------------------------------------------- stored calibration


def test_calibration_cache_format(mlp_calibration):
    _, result = mlp_calibration
    text = result.trt_cache("8.6.1")
    lines = text.splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    header, scales = precision.parse_trt_calibration_cache(text)
    assert set(scales) == set(result.amax)
    for line in lines[1:]:
        name, hex_scale = line.split(": ")
        assert len(hex_scale) == 8
        (scale,) = struct.unpack(">f", bytes.fromhex(hex_scale))
        assert scale == pytest.approx(result.amax[name] / 127, rel=1e-6)
    assert result.trt_cache("10.16.1.11").startswith("TRT-101601-EntropyCalibration2\n")
    assert result.trt_cache("11.4.0").startswith("TRT-110400-")


def test_write_and_read_calibration(mlp_calibration, tmp_path):
    _, result = mlp_calibration
    directory = precision.write_calibration(result, tmp_path / "calib", trt_version="8.6.1")
    assert sorted(p.name for p in directory.iterdir()) == sorted(precision.CALIBRATION_FILES)
    assert json.loads((directory / precision.RANGES_FILE).read_text()) == pytest.approx(result.amax)
    back = precision.read_calibration(directory)
    assert back.amax == pytest.approx(result.amax) and back.qdq_model == result.qdq_model
    (directory / precision.QDQ_MODEL_FILE).unlink()
    with pytest.raises(BuildError, match="missing model.qdq.onnx.*int8_calib"):
        precision.read_calibration(directory)


# --------------------------------------------------------------------------- accuracy


def test_compare_outputs_metrics():
    ref = {"probs": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), "label": np.array([0, 1])}
    cand = {"probs": np.array([[0.4, 0.6], [0.2, 0.8]], np.float32), "label": np.array([1, 1])}
    m = precision.compare_outputs(ref, cand)
    assert m["top1_agreement"] == 0.5 and m["exact_agreement"] == 0.5
    assert m["max_abs_error"] == pytest.approx(0.5)
    assert m["rel_l2_error"] == pytest.approx(np.sqrt(0.5) / np.linalg.norm([0.9, 0.1, 0.2, 0.8]), rel=1e-6)
    assert m["samples"] == 2
    with pytest.raises(BuildError, match="does not produce output"):
        precision.compare_outputs(ref, {"probs": cand["probs"]})


@pytest.mark.parametrize(
    "mode,metrics,ok",
    [
        ("float32", {"rel_l2_error": 5e-5}, True),
        ("float32", {"rel_l2_error": 2e-4}, False),
        ("float16", {"rel_l2_error": 9e-3}, True),
        ("float16", {"rel_l2_error": 2e-2}, False),
        ("int8", {"rel_l2_error": 0.3, "top1_agreement": 0.98}, True),
        ("int8", {"rel_l2_error": 0.01, "top1_agreement": 0.96}, False),
    ],
)
def test_check_accuracy_thresholds(mode, metrics, ok):
    if ok:
        assert precision.check_accuracy(mode, metrics)["passed"]
        return
    with pytest.raises(BuildError, match="--accept-accuracy-loss"):
        precision.check_accuracy(mode, metrics)
    verdict = precision.check_accuracy(mode, metrics, accept_loss=True)
    assert not verdict["passed"] and verdict["accepted_loss"]
