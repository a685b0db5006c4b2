"""A model TensorRT's parser refuses: a clear error, or (fallback: onnxruntime) served by ONNX Runtime."""

import numpy as np
import onnxruntime as ort
import pytest

from tests.unit.fake_tensorrt import FakeTensorRT
from workers.actor import FleetWorker, WorkerSpec
from workers.artifacts import RepositoryObject
from workers.build import BuildRequest, build_artifact
from workers.kserve.codec import InferRequest
from workers.engines.tensorrt import OnnxParserFailed
from workers.engines.tensorrt.compat import TrtApi
from workers.manifest import Manifest
from workers.storage import StoreSpec
from workers.targets import Target

H100_PLAN = Target("tensorrt", "10.16.1.11", "9.0", provider="tensorrt")


def test_parser_failure_names_node_and_operator(tmp_path, demo_models):
    request = BuildRequest(str(demo_models["digits-mlp"]), "digits-mlp", H100_PLAN)
    with pytest.raises(OnnxParserFailed, match=r"\(operator ArrayFeatureExtractor\).*No importer registered"):
        build_artifact(request, tmp_path, trt_api=TrtApi(FakeTensorRT("10.16.1.11")))
    assert not (tmp_path / "manifest.json").exists()


def test_fallback_onnxruntime_is_really_served_by_onnxruntime(tmp_path, demo_models, digits_test):
    request = BuildRequest(str(demo_models["digits-mlp"]), "digits-mlp", H100_PLAN, fallback="onnxruntime")
    manifest = build_artifact(request, tmp_path, trt_api=TrtApi(FakeTensorRT("10.16.1.11")))
    assert manifest.target.backend == "onnxruntime"
    assert manifest.build_options["fallback_from"] == H100_PLAN.key()
    assert "ArrayFeatureExtractor" in manifest.build_options["fallback_reason"]
    assert Manifest.read(tmp_path) == manifest
    worker = FleetWorker(WorkerSpec("w"))
    worker.load(manifest, RepositoryObject(StoreSpec(str(tmp_path)), manifest.artifact_file))  # a source, never a path
    X = digits_test[0][:16]
    got = worker.infer("digits-mlp", InferRequest({"input": X})).outputs
    want = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})
    np.testing.assert_array_equal(got["label"], want[0])
    np.testing.assert_array_equal(got["probabilities"], want[1])
    worker.shutdown()
