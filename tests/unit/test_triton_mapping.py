"""What the fleet serves of a Triton config.pbtxt, and what it refuses (pure: no files, no Ray)."""

import pytest

from cluster.triton.mapping import (
    imported_options, plan_files, read_model, select_versions, tensor_problems, tensorrt_version, warmup_problems,
)
from workers.errors import ImportRefused
from workers.kserve.model_config import read_config
from workers.messages import LoadOptions
from workers.tensors import TensorSpec

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 4)),)
ONE = {"1": {"model.onnx"}}


def config(text: str):
    return read_config(text, "m", pbtxt=True)


@pytest.mark.parametrize("text, present, expected", [
    ("", ["1", "2", "10"], ["10"]),  # Triton's default: the latest one
    ("version_policy { latest { num_versions: 2 } }", ["1", "2", "3"], ["2", "3"]),
    ("version_policy { all { } }", ["3", "1", "2"], ["1", "2", "3"]),
    ("version_policy { specific { versions: [ 1, 3, 7 ] } }", ["1", "2", "3"], ["1", "3"]),
])
def test_version_policy(text, present, expected):
    selected, notes = select_versions(config(text), present)
    assert selected == expected
    assert bool(notes) == ("7" in text)  # a version named without a directory is reported


def test_everything_the_fleet_does_not_serve_is_named_in_one_message():
    text = """platform: "onnxruntime_onnx" sequence_batching { } batch_input [ { kind: BATCH_ELEMENT_COUNT } ]
              model_transaction_policy { decoupled: true }
              input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] allow_ragged_batch: true } ]"""
    with pytest.raises(ImportRefused) as err:
        read_model("m", text, ONE)
    message = err.value.message
    assert message.startswith("model 'm' is skipped: the fleet does not serve ")
    for field in ("batch_input", "sequence_batching", "model_transaction_policy decoupled", "input 'x' allow_ragged_batch"):
        assert field in message


@pytest.mark.parametrize("text, says", [
    ('platform: "ensemble" ensemble_scheduling { }', "platform/backend ensemble"),
    ('backend: "python"', "platform/backend python"),
    ('platform: "onnxruntime_onnx" backend: "tensorrt"', "platform/backend onnxruntime_onnx"),
    ('name: "other"', "names it 'other'"),
    ('max_batch_size: "eight"', "not valid protobuf text"),
    ('platform: "tensorrt_plan" input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]',
     "reshape on a TensorRT plan"),
    ('platform: "onnxruntime_onnx" optimization { execution_accelerators { gpu_execution_accelerator [ { name: '
     '"tensorrt" parameters { key: "precision_mode" value: "INT8" } } ] } }', "needs calibration data"),
])
def test_models_it_cannot_serve_are_refused_with_the_reason(text, says):
    with pytest.raises(ImportRefused, match=says):
        read_model("m", text, {"1": {"model.onnx", "model.plan"}})


def test_hints_are_noted_and_fp16_builds_float16():
    text = """platform: "onnxruntime_onnx" max_batch_size: 8
              instance_group [ { count: 3 kind: KIND_GPU gpus: [ 0, 1 ] } ]
              dynamic_batching { priority_levels: 2 }
              optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt"
                parameters { key: "precision_mode" value: "FP16" }
                parameters { key: "max_workspace_size_bytes" value: "1073741824" } } ] } }
              response_cache { enable: true }"""
    plan = read_model("m", text, ONE)
    assert plan.precision == "float16" and plan.kind == "onnx" and plan.versions == ["1"]
    notes = " | ".join(plan.notes)
    for noted in ("kind KIND_GPU", "gpus [0, 1]", "count 3 is obeyed", "dynamic_batching priority_levels",
                  "tensorrt accelerator parameter max_workspace_size_bytes", "response_cache"):
        assert noted in notes


def test_platform_comes_from_the_model_file_without_one():
    assert read_model("m", None, ONE).kind == "onnx"
    assert read_model("m", "max_batch_size: 2", {"1": {"model.plan"}}).kind == "plan"


@pytest.mark.parametrize("text, inputs, outputs, says", [
    ('max_batch_size: 8 input [ { name: "x" data_type: TYPE_INT32 dims: [ 4 ] } ]', X, Y, "'x' is FP32 in the model"),
    ('max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] } ]', X, Y, "has dims [4] in the model"),
    ('max_batch_size: 8 input [ { name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]', X, Y, "'z' is not one of the model's"),
    ('max_batch_size: 8 output [ { name: "y" data_type: TYPE_FP32 dims: [ 4, 1 ] } ]', X, Y, "output 'y' has dims [4]"),
    ('max_batch_size: 8', (TensorSpec("x", "FP32", (1, 4)),), Y, "without a dynamic batch dimension first"),
    ('max_batch_size: 0 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', X, Y, "has dims [-1, 4] in the model"),
    ('max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 6 ] reshape { shape: [ 4 ] } } ]', X, Y,
     "dims [6] (6 values) cannot be reshaped to [4]"),
    ('max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]', X, Y,
     "optional in the configuration, and the model has no default"),
    ('max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]',
     X + (TensorSpec("k", "INT64", (-1, 1)),), Y, "the model's input 'k' is not in the configuration"),
])
def test_inputs_and_outputs_are_checked_against_the_model(text, inputs, outputs, says):
    problems = tensor_problems(config(text), inputs, outputs)
    assert any(says in p for p in problems), problems


def test_matching_io_reshape_and_dynamic_dims_pass():
    text = """max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape { shape: [ 4 ] } } ]
              output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]"""
    assert tensor_problems(config(text), X, Y) == []
    dynamic = (TensorSpec("x", "FP32", (-1, -1)),)
    assert tensor_problems(config('max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 7 ] } ]'),
                           dynamic, Y) == []


def test_plan_files_and_their_tensorrt_versions():
    text = """platform: "tensorrt_plan" cc_model_filenames [ { key: "7.5" value: "t4.plan" }, { key: "8.6" value: "a10.plan" } ]
              parameters { key: "tensorrt_version" value { string_value: "10.16.1" } }
              parameters { key: "tensorrt_version:6.1" value { string_value: "8.6.1" } }
              parameters { key: "compute_capability" value { string_value: "6.1" } }"""
    chosen, problems = plan_files(config(text), {"t4.plan", "model.plan"})
    assert chosen == {"7.5": "t4.plan", "6.1": "model.plan"}
    assert problems == ["cc_model_filenames names a10.plan for 8.6, which is not there"]
    assert tensorrt_version(config(text), "7.5") == "10.16.1" and tensorrt_version(config(text), "6.1") == "8.6.1"
    assert tensorrt_version(config('platform: "tensorrt_plan"'), "7.5") is None
    _, problems = plan_files(config('platform: "tensorrt_plan"'), {"model.plan"})
    assert "no compute capability for it" in problems[0]


def test_serving_options_of_a_whole_config():
    base = LoadOptions(max_queue_size=256)
    text = """max_batch_size: 8 instance_group [ { count: 2 }, { count: 1 kind: KIND_CPU } ]
              dynamic_batching { preferred_batch_size: [ 4 ] default_queue_policy { max_queue_size: 9 } }"""
    options = imported_options(config(text), base, {})
    assert (options.slots, options.max_batch, options.preferred_batch_sizes, options.max_queue_size) == (3, 8, (4,), 9)
    assert options.dynamic_batching and options.max_queue_delay_us == 0  # Triton's default delay
    assert not imported_options(config("max_batch_size: 8"), base, {}).dynamic_batching  # no dynamic_batching: off
    assert not imported_options(config("dynamic_batching { }"), base, {}).dynamic_batching  # max_batch_size 0: off
    assert imported_options(config("max_batch_size: 8"), base, {}).slots is None  # no groups: the fleet's slots


WARMUP = """max_batch_size: 8 model_warmup [ { name: "w" batch_size: 2 count: 2
  inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 4 ] %s } } } ]"""


@pytest.mark.parametrize("source, files, says", [
    ("zero_data: true", {}, None),
    ("random_data: true", {}, None),
    ('input_data_file: "x.bin"', {"x.bin": b"\0" * 16}, None),
    ('input_data_file: "x.bin"', {}, "warmup/x.bin, which is not there"),
    ('input_data_file: "x.bin"', {"x.bin": b"\0" * 12}, "holds 3 FP32 values, dims [4] need 4"),
])
def test_warmup_samples_are_checked(source, files, says):
    problems = warmup_problems(config(WARMUP % source), files, X)
    assert problems == [] if says is None else any(says in p for p in problems), problems
    if says is None:
        (sample,) = imported_options(config(WARMUP % source), LoadOptions(), files).warmup
        assert sample.runs == 2 and sample.feeds()["x"].shape == (2, 4)


def test_warmup_for_other_inputs_is_refused():
    text = WARMUP.replace('key: "x"', 'key: "z"') % "zero_data: true"
    assert "input 'z' is not one of the model's" in warmup_problems(config(text), {}, X)[0]
