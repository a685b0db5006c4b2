"""Triton's model configuration of a fleet model, both ways, and Triton's statistics (pure)."""

import pytest

from cluster.controller.views import model_statistics
from workers.errors import InvalidInput
from workers.kserve.model_config import apply_config, config_json, model_config, read_config
from workers.kserve.proto import model_config_pb2 as mc
from workers.manifest import Manifest
from workers.messages import LoadOptions
from workers.targets import Target
from workers.tensors import TensorSpec

INPUTS = (TensorSpec("INPUT0", "INT32", (-1, 16)), TensorSpec("INPUT1", "INT32", (-1, 16)))
OUTPUTS = (TensorSpec("OUTPUT0", "INT32", (-1, 16)), TensorSpec("OUTPUT1", "INT32", (-1, 16)))


def simple(max_batch: int = 8, inputs=INPUTS) -> Manifest:
    target = Target("onnxruntime", "1.20.0", "any", provider="cpu")
    return Manifest("simple", "1", "float32", target, "model.onnx", "0" * 64, "1" * 64, inputs, OUTPUTS, 10, max_batch)


def test_the_config_is_tritons_shape_with_numbers():
    options = LoadOptions(max_queue_delay_us=300, preferred_batch_sizes=(4, 8))
    data = config_json(model_config([simple()], options, slots=2, gpu=False))
    assert data["name"] == "simple" and data["platform"] == "onnxruntime_onnx" and data["backend"] == "onnxruntime"
    assert data["max_batch_size"] == 8
    assert data["input"][0]["data_type"] == "TYPE_INT32" and data["input"][0]["dims"] == [16]
    assert data["output"][1]["name"] == "OUTPUT1" and data["output"][1]["dims"] == [16]
    assert data["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert data["dynamic_batching"]["max_queue_delay_microseconds"] == 300  # uint64: a number, not "300"
    assert data["instance_group"] == [{"name": "simple", "kind": "KIND_CPU", "count": 2, "gpus": [], "secondary_devices": [],
                                       "profile": [], "passive": False, "host_policy": ""}]


def test_a_model_without_a_batch_dimension_has_max_batch_size_0_and_full_dims():
    fixed = (TensorSpec("INPUT0", "INT32", (2, 16)), TensorSpec("INPUT1", "INT32", (2, 16)))
    m = Manifest("simple", "1", "float32", simple().target, "model.onnx", "0" * 64, "1" * 64, fixed, fixed, 10)
    data = config_json(model_config([m], LoadOptions(), slots=1, gpu=True))
    assert data["max_batch_size"] == 0 and data["input"][0]["dims"] == [2, 16]
    assert "dynamic_batching" not in data and data["instance_group"][0]["kind"] == "KIND_GPU"


def test_an_override_is_applied_within_what_the_artifact_was_built_for():
    options = apply_config(read_config('{"max_batch_size": "16"}', "simple"), simple(64), LoadOptions())
    assert options.max_batch == 16 and options.max_batch_for(64) == 16
    data = config_json(model_config([simple(64)], options, slots=1, gpu=False))
    assert data["max_batch_size"] == 16
    options = apply_config(read_config('{"dynamic_batching": {"max_queue_delay_microseconds": 100}}', "simple"),
                           simple(), LoadOptions())
    assert options.max_queue_delay_us == 100 and options.dynamic_batching


@pytest.mark.parametrize("text, message", [
    ('"parameters": {"config": {{"max_batch_size": "16"}}}', "not valid JSON of Triton's ModelConfig"),
    ('{"max_batch_size": 128}', "max_batch_size 128 is over the 64 its artifact was built for"),
    ('{"name": "other"}', "is for model 'other'"),
    ('{"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}]}', "INPUT0' is INT32 in the model"),
    ('{"input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [8]}]}', "has dims [16] in the model"),
    ('{"output": [{"name": "NOPE", "data_type": "TYPE_INT32", "dims": [16]}]}', "names output 'NOPE'"),
    ('{"sequence_batching": {}}', "does not serve sequence_batching"),
    ('{"platform": "tensorrt_plan"}', "served as onnxruntime_onnx"),
])
def test_a_bad_override_fails_to_load_naming_the_problem(text, message):
    with pytest.raises(InvalidInput, match="failed to load 'simple'") as caught:
        apply_config(read_config(text, "simple"), simple(64), LoadOptions())
    assert message in caught.value.message


def test_pbtxt_reads_as_triton_writes_it():
    config = read_config('name: "simple"\nmax_batch_size: 8\ninput [{ name: "INPUT0" data_type: TYPE_INT32 dims: [16] }]',
                         "simple", pbtxt=True)
    assert config.input[0].data_type == mc.TYPE_INT32 and apply_config(config, simple(), LoadOptions()).max_batch == 8


def test_statistics_sum_every_worker_in_tritons_shape():
    engine = {"model": "simple", "version": "1", "success": 3, "failure": 1, "inference_count": 5, "exec_count": 2,
              "queue_us": 30.0, "request_compute_us": 90.0, "last_inference_ms": 1000,
              "batch_sizes": {"1": 1, "4": 1}, "batch_compute_us": {"1": 10.0, "4": 40.0}}
    other = dict(engine, last_inference_ms=2000, batch_sizes={"4": 2}, batch_compute_us={"4": 70.0})
    views = {"w1": {"engines": {"k": engine, "x": dict(engine, model="other")}}, "w2": {"engines": {"k": other}}}
    stats = model_statistics(views, [("simple", "1")])["model_stats"]
    assert len(stats) == 1
    s = stats[0]
    assert (s["name"], s["version"], s["last_inference"]) == ("simple", "1", 2000)
    assert s["inference_count"] == 10 and s["execution_count"] == 4
    assert s["inference_stats"]["success"] == {"count": 6, "ns": 240_000}
    assert s["inference_stats"]["queue"] == {"count": 6, "ns": 60_000}
    assert s["inference_stats"]["compute_infer"] == {"count": 6, "ns": 180_000}
    assert s["inference_stats"]["fail"]["count"] == 2
    assert [(b["batch_size"], b["compute_infer"]) for b in s["batch_stats"]] == [
        (1, {"count": 1, "ns": 10_000}), (4, {"count": 3, "ns": 110_000})]
