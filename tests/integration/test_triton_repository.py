"""A Triton model repository, served as it is on the simulated T4 / P4 / V100 fleet (configs/hetero-sim.yaml).

The fleet is deployed with ``triton_repository`` pointing at a repository of real files
(tests/triton_repo.py): it imports it (ONNX built on the workers for every target, "plans"
published per compute capability, two models refused) and loads it. Then Triton's own
clients (tritonclient, HTTP and gRPC) ask it, and every answer is compared with ONNX
Runtime run directly on the same file.
"""

import collections
import io
import threading

import numpy as np
import onnxruntime as ort
import pytest
import ray
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from cluster.buildfarm import FleetRepository
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.repository import Repository
from cluster.triton.export import export_repository
from cluster.triton.importer import import_repository
from tests.integration.fleet_fixtures import running_fleet, simulated_cluster
from tests.triton_repo import PLAN_CONSTANTS, PLAN_FILES, SIMPLE_CONFIG, TENSORRT, make_triton_repository
from workers.kserve.model_config import config_json, read_config
from workers.messages import LoadOptions
from workers.targets import same_release

pytestmark = pytest.mark.integration
CONFIG = "configs/hetero-sim.yaml"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton-repo")
    source = make_triton_repository(work / "triton")
    with simulated_cluster(CONFIG) as cluster:
        with running_fleet(CONFIG, work / "repo", cluster_address=cluster.address,
                           triton_repository=str(source)) as (config, url):
            yield {"url": url, "http": url.removeprefix("http://"), "grpc": f"127.0.0.1:{config.grpc_port}",
                   "source": source, "controller": ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)}


def direct(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def workers(fleet):
    status = requests.get(fleet["url"] + "/v2/fleet/status", timeout=30).json()
    return {w["worker_id"]: w for n in status["nodes"] for w in n["workers"]}


def infer_x(client, module, model, x, version=""):
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version)
    response = result.get_response()
    params = response["parameters"] if module is httpclient else {
        k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
    return result.as_numpy("y"), params


def test_the_import_is_idempotent_and_names_what_it_skipped(fleet):
    out = io.StringIO()
    report = import_repository(fleet["source"], FleetRepository(fleet["controller"]), controller=fleet["controller"],
                               progress=out)
    assert report.imported == {"plan-cc": ["1"], "simple": ["1"], "versioned": ["2", "3"]}
    assert set(report.skipped) == {"stateful", "pythonic"}
    assert "sequence_batching, model_transaction_policy decoupled" in report.skipped["stateful"]
    assert "platform/backend python" in report.skipped["pythonic"]
    assert "instance_group kind KIND_GPU" in " ".join(report.notes["simple"])
    assert "built on" not in out.getvalue() and "done: 0 built, 3 cached" in out.getvalue()  # nothing built twice
    for url in (fleet["http"],):
        client = httpclient.InferenceServerClient(url)
        index = {m["name"] for m in client.get_model_repository_index()}
        assert index == {"plan-cc", "simple", "versioned"}
        assert not client.is_model_ready("stateful")
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("pythonic")


def test_each_plan_is_loaded_only_where_its_compute_capability_and_tensorrt_are(fleet):
    holders = {}
    for worker_id, w in workers(fleet).items():
        runtimes = {r["version"] for r in w["runtimes"] if r["backend"] == "tensorrt"}
        for entry in w["ledger"]:
            if entry["key"].startswith("plan-cc:"):
                cc = w["device"]["compute_capability"]
                assert f"sm{cc.replace('.', '')}" in entry["key"] and TENSORRT[cc] in entry["key"], (worker_id, entry)
                assert any(same_release(TENSORRT[cc], r) for r in runtimes), (worker_id, runtimes)
                holders[worker_id] = cc
    assert sorted(holders.values()) == ["6.1", "7.0", "7.5", "7.5"]  # every GPU of the fleet, each with its own file


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_each_request_is_computed_by_the_plan_of_the_gpu_that_served_it(fleet, module):
    rng = np.random.default_rng(3)
    seen = collections.Counter()
    lock = threading.Lock()
    failures = []

    def run(n):
        client = module.InferenceServerClient(fleet["http"] if module is httpclient else fleet["grpc"])
        try:
            for _ in range(n):
                x = rng.standard_normal((2, 4)).astype(np.float32)
                y, params = infer_x(client, module, "plan-cc", x)
                cc = params["compute_capability"]
                want = direct(fleet["source"] / "plan-cc" / "1" / PLAN_FILES[cc], {"x": x})["y"]
                if not np.array_equal(y, want) or not np.allclose(y - x, PLAN_CONSTANTS[cc]):
                    failures.append((cc, params, y - x))
                with lock:
                    seen[cc] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is the test's
            failures.append(repr(exc))

    threads = [threading.Thread(target=run, args=(15,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert set(seen) == set(PLAN_FILES), seen  # all three files served, each by its own GPUs


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_the_version_policy_serves_the_latest_two(fleet, module):
    client = module.InferenceServerClient(fleet["http"] if module is httpclient else fleet["grpc"])
    metadata = client.get_model_metadata("versioned")
    versions = metadata["versions"] if module is httpclient else list(metadata.versions)
    assert versions == ["2", "3"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for version, expect in (("2", 2), ("3", 3), ("", 3)):
        y, _ = infer_x(client, module, "versioned", x, version)
        np.testing.assert_array_equal(y, direct(fleet["source"] / "versioned" / str(expect) / "model.onnx", {"x": x})["y"])
    with pytest.raises(InferenceServerException, match="version"):
        infer_x(client, module, "versioned", x, "1")


def test_the_config_endpoint_shows_the_config_as_imported(fleet):
    expected = config_json(read_config(SIMPLE_CONFIG, "simple", pbtxt=True))
    assert httpclient.InferenceServerClient(fleet["http"]).get_model_config("simple") == expected
    message = grpcclient.InferenceServerClient(fleet["grpc"]).get_model_config("simple").config
    assert json_format.MessageToDict(message) == json_format.MessageToDict(read_config(SIMPLE_CONFIG, "simple", pbtxt=True))


def test_instances_are_slots_warm_up_ran_and_answers_are_onnx_runtimes(fleet):
    engines = [e for w in workers(fleet).values() for e in w["engines"].values() if e["model"] == "simple" and e["loaded"]]
    assert len(engines) == 4  # on every GPU: its ONNX source was built for every target
    assert all(e["slots"] == 2 and e["batching"] for e in engines), engines
    assert all(e["warmup_runs"] == 3 for e in engines), engines  # count: 3, before any traffic
    client = grpcclient.InferenceServerClient(fleet["grpc"])
    rng = np.random.default_rng(5)
    feeds = {n: rng.integers(-100, 100, (3, 16), dtype=np.int32) for n in ("INPUT0", "INPUT1")}
    inputs = []
    for name, array in feeds.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), "INT32"))
        inputs[-1].set_data_from_numpy(array)
    result = client.infer("simple", inputs)
    want = direct(fleet["source"] / "simple" / "1" / "model.onnx", feeds)
    for name in ("OUTPUT0", "OUTPUT1"):
        np.testing.assert_array_equal(result.as_numpy(name), want[name])


def test_export_for_a_t4_then_import_gives_the_same_models_versions_and_io(fleet, tmp_path):
    fleet_repo = FleetRepository(fleet["controller"])
    report = export_repository(fleet_repo, tmp_path / "t4", "7.5", lambda m: LoadOptions(), progress=io.StringIO())
    assert report.exported == {"plan-cc": ["1"], "simple": ["1"], "versioned": ["2", "3"]}
    plan = tmp_path / "t4" / "plan-cc"
    assert dict(read_config((plan / "config.pbtxt").read_text(), "plan-cc", pbtxt=True).cc_model_filenames) == {
        "7.5": "model_7.5.plan"}
    assert (plan / "1" / "model_7.5.plan").read_bytes() == (fleet["source"] / "plan-cc" / "1" / PLAN_FILES["7.5"]).read_bytes()
    again = Repository(tmp_path / "again")
    assert import_repository(tmp_path / "t4", again, progress=io.StringIO()).imported == report.exported

    def shape(repo):
        found = {}
        for art in repo.artifacts():
            m = art.manifest
            found.setdefault(m.model, {})[m.version] = ([s.to_dict() for s in m.inputs], [s.to_dict() for s in m.outputs])
        return found

    assert shape(again) == shape(fleet_repo)
    # each plan file of the T4 export is the T4's: tagged for compute capability 7.5 alone
    assert {a.manifest.target.compute_capability for a in again.artifacts()} == {"7.5"}
