"""Each GPU type with its own runtime, versions rolled out across the mixed fleet, and a host's
TensorRT upgraded under load.

The simulated fleet of configs/hetero-sim.yaml with its T4 node one TensorRT release behind (a
copy with 10.4.0): its V100 and P4 workers start in Python environments with ONNX Runtime 1.31.1
and 1.30.0 (installed from PyPI once per host, handed to the workers through Ray's per-actor
runtime_env), the T4s in the fleet's own (1.32). What each worker reports is what it probed. The
last test moves the T4 node to 10.16.1.11 (where configs/hetero-sim.yaml has it) while clients
send requests. Real Ray nodes, real builds, real HTTP.
"""

import json
import time
from pathlib import Path

import onnx
import pytest
import ray
import requests
import yaml

from cluster import cli
from cluster.buildfarm import build_on_fleet
from cluster.names import CONTROLLER_NAME, NAMESPACE
from cluster.repository import Repository
from tests.integration.fleet_fixtures import Traffic, digits_rows, distinct_model, running_fleet, simulated_cluster

pytestmark = pytest.mark.integration
T4S = {"t4-node-gpu0", "t4-node-gpu1"}
ALL = T4S | {"p4-node-gpu0", "v100-node-gpu0"}
ROW = digits_rows(1)[0].tolist()
OLD_TRT, NEW_TRT = "10.4.0", "10.16.1.11"


@pytest.fixture(scope="module")
def sim(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("runtimes")
    data = yaml.safe_load(Path("configs/hetero-sim.yaml").read_text())
    t4 = next(n for n in data["nodes"] if n["name"] == "t4-node")
    for gpu in t4["gpus"]:
        gpu["tensorrt"] = OLD_TRT  # one release behind: the last test upgrades it
    config_path = work / "hetero-sim.yaml"
    config_path.write_text(yaml.safe_dump(data))
    with simulated_cluster(config_path) as cluster:
        with running_fleet(str(config_path), work / "repo", cluster_address=cluster.address) as (cfg, url):
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            yield {"url": url, "controller": controller, "models": demo_models, "work": work, "repo": work / "repo"}


def status(sim):
    return requests.get(sim["url"] + "/v2/fleet/status", timeout=60).json()


def workers(sim):
    return {w["worker_id"]: w for n in status(sim)["nodes"] for w in n["workers"]}


def newer_opset_copy(source: Path, out: Path) -> Path:
    """The digits MLP importing ai.onnx opset 28 (its operators are unchanged there): ONNX Runtime 1.32
    loads it, 1.31 and 1.30 do not (they stop at 26)."""
    model = onnx.load(str(source))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 28
    model.ir_version = max(model.ir_version, 10)
    onnx.save(model, str(out))
    return out


def infer(sim, model, version=None):
    path = f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
    r = requests.post(sim["url"] + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    return answer["parameters"]["fleet_worker"], answer["model_version"]


def served(sim, model, n=40, version=None):
    """worker -> the versions it answered with, over n requests."""
    seen: dict[str, set] = {}
    for _ in range(n):
        worker, got = infer(sim, model, version)
        seen.setdefault(worker, set()).add(got)
    return seen


def test_gpu_types_run_the_onnx_runtime_of_their_environment(sim):
    ws = workers(sim)
    assert set(ws) == ALL
    ort = {wid: next(r for r in w["runtimes"] if r["backend"] == "onnxruntime") for wid, w in ws.items()}
    assert {wid: r["version"] for wid, r in ort.items()} == {
        "t4-node-gpu0": "1.32.0", "t4-node-gpu1": "1.32.0", "p4-node-gpu0": "1.30.0", "v100-node-gpu0": "1.31.1"}
    assert ort["t4-node-gpu0"]["max_opset"] > ort["v100-node-gpu0"]["max_opset"]  # probed, not declared
    v100 = ws["v100-node-gpu0"]["probe"]
    assert v100["environment"] == ["onnxruntime==1.31.1"] and "/onnxruntime-1.31.1-" in v100["python"]
    assert "/onnxruntime-1.31.1-" in v100["onnxruntime_path"]
    ready = [e for e in status(sim)["events"] if e["event"] == "runtime-env-ready"]
    assert {e["node"] for e in ready} == {"p4-node", "v100-node"}
    print("runtime environments ready in", {e["node"]: e["seconds"] for e in ready}, "s")


def test_version_2_for_one_type_rolls_out_there_only_then_promote_moves_all(sim, capsys):
    source = sim["models"]["digits-mlp"]
    v1 = build_on_fleet(sim["controller"], source, model="roll", version="1", targets="auto")
    assert all(o.ok for o in v1) and len(v1) == 3
    # version 2 needs the newer ONNX Runtime (opset 28): it builds and passes on the T4s only
    newer = newer_opset_copy(source, sim["work"] / "digits-opset28.onnx")
    v2 = build_on_fleet(sim["controller"], newer, model="roll", version="2", targets="auto")
    assert {o.target.compute_capability for o in v2 if o.ok} == {"7.5"}
    refused = " ".join(str(o.error) for o in v2 if not o.ok)
    assert "uses ONNX opset 28; ONNX Runtime 1.31.1 on this worker loads opsets up to 26" in refused
    assert "ONNX Runtime 1.30.0" in refused
    # unpinned requests: the T4s serve version 2, the P4 and the V100 keep serving version 1
    seen = served(sim, "roll")
    assert {w: v for w, v in seen.items()} == {w: ({"2"} if w in T4S else {"1"}) for w in seen}
    assert {"p4-node-gpu0", "v100-node-gpu0"} <= set(seen), seen
    assert set(served(sim, "roll", n=8, version="2")) <= T4S  # pinned to 2: only where it runs
    view = next(v for v in status(sim)["rollout"] if v["model"] == "roll")
    assert view["mixed"] and {t["gpu_type"]: t["default"] for t in view["types"]} == {"T4": "2", "P4": "1", "V100": "1"}
    assert cli.main(["status", "--url", sim["url"]]) == 0
    out = capsys.readouterr().out
    assert "roll (latest 2, not promoted, MIXED)" in out and "no artifact of version 2 for it yet" in out

    # promote 2 is refused while the P4 and the V100 have no artifact of it
    assert cli.main(["promote", "roll", "2"]) == 2
    assert "no artifact for GPU type(s) P4, V100" in capsys.readouterr().err
    fixed = build_on_fleet(sim["controller"], source, model="roll", version="2", targets="P4,V100")
    assert all(o.ok for o in fixed) and len(fixed) == 2
    assert cli.main(["promote", "roll", "2"]) == 0
    seen = served(sim, "roll")
    assert set().union(*seen.values()) == {"2"} and {"p4-node-gpu0", "v100-node-gpu0"} <= set(seen), seen
    # promote 1 pins every type back to 1; rollback returns to the promotion before (2)
    assert cli.main(["promote", "roll", "1"]) == 0
    assert set().union(*served(sim, "roll").values()) == {"1"}
    assert cli.main(["rollback", "roll"]) == 0
    assert set().union(*served(sim, "roll").values()) == {"2"}
    assert "promoted 2" in capsys.readouterr().out


def trt_of(worker: dict) -> set[str]:
    return {r["version"] for r in worker["runtimes"] if r["backend"] == "tensorrt"}


def test_a_tensorrt_upgrade_of_a_live_host_rebuilds_first_rolls_and_fails_no_request(sim, capsys):
    """Issue 25, item 5: t4-node (two T4s) moves from TensorRT 10.4.0 to 10.16.1.11 under load."""
    source = distinct_model(sim["models"]["digits-mlp"], sim["work"] / "digits-upgrade.onnx", "upgrade")
    built = build_on_fleet(sim["controller"], source, model="upgraded", targets="T4")
    assert [o.target.key() for o in built if o.ok] == ["tensorrt-10.4.0-sm75-sim"]
    ray.get(sim["controller"].ensure_loaded.remote("upgraded"))
    assert {w: trt_of(v) for w, v in workers(sim).items() if w in T4S} == {w: {OLD_TRT} for w in T4S}
    # refused, typed, nothing changed
    for argv, said in ((["v100-node", "--tensorrt", NEW_TRT], "TensorRT 10.4 is its last release"),
                       (["t4-node", "--tensorrt", "10.4.0.26"], "runs TensorRT 10.4.0 already"),
                       (["gpu-node-9", "--tensorrt", NEW_TRT], "the fleet has no node 'gpu-node-9'")):
        assert cli.main(["upgrade", *argv]) == 2
        assert said in capsys.readouterr().err
    assert cli.main(["upgrade", "t4-node", "--tensorrt", NEW_TRT, "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert "build first: upgraded v1 float32 for 7.5 (TensorRT 10.16.1.11) [simulated]" in planned
    assert "drop afterwards: upgraded:1:float32:tensorrt-10.4.0-sm75-sim" in planned
    assert not any("10.16.1" in a.manifest.target.backend_version for a in Repository(sim["repo"]).artifacts())

    rate = 20.0
    with Traffic(sim["url"], "upgraded", threads=4, rate=rate) as traffic:
        time.sleep(2)
        t0 = time.monotonic()
        assert cli.main(["upgrade", "t4-node", "--tensorrt", NEW_TRT]) == 0
        took = time.monotonic() - t0
        during = traffic.sent
        time.sleep(2)
    out = capsys.readouterr().out
    print(out)
    print(f"upgrade took {took:.1f} s under {rate:g} requests/s from 4 threads: {traffic.sent} sent "
          f"({during} until it returned), {len(traffic.errors)} failed; answered by {dict(traffic.served_by)}, "
          f"targets {dict(traffic.targets)}")
    assert traffic.errors == [], traffic.errors[:3]
    assert sum(traffic.served_by.values()) == traffic.sent and traffic.sent >= rate * took * 0.5
    assert {"tensorrt-10.4.0-sm75-sim", "tensorrt-10.16.1-sm75-sim"} <= set(traffic.targets)  # old, then new
    assert "rolling t4-node-gpu0" in out and "rolling t4-node-gpu1" in out and "upgraded t4-node to TensorRT" in out

    # the node's workers run the new release, and serve the new plans
    assert {w: trt_of(v) for w, v in workers(sim).items() if w in T4S} == {w: {NEW_TRT} for w in T4S}
    assert trt_of(workers(sim)["v100-node-gpu0"]) == {OLD_TRT}
    for _ in range(10):
        r = requests.post(sim["url"] + "/v2/models/upgraded/infer", timeout=60, json={
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}).json()
        assert r["parameters"]["fleet_target"] == "tensorrt-10.16.1-sm75-sim", r
    # the new plans passed their check; the old T4 plans are gone, the V100's (still 10.4) stay
    arts = Repository(sim["repo"]).artifacts()
    keys = {(a.manifest.model, a.manifest.version, a.manifest.target.key()): a.manifest for a in arts}
    new = keys[("upgraded", "1", "tensorrt-10.16.1-sm75-sim")]
    assert new.accuracy["check"]["passed"] and new.source_sha256 == built[0].artifact.manifest.source_sha256
    assert ("roll", "2", "tensorrt-10.16.1-sm75-sim") in keys  # every plan the node served, rebuilt
    assert not [k for k in keys if k[2] == "tensorrt-10.4.0-sm75-sim"]
    assert ("roll", "1", "tensorrt-10.4.0-sm70-sim") in keys
    # kept for a controller that restarts
    assert json.loads((sim["repo"] / "_upgrades" / "tensorrt.json").read_text()) == {"t4-node": NEW_TRT}
    events = [e["event"] for e in status(sim)["events"] if e["event"].startswith("upgrade-")]  # the last 50
    assert events[-1] == "upgrade-done" and {"upgrade-worker-rolled", "upgrade-dropped"} <= set(events)
