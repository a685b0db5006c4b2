"""The TensorRT backend's version branching, driven by fake modules generated from the real names.

Each fake raises AttributeError for any name its version's binding wheel lacks, so a
path that reaches for a missing name fails here as it would on that TensorRT. Nothing
here runs real TensorRT (it cannot be installed on these machines).
"""

import base64
import json
import threading

import numpy as np
import onnx
import pytest

from tests.unit.fake_cuda import FakeCuda
from tests.unit.fake_tensorrt import FakeTensorRT
from tests.unit.fake_trt_world import FakeWorld
from workers import precision
from workers.engines.onnxruntime import describe_model
from workers.engines.tensorrt import (
    OnnxParserFailed,
    TensorRTEngine,
    TrtBuildOptions,
    build_plan,
    plan_footprint,
)
from workers.engines.tensorrt.compat import TrtApi
from workers.errors import BuildError, IncompatibleArtifact, InvalidConfig, InvalidInput, NoCapacity, NotReady

FULL = ["8.6.1", "10.16.1.11", "11.4.0.106"]


@pytest.fixture(scope="module")
def cnn(demo_models):
    inputs, _ = describe_model(demo_models["cnn-small"])
    return demo_models["cnn-small"], inputs


@pytest.fixture(scope="module")
def cnn_calibration(cnn):
    x = np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32)
    return precision.calibrate(cnn[0], [{"input": x[:4]}, {"input": x[4:]}], "minmax")


def build(label, cnn, tmp_path, world=None, calibration=None, **options):
    fake = FakeTensorRT(label, world)
    path, inputs = cnn
    info = build_plan(path, tmp_path / f"{label}.plan", TrtBuildOptions(inputs=inputs, max_batch=8, **options),
                      calibration=calibration, api=TrtApi(fake))
    return fake, info, json.loads(info.plan_path.read_text())


# --------------------------------------------------------------------------- build: precision per version


# Flag values of the real enums (tests/data/trt_signatures/, from each binding wheel):
# EXPLICIT_BATCH is 0 on 8.6; STRONGLY_TYPED is 1 on 10.16 and 0 on 11.4 (EXPLICIT_BATCH gone).
@pytest.mark.parametrize("label,expected", [("8.6.1", 1 << 0), ("10.16.1.11", 0), ("11.4.0.106", 1 << 0)])
def test_float32_network_flags(cnn, tmp_path, label, expected):
    fake, info, plan = build(label, cnn, tmp_path)
    assert plan["network_flags"] == info.network_flags == expected
    assert plan["builder_flags"] == []


@pytest.mark.parametrize("label,expected", [("10.16.1.11", 1 << 1), ("11.4.0.106", 1 << 0)])
def test_float16_networks_are_strongly_typed_from_10_on(cnn, tmp_path, label, expected):
    _, info, plan = build(label, cnn, tmp_path, precision="float16")
    assert plan["network_flags"] == info.network_flags == expected


@pytest.mark.parametrize("label,strongly_typed,flags", [
    ("8.6.1", False, ["FP16"]),  # weakly typed: the flag lets TensorRT pick FP16 kernels
    ("10.16.1.11", True, []),
    ("11.4.0.106", True, []),  # BuilderFlag.FP16 no longer exists
])
def test_float16_builds_the_fp16_onnx(cnn, tmp_path, label, strongly_typed, flags):
    fake, info, plan = build(label, cnn, tmp_path, precision="float16")
    assert info.precision_plan.strongly_typed is strongly_typed
    assert plan["builder_flags"] == flags
    parsed = onnx.load_from_string(base64.b64decode(plan["onnx"]))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in parsed.graph.initializer)


@pytest.mark.parametrize("label", ["8.6.1", "10.16.1.11"])
def test_int8_calibrator_reads_the_stored_cache_with_this_versions_header(cnn, cnn_calibration, tmp_path, label):
    fake, info, plan = build(label, cnn, tmp_path, precision="int8", calibration=cnn_calibration)
    assert info.precision_plan.uses_calibrator and plan["builder_flags"] == ["INT8"]
    header, scales = precision.parse_trt_calibration_cache(plan["calibration_cache"])
    assert header == {"8.6.1": "TRT-8601-EntropyCalibration2", "10.16.1.11": "TRT-101601-EntropyCalibration2"}[label]
    assert scales == pytest.approx({k: v / 127 for k, v in cnn_calibration.amax.items()}, rel=1e-6)


def test_int8_calibrator_on_tensorrt_11_is_a_config_error_not_attribute_error(cnn, cnn_calibration, tmp_path):
    with pytest.raises(InvalidConfig, match="IInt8EntropyCalibrator2.*not available on TensorRT 11.4.0.106.*qdq"):
        build("11.4.0.106", cnn, tmp_path, precision="int8", int8_mode="calibrator", calibration=cnn_calibration)


@pytest.mark.parametrize("label,flags", [("8.6.1", ["INT8"]), ("10.16.1.11", []), ("11.4.0.106", [])])
def test_int8_qdq_builds_the_qdq_model(cnn, cnn_calibration, tmp_path, label, flags):
    mode = None if label.startswith("11") else "qdq"  # qdq is 11's default
    fake, info, plan = build(label, cnn, tmp_path, precision="int8", int8_mode=mode, calibration=cnn_calibration)
    assert plan["builder_flags"] == flags and plan["calibration_cache"] is None
    parsed = onnx.load_from_string(base64.b64decode(plan["onnx"]))
    assert "QuantizeLinear" in {n.op_type for n in parsed.graph.node}


def test_int8_without_calibration_says_run_int8_calib_first(cnn, tmp_path):
    with pytest.raises(BuildError, match=r"run `fleet build \.\.\. --precision int8_calib` first"):
        build("10.16.1.11", cnn, tmp_path, precision="int8")


# --------------------------------------------------------------------------- build: options


@pytest.mark.parametrize("label", FULL)
def test_profile_workspace_timing_cache_and_version_compatible(cnn, tmp_path, label):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier")
    fake, info, plan = build(label, cnn, tmp_path, min_batch=1, opt_batch=4, workspace_bytes=1 << 30,
                             timing_cache_path=str(cache), version_compatible=True, exclude_lean_runtime=True)
    (tensor,) = [t for t in plan["io"] if t["name"] == "input"]
    assert tensor["profile"] == [[1, 3, 64, 64], [4, 3, 64, 64], [8, 3, 64, 64]]
    assert plan["workspace"] == ["WORKSPACE", 1 << 30]
    assert plan["timing_cache"] == "earlier" and cache.read_bytes() == b"earlier+tuned"
    assert plan["builder_flags"] == ["EXCLUDE_LEAN_RUNTIME", "VERSION_COMPATIBLE"]


def test_disabling_cublas_lt_on_10_and_asking_for_it_on_11(cnn, tmp_path):
    world = FakeWorld()
    world.default_tactic_mask = 0b11111
    _, _, plan = build("10.16.1.11", cnn, tmp_path, world=world, tactic_sources={"CUBLAS_LT": False})
    assert plan["tactic_mask"] == 0b11101  # TacticSource.CUBLAS_LT is 1 on 10.16
    with pytest.raises(InvalidConfig, match="tactic source CUBLAS_LT is not available on TensorRT 11.4.0.106.*JIT_CONVOLUTIONS"):
        build("11.4.0.106", cnn, tmp_path, tactic_sources={"CUBLAS_LT": False})


def test_hardware_compatibility_levels(cnn, tmp_path):
    _, _, plan = build("8.6.1", cnn, tmp_path, hardware_compatibility="ampere_plus")
    assert plan["hardware_compatibility_level"] == "AMPERE_PLUS"
    _, _, plan = build("10.16.1.11", cnn, tmp_path, hardware_compatibility="same_compute_capability")
    assert plan["hardware_compatibility_level"] == "SAME_COMPUTE_CAPABILITY"
    with pytest.raises(InvalidConfig, match="HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY is not available on TensorRT 8.6.1"):
        build("8.6.1", cnn, tmp_path, hardware_compatibility="same_compute_capability")


def test_bad_options_are_refused_before_tensorrt(cnn):
    inputs = cnn[1]
    with pytest.raises(InvalidConfig, match="1 <= min <= opt <= max"):
        TrtBuildOptions(inputs=inputs, min_batch=8, max_batch=4)
    with pytest.raises(InvalidConfig, match="version_compatible"):
        TrtBuildOptions(inputs=inputs, exclude_lean_runtime=True)
    from workers.tensors import TensorSpec

    with pytest.raises(InvalidConfig, match="only a dynamic batch"):
        TrtBuildOptions(inputs=(TensorSpec("x", "FP32", (-1, 3, -1, -1)),)).profile_shapes()


def test_lean_runtime_cannot_build(cnn, tmp_path):
    with pytest.raises(InvalidConfig, match="lean runtime only deserializes"):
        build("lean-11.4.0.106", cnn, tmp_path)


def test_builder_failure_carries_the_loggers_words(cnn, tmp_path):
    world = FakeWorld()
    world.build_error = "Error Code 4: Internal Error (no implementation for /conv1/Conv)"
    with pytest.raises(BuildError, match=r"could not build cnn-small.onnx \(float32\): Error Code 4"):
        build("10.16.1.11", cnn, tmp_path, world=world)


# --------------------------------------------------------------------------- parser failures


@pytest.mark.parametrize("label", FULL)
def test_parser_failure_names_node_operator_and_reason(demo_models, tmp_path, label):
    """digits-mlp holds scikit-learn's ArrayFeatureExtractor, which TensorRT's parser has no importer for."""
    inputs, _ = describe_model(demo_models["digits-mlp"])
    fake = FakeTensorRT(label)
    with pytest.raises(OnnxParserFailed) as err:
        build_plan(demo_models["digits-mlp"], tmp_path / "x.plan", TrtBuildOptions(inputs=inputs), api=TrtApi(fake))
    message = str(err.value)
    nodes = onnx.load(demo_models["digits-mlp"]).graph.node
    (index,) = [i for i, n in enumerate(nodes) if n.op_type == "ArrayFeatureExtractor"]
    assert f"node {index} '{nodes[index].name}' (operator ArrayFeatureExtractor)" in message
    assert "UNSUPPORTED_NODE: No importer registered for op: ArrayFeatureExtractor" in message
    assert "fallback: onnxruntime" in message
    assert isinstance(err.value, BuildError)
    # 8.6's ParserError has no node_name()/node_operator(): the names come from the ONNX graph.
    assert ("ParserError.node_name" in fake.touched) is (not label.startswith("8."))


def test_parser_failure_reports_every_error(demo_models, tmp_path):
    inputs, _ = describe_model(demo_models["digits-mlp"])
    world = FakeWorld()
    world.unsupported_domains = {"ai.onnx.ml", ""}  # every node fails
    with pytest.raises(OnnxParserFailed) as err:
        build_plan(demo_models["digits-mlp"], tmp_path / "x.plan", TrtBuildOptions(inputs=inputs),
                   api=TrtApi(FakeTensorRT("10.16.1.11", world)))
    nodes = onnx.load(demo_models["digits-mlp"]).graph.node
    assert f"({len(nodes)} errors)" in str(err.value)
    for node in nodes:
        assert f"(operator {node.op_type})" in str(err.value)


# --------------------------------------------------------------------------- runtime


@pytest.fixture(params=FULL + ["lean-11.4.0.106"])
def plan_for(request, cnn, tmp_path):
    label = request.param
    builder_label = label.removeprefix("lean-")
    _, info, _ = build(builder_label, cnn, tmp_path, version_compatible=label.startswith("lean-"))
    return label, info.plan_path


def test_engine_runs_a_plan_and_matches_onnxruntime(plan_for, cnn):
    label, plan_path = plan_for
    world = FakeWorld()
    world.device_memory_size = 3 << 20  # what TensorRT says each context needs
    fake, cuda = FakeTensorRT(label, world), FakeCuda()
    lean = label.startswith("lean-")
    engine = TensorRTEngine(plan_path, slots=2, version_compatible=lean, lean=lean, api=TrtApi(fake), cuda_module=cuda)
    x = np.random.default_rng(2).standard_normal((5, 3, 64, 64)).astype(np.float32)
    with engine:
        assert [s.name for s in engine.inputs] == ["input"] and engine.inputs[0].shape == (-1, 3, 64, 64)
        out = engine.infer({"input": x})
        # What CUDA really holds, plus each context's device memory and the weights (the plan).
        assert engine.footprint_bytes == cuda.device_bytes + 2 * (3 << 20) + plan_path.stat().st_size
        # Buffers for the largest profile shape, input [8, 3, 64, 64] and output [8, 10], per slot.
        assert cuda.device_bytes == 2 * (8 * 3 * 64 * 64 * 4 + 8 * 10 * 4)
        with pytest.raises(InvalidInput, match="larger than the engine's largest profile shape"):
            engine.infer({"input": np.zeros((9, 3, 64, 64), np.float32)})
    np.testing.assert_allclose(out["logits"], precision.run_model(cnn[0], {"input": x})["logits"], rtol=1e-5, atol=1e-5)
    assert not cuda.device and not cuda.host and not cuda.streams  # everything freed
    device_memory = "ICudaEngine.device_memory_size" + ("" if label.endswith("8.6.1") else "_v2")
    assert device_memory in fake.touched


def test_teardown_order_contexts_engine_runtime_buffers_streams(cnn, tmp_path):
    _, info, _ = build("10.16.1.11", cnn, tmp_path)
    fake = FakeTensorRT("10.16.1.11")
    engine = TensorRTEngine(info.plan_path, slots=3, api=TrtApi(fake), cuda_module=FakeCuda(events=fake.events))
    engine.activate()
    fake.events.clear()
    engine.deactivate()
    order = [e for e in fake.events if e.startswith(("destroy IExecutionContext", "destroy ICudaEngine", "destroy Runtime", "free", "destroy stream"))]
    kinds = [e.split(" ")[1] if e.startswith("destroy") else e.split(" ")[0] for e in order]
    first = {k: kinds.index(k) for k in ("IExecutionContext", "ICudaEngine", "Runtime", "free", "stream")}
    last = {k: len(kinds) - 1 - kinds[::-1].index(k) for k in first}
    assert kinds.count("IExecutionContext") == 3 and kinds.count("stream") == 3
    assert last["IExecutionContext"] < first["ICudaEngine"] < first["Runtime"] < first["free"]
    assert last["free"] < first["stream"]


def test_concurrent_requests_use_one_context_each(cnn, tmp_path):
    _, info, _ = build("11.4.0.106", cnn, tmp_path)
    fake, cuda = FakeTensorRT("11.4.0.106"), FakeCuda()
    engine = TensorRTEngine(info.plan_path, slots=2, api=TrtApi(fake), cuda_module=cuda)
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((2, 3, 64, 64)).astype(np.float32) for _ in range(6)]
    results: dict[int, np.ndarray] = {}
    with engine:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.infer({"input": batches[i]})["logits"]))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, x in enumerate(batches):
        np.testing.assert_allclose(results[i], precision.run_model(cnn[0], {"input": x})["logits"], rtol=1e-5, atol=1e-5)


def test_out_of_device_memory_on_load_is_no_capacity_and_frees_what_it_took(cnn, tmp_path):
    _, info, _ = build("10.16.1.11", cnn, tmp_path)
    cuda = FakeCuda(device_limit=3 * (8 * 3 * 64 * 64 * 4))  # room for fewer than 4 slots
    engine = TensorRTEngine(info.plan_path, slots=4, api=TrtApi(FakeTensorRT("10.16.1.11")), cuda_module=cuda)
    with pytest.raises(NoCapacity, match="out of memory"):
        engine.activate()
    assert not engine.active and not cuda.device and not cuda.host and not cuda.streams


def test_deserialize_failure_quotes_the_tensorrt_logger(cnn, tmp_path):
    _, info, _ = build("10.16.1.11", cnn, tmp_path)
    engine = TensorRTEngine(info.plan_path, api=TrtApi(FakeTensorRT("11.4.0.106")), cuda_module=FakeCuda())
    with pytest.raises(IncompatibleArtifact, match="could not deserialize engine 10.16.1.11.plan with TensorRT 11.4.0.106: Serialization assertion"):
        engine.activate()


def test_runtime_that_logged_an_error_is_refused(cnn, tmp_path):
    """Real tensorrt_lean 11.4 without a GPU logs a CUDA error yet returns a Runtime that then crashes."""
    _, info, _ = build("10.16.1.11", cnn, tmp_path)
    world = FakeWorld()
    world.runtime_error = "CUDA initialization failure with error: 35"
    engine = TensorRTEngine(info.plan_path, api=TrtApi(FakeTensorRT("10.16.1.11", world)), cuda_module=FakeCuda())
    with pytest.raises(NotReady, match="could not create a runtime: CUDA initialization failure"):
        engine.activate()


@pytest.mark.parametrize("label", FULL)
def test_version_compatible_plan_allows_engine_host_code_on_full_runtime(cnn, tmp_path, label):
    _, info, _ = build(label, cnn, tmp_path, version_compatible=True)
    fake = FakeTensorRT(label)
    with TensorRTEngine(info.plan_path, version_compatible=True, api=TrtApi(fake), cuda_module=FakeCuda()) as engine:
        assert fake.assignments == [("Runtime.engine_host_code_allowed", True)]
        assert engine._runtime.engine_host_code_allowed is True


@pytest.mark.parametrize("label", ["lean-8.6.1", "lean-10.16.1.11", "lean-11.4.0.106"])
def test_lean_runtime_never_sets_engine_host_code_allowed(cnn, tmp_path, label):
    _, info, _ = build(label.removeprefix("lean-"), cnn, tmp_path, version_compatible=True)
    fake = FakeTensorRT(label)
    with TensorRTEngine(info.plan_path, version_compatible=True, lean=True, api=TrtApi(fake), cuda_module=FakeCuda()) as engine:
        engine.infer({"input": np.zeros((1, 3, 64, 64), np.float32)})
    assert fake.assignments == []


def test_version_compatible_plan_without_host_code_allowed_is_refused(cnn, tmp_path):
    """What real TensorRT does when the runtime was not told to run the plan's embedded lean runtime."""
    _, info, _ = build("10.16.1.11", cnn, tmp_path, version_compatible=True)
    fake = FakeTensorRT("10.16.1.11")
    api = TrtApi(fake)
    logger = api.new_logger()
    runtime = api.create_runtime(logger)
    assert runtime.deserialize_cuda_engine(info.plan_path.read_bytes()) is None
    assert any("engine_host_code_allowed" in error for error in logger.errors_since(0))
    runtime.engine_host_code_allowed = True
    assert runtime.deserialize_cuda_engine(info.plan_path.read_bytes()) is not None


def test_unsupported_tensorrt_major_is_refused():
    fake = FakeTensorRT("10.16.1.11")
    fake.__version__ = "9.0.0"
    with pytest.raises(InvalidConfig, match="TensorRT 9.0.0 is not supported"):
        TrtApi(fake)


def test_footprint_formula():
    assert plan_footprint(device_memory_bytes=100, slots=4, plan_bytes=1000, io_bytes_per_slot=10) == 100 * 4 + 1000 + 40
