"""Each GPU type with its own runtime, and versions rolled out across the mixed fleet.

The simulated fleet of configs/hetero-sim.yaml as it is: its V100 and P4 workers start in
Python environments with ONNX Runtime 1.31.1 and 1.30.0 (installed from PyPI once per host,
handed to the workers through Ray's per-actor runtime_env), the T4s in the fleet's own (1.32).
What each worker reports is what it probed. Real Ray nodes, real builds, real HTTP.
"""

from pathlib import Path

import onnx
import pytest
import ray
import requests

from cluster import cli
from cluster.buildfarm import build_on_fleet
from cluster.config import load_config
from cluster.names import CONTROLLER_NAME, NAMESPACE
from tests.integration.fleet_fixtures import digits_rows, running_fleet, simulated_cluster

pytestmark = pytest.mark.integration
T4S = {"t4-node-gpu0", "t4-node-gpu1"}
ALL = T4S | {"p4-node-gpu0", "v100-node-gpu0"}
ROW = digits_rows(1)[0].tolist()


@pytest.fixture(scope="module")
def sim(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("runtimes")
    with simulated_cluster("configs/hetero-sim.yaml") as cluster:
        with running_fleet("configs/hetero-sim.yaml", work / "repo", cluster_address=cluster.address) as (cfg, url):
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            yield {"url": url, "controller": controller, "models": demo_models, "work": work}


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
