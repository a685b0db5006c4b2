"""`fleet import-triton` and `fleet export-triton` without a fleet: real files, real builds, real
ONNX Runtime, the worker's own runner (no Ray). The simulated fleet's test
(tests/integration/test_triton_repository.py) serves the same repository."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cluster import deploy
from cluster.cli import main
from cluster.config import load_config
from cluster.repository import Repository
from cluster.triton.importer import import_repository
from tests.triton_repo import PLAN_FILES, TENSORRT, make_add_constant, make_triton_repository, save, write
from workers.actor import FleetWorker, WorkerSpec
from workers.errors import InvalidConfig, InvalidInput, WarmupFailed
from workers.kserve.codec import InferRequest
from workers.kserve.model_config import read_config
from workers.messages import LoadOptions
from workers.warmup import WarmupInput, WarmupSample


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_triton_repository(tmp_path_factory.mktemp("triton") / "models")


def fleet(*args: str) -> int:
    return main(list(args))


def served(repo: Repository) -> dict:
    """What a repository serves: model -> version -> target keys, inputs, outputs."""
    found: dict = {}
    for art in repo.artifacts():
        m = art.manifest
        entry = found.setdefault(m.model, {}).setdefault(m.version, {"targets": set()})
        entry["targets"].add(m.target.key())
        entry["io"] = ([s.to_dict() for s in m.inputs], [s.to_dict() for s in m.outputs])
    return found


def run_artifact(repo: Repository, model: str, version: str, feeds: dict, target_key: str | None = None) -> dict:
    (art,) = [a for a in repo.artifacts(model) if a.manifest.version == version
              and (target_key is None or a.manifest.target.key() == target_key)]
    session = ort.InferenceSession(repo.read_artifact(art.manifest), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_export_then_import_gives_the_same_models_versions_and_io(source, tmp_path, capsys):
    first, exported, second = tmp_path / "first", tmp_path / "exported", tmp_path / "second"
    assert fleet("import-triton", str(source), "--repository", str(first)) == 1  # two models skipped: rc 1
    err = capsys.readouterr().err
    assert "SKIPPED: model 'stateful' is skipped: the fleet does not serve sequence_batching" in err
    assert "imported 3 model(s), 4 version(s); skipped 2: pythonic, stateful" in err
    assert fleet("export-triton", str(exported), "--repository", str(first), "--target", "all") == 0
    config = read_config((exported / "plan-cc" / "config.pbtxt").read_text(), "plan-cc", pbtxt=True)
    assert dict(config.cc_model_filenames) == {cc: f"model_{cc}.plan" for cc in PLAN_FILES}
    assert {k: v.string_value for k, v in config.parameters.items()} == {f"tensorrt_version:{cc}": v for cc, v in TENSORRT.items()}
    assert not config.default_model_filename  # a Triton on another GPU fails loudly
    assert sorted(p.name for p in (exported / "versioned").iterdir()) == ["2", "3", "config.pbtxt"]
    assert fleet("import-triton", str(exported), "--repository", str(second)) == 0
    a, b = Repository(first), Repository(second)
    assert served(a) == served(b)
    assert served(a)["plan-cc"]["1"]["targets"] == {
        "tensorrt-10.16.1-sm75-sim", "tensorrt-8.6.1-sm61-sim", "tensorrt-10.4.0-sm70-sim"}
    assert sorted(served(a)["versioned"]) == ["2", "3"]
    configs_a, configs_b = a.triton_configs(), b.triton_configs()
    assert configs_a["simple"]["warmup/ones.bin"] == configs_b["simple"]["warmup/ones.bin"]
    for model in ("simple", "versioned", "plan-cc"):
        ca, cb = (read_config(c[model]["config.pbtxt"].decode(), model, pbtxt=True) for c in (configs_a, configs_b))
        for field in ("max_batch_size", "input", "output", "dynamic_batching", "instance_group", "version_policy",
                      "model_warmup"):
            assert getattr(ca, field) == getattr(cb, field), (model, field)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for key in served(a)["plan-cc"]["1"]["targets"]:
        np.testing.assert_array_equal(run_artifact(a, "plan-cc", "1", {"x": x}, key)["y"],
                                      run_artifact(b, "plan-cc", "1", {"x": x}, key)["y"])


def test_export_for_one_target_writes_only_its_plan(source, tmp_path):
    repo, exported = tmp_path / "repo", tmp_path / "exported"
    import_repository(source, Repository(repo))
    assert fleet("export-triton", str(exported), "--repository", str(repo), "--target", "7.5") == 0
    config = read_config((exported / "plan-cc" / "config.pbtxt").read_text(), "plan-cc", pbtxt=True)
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"7.5": "model_7.5.plan"}
    assert sorted(p.name for p in (exported / "plan-cc" / "1").iterdir()) == ["model_7.5.plan"]
    assert (exported / "plan-cc" / "1" / "model_7.5.plan").read_bytes() == (source / "plan-cc" / "1" / PLAN_FILES["7.5"]).read_bytes()
    # built on this machine's CPU, the ONNX models have no 7.5 plan: exported as ONNX, which runs on any GPU
    simple = read_config((exported / "simple" / "config.pbtxt").read_text(), "simple", pbtxt=True)
    assert simple.platform == "onnxruntime_onnx" and (exported / "simple" / "1" / "model.onnx").is_file()
    assert (exported / "simple" / "warmup" / "ones.bin").read_bytes() == (source / "simple" / "warmup" / "ones.bin").read_bytes()


def test_a_changed_version_policy_removes_what_it_no_longer_selects(tmp_path):
    src, repo = tmp_path / "src", Repository(tmp_path / "repo")
    for version in (1, 2, 3):
        make_add_constant(src / "m" / str(version) / "model.onnx", 100.0 * version)
    write(src / "m" / "config.pbtxt", "max_batch_size: 4 version_policy { latest { num_versions: 2 } }")
    assert import_repository(src, repo).imported == {"m": ["2", "3"]}
    write(src / "m" / "config.pbtxt", "max_batch_size: 4 version_policy { specific { versions: [ 1 ] } }")
    assert import_repository(src, repo).imported == {"m": ["1"]}
    assert repo.models() == {"m": ["1"]}
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(run_artifact(repo, "m", "1", {"x": x})["y"], x + 100)


def test_reshape_and_the_outputs_listed_are_served_as_declared(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("Add", ["x", "two"], ["z"])]
    original = save(helper.make_graph(nodes, "flat", [x], [y, z], [two]), tmp_path / "src" / "flat" / "1" / "model.onnx")
    write(tmp_path / "src" / "flat" / "config.pbtxt", """max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape { shape: [ 4 ] } } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape { shape: [ 4 ] } } ]""")
    repo = Repository(tmp_path / "repo")
    assert import_repository(tmp_path / "src", repo).imported == {"flat": ["1"]}
    (art,) = repo.artifacts("flat")
    assert [(s.name, s.shape) for s in art.manifest.inputs] == [("x", (-1, 2, 2))]
    assert [(s.name, s.shape) for s in art.manifest.outputs] == [("y", (-1, 2, 2))]  # z is not listed: dropped
    worker = FleetWorker(WorkerSpec("w"))
    worker.load(art.manifest, repo.object_source(art.manifest))
    batch = np.random.default_rng(0).standard_normal((3, 2, 2)).astype(np.float32)
    got = worker.infer("flat", InferRequest({"x": batch})).outputs
    want = ort.InferenceSession(str(original)).run(["y"], {"x": batch.reshape(3, 4)})[0]
    np.testing.assert_array_equal(got["y"], want.reshape(3, 2, 2))
    assert set(got) == {"y"}


def test_fp16_precision_mode_builds_float16(tmp_path):
    make_add_constant(tmp_path / "src" / "half" / "1" / "model.onnx", 1.0)
    write(tmp_path / "src" / "half" / "config.pbtxt", """max_batch_size: 4
        optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt"
          parameters { key: "precision_mode" value: "FP16" } } ] } }""")
    repo = Repository(tmp_path / "repo")
    assert import_repository(tmp_path / "src", repo).imported == {"half": ["1"]}
    (art,) = repo.artifacts("half")
    assert art.manifest.precision == "float16"
    x = np.full((2, 4), 0.5, np.float32)
    np.testing.assert_allclose(run_artifact(repo, "half", "1", {"x": x})["y"], x + 1, rtol=1e-3)


def test_an_optional_input_may_be_left_out(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    default = numpy_helper.from_array(np.array([2.0], np.float32), "scale")  # an initializer that is an input too
    save(helper.make_graph([helper.make_node("Mul", ["x", "scale"], ["y"])], "scaled", [x, scale], [y], [default]),
         tmp_path / "src" / "scaled" / "1" / "model.onnx")
    write(tmp_path / "src" / "scaled" / "config.pbtxt", """max_batch_size: 0
        input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] },
                { name: "scale" data_type: TYPE_FP32 dims: [ 1 ] optional: true } ]""")
    repo = Repository(tmp_path / "repo")
    assert import_repository(tmp_path / "src", repo).imported == {"scaled": ["1"]}
    (art,) = repo.artifacts("scaled")
    assert [(s.name, s.optional) for s in art.manifest.inputs] == [("x", False), ("scale", True)]
    worker = FleetWorker(WorkerSpec("w"))
    worker.load(art.manifest, repo.object_source(art.manifest))
    ones = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(worker.infer("scaled", InferRequest({"x": ones})).outputs["y"], ones * 2)
    three = {"x": ones, "scale": np.array([3.0], np.float32)}
    np.testing.assert_array_equal(worker.infer("scaled", InferRequest(three)).outputs["y"], ones * 3)
    with pytest.raises(InvalidInput, match="missing input 'x'"):
        worker.infer("scaled", InferRequest({"scale": np.array([3.0], np.float32)}))


def test_problems_in_files_skip_that_model_and_say_what_to_do(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source / "plan-cc", src / "no-version")
    text = (src / "no-version" / "config.pbtxt").read_text()
    write(src / "no-version" / "config.pbtxt", "\n".join(l for l in text.splitlines() if "tensorrt_version" not in l))
    shutil.copytree(source / "simple", src / "wrong-type")
    write(src / "wrong-type" / "config.pbtxt", (source / "simple" / "config.pbtxt").read_text()
          .replace('name: "simple"', "").replace("TYPE_INT32", "TYPE_FP32"))
    shutil.copytree(source / "versioned", src / "fine")
    report = import_repository(src, Repository(tmp_path / "repo"))
    assert report.imported == {"fine": ["2", "3"]}
    assert 'no TensorRT version stated (parameters { key: "tensorrt_version"' in report.skipped["no-version"]
    assert "input 'INPUT0' is INT32 in the model, the configuration says TYPE_FP32" in report.skipped["wrong-type"]


def test_a_triton_repository_given_as_the_fleets_own_is_named(source, tmp_path):
    with pytest.raises(InvalidConfig, match="is a Triton model repository .*point `triton_repository`"):
        deploy.check_repository(load_config(None, repository=str(source)))
    with pytest.raises(InvalidConfig, match="triton_repository .*missing is not a directory"):
        deploy.check_repository(load_config(None, repository=str(tmp_path / "repo"), triton_repository=str(tmp_path / "missing")))


def test_warm_up_runs_before_the_engine_serves_and_a_failing_one_keeps_it_out(source, tmp_path):
    repo = Repository(tmp_path / "repo")
    import_repository(source, repo)
    (art,) = repo.artifacts("simple")
    ones = WarmupInput("INPUT0", "INT32", (16,), "file", np.ones(16, np.int32).tobytes())
    good = WarmupSample("ones", (ones, WarmupInput("INPUT1", "INT32", (16,))), batch_size=4, runs=3)
    worker = FleetWorker(WorkerSpec("w"))
    worker.load(art.manifest, repo.object_source(art.manifest), LoadOptions(warmup=(good,), slots=3))
    stats = worker.runner.engine_stats()[art.manifest.engine_key]
    assert (stats["warmup_runs"], stats["slots"], stats["success"]) == (3, 3, 0)
    bad = WarmupSample("wrong", (WarmupInput("INPUT0", "FP32", (16,)), WarmupInput("INPUT1", "INT32", (16,))), 4)
    other = FleetWorker(WorkerSpec("w2"))
    with pytest.raises(WarmupFailed, match="model 'simple': warm-up sample 'wrong' failed, so the engine takes no traffic"):
        other.load(art.manifest, repo.object_source(art.manifest), LoadOptions(warmup=(bad,)))
    assert other.health().loaded == frozenset() and other.health().used_bytes == 0
