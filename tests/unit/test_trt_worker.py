"""TensorRT plans through the worker's runner, with the fake TensorRT and CUDA modules.

The runner must open a plan the way ``can_run`` accepted it: a version-compatible plan
with its embedded lean runtime allowed (full TensorRT), and only when the model's config
trusts it; on a worker with only the lean runtime, with the lean module.
"""

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cluster.config import FleetConfig
from tests.unit.fake_cuda import FakeCuda
from tests.unit.fake_tensorrt import FakeTensorRT
from workers import precision
from workers.devices import Device
from workers.engines import open_engine
from workers.engines.onnxruntime import describe_model
from workers.engines.tensorrt import TrtBuildOptions, build_plan
from workers.engines.tensorrt.compat import TrtApi
from workers.errors import IncompatibleArtifact
from workers.kserve.codec import InferRequest
from workers.manifest import MANIFEST_NAME, Manifest, sha256_file
from workers.messages import LoadOptions
from workers.runner import EngineRunner
from workers.targets import Runtime, Target, WorkerCaps

H100 = Device("NVIDIA H100 80GB HBM3", "GPU-0000", "gpu", "9.0", 80 << 30)


@pytest.fixture(scope="module")
def plans(tmp_path_factory, demo_models):
    """cnn-small as a TensorRT 10.16 plan, built by the fake builder: version-compatible and not
    (each with the plan file, as a worker's artifact cache hands it to the runner)."""
    source = demo_models["cnn-small"]
    inputs, outputs = describe_model(source)
    made = {}
    for vc in (True, False):
        out = tmp_path_factory.mktemp("vc" if vc else "plain")
        info = build_plan(source, out / "model.plan", TrtBuildOptions(inputs=inputs, max_batch=8, version_compatible=vc),
                          api=TrtApi(FakeTensorRT("10.16.1.11")))
        target = Target("tensorrt", "10.16.1", "9.0", provider="tensorrt", version_compatible=vc)
        manifest = Manifest("cnn", "1", "float32", target, "model.plan", sha256_file(info.plan_path), sha256_file(source),
                            inputs, outputs, footprint_bytes=64 << 20, max_batch=8)
        (out / MANIFEST_NAME).write_text(manifest.to_json())
        made[vc] = (manifest, out / "model.plan")
    return made


def runner_with(label: str, lean: bool):
    fake = FakeTensorRT(label)
    caps = WorkerCaps("h100-0", H100, (Runtime("onnxruntime", "1.22", "cpu"), Runtime("tensorrt", "10.16.1", "tensorrt", lean=lean)))
    factory = functools.partial(open_engine, trt_api=TrtApi(fake), cuda_module=FakeCuda())
    return fake, EngineRunner(caps, 8 << 30, slots=2, engine_factory=factory)


def run_cnn(runner, source):
    x = np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype(np.float32)
    got = runner.infer(InferRequest({"input": x}), "cnn").outputs["logits"]
    np.testing.assert_allclose(got, precision.run_model(source, {"input": x})["logits"], rtol=1e-5, atol=1e-5)


def test_version_compatible_plan_needs_its_sha256_pinned(plans):
    manifest, plan = plans[True]
    _, runner = runner_with("10.16.1.11", lean=False)
    with pytest.raises(IncompatibleArtifact, match=rf"models\.cnn\.trusted_sha256: \[{manifest.artifact_sha256}\]"):
        runner.load(manifest, plan)
    # trusting the model by name is not even expressible: a writer of the repository could swap the plan
    with pytest.raises(ValidationError, match="trust is pinned by content"):
        FleetConfig.model_validate({"models": {"cnn": {"trust_version_compatible": True}}})
    assert runner.health().loaded == frozenset() and runner.ledger.used_bytes == 0


def test_swapped_plan_with_a_pinned_sha256_is_refused(plans, tmp_path):
    """A writer of the bucket swaps the plan and writes a manifest to match: the pin refuses it."""
    manifest, plan = plans[True]
    swapped_bytes = Path(plan).read_bytes() + b"\0evil"
    swapped = tmp_path / "swapped.plan"
    swapped.write_bytes(swapped_bytes)
    forged = dataclasses.replace(manifest, artifact_sha256=hashlib.sha256(swapped_bytes).hexdigest())
    _, runner = runner_with("10.16.1.11", lean=False)
    pinned = LoadOptions(trusted_sha256=(manifest.artifact_sha256,))
    with pytest.raises(IncompatibleArtifact, match=r"is not pinned in models\.cnn\.trusted_sha256.*may have been swapped"):
        runner.load(forged, swapped, pinned)
    assert runner.health().loaded == frozenset()
    runner.load(manifest, plan, pinned)  # the pinned one loads
    assert runner.health().loaded == frozenset({manifest.engine_key})
    runner.close()


def test_trusted_version_compatible_plan_loads_with_host_code_allowed(plans, demo_models):
    manifest, plan = plans[True]
    fake, runner = runner_with("10.16.1.11", lean=False)
    runner.load(manifest, plan, LoadOptions(trusted_sha256=(manifest.artifact_sha256,)))
    assert fake.assignments == [("Runtime.engine_host_code_allowed", True)]
    run_cnn(runner, demo_models["cnn-small"])
    runner.close()


def test_lean_worker_runs_version_compatible_plans_with_the_lean_runtime(plans, demo_models):
    manifest, plan = plans[True]
    fake, runner = runner_with("lean-10.16.1.11", lean=True)
    runner.load(manifest, plan, LoadOptions(trusted_sha256=(manifest.artifact_sha256,)))
    assert fake.assignments == []  # the lean runtime has no engine_host_code_allowed
    run_cnn(runner, demo_models["cnn-small"])
    plain, plain_plan = plans[False]
    with pytest.raises(IncompatibleArtifact, match="lean runtime 10.16.1 runs version-compatible plans only"):
        runner.load(plain, plain_plan)
    runner.close()


def test_plain_plan_loads_on_full_tensorrt_without_host_code(plans, demo_models):
    manifest, plan = plans[False]
    fake, runner = runner_with("10.16.1.11", lean=False)
    runner.load(manifest, plan)
    assert fake.assignments == []
    assert json.loads(plan.read_text())  # the fake's plan is JSON: it was really parsed
    run_cnn(runner, demo_models["cnn-small"])
    runner.close()
