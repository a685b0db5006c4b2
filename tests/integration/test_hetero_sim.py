"""The simulated heterogeneous fleet: 2x T4, 1x P4, 1x V100 as labelled Ray nodes.

Real Ray nodes (ray.cluster_utils.Cluster), real workers taking the declared GPU
identities, real builds on those workers, real HTTP; execution is ONNX Runtime on
the CPU, which everything reports as `simulated`.
"""

import collections
from pathlib import Path
import tempfile
import threading
import time

import numpy as np
import pytest
import ray
import requests
import yaml

from cluster.buildfarm import FleetRepository, build_on_fleet, prepare_build
from cluster.client import FleetClient
from cluster.names import CONTROLLER_NAME, NAMESPACE
from tests.custom_ops_model import calibration_data, direct, extensions_library, extensions_sha256, within_precision
from tests.integration.fleet_fixtures import Traffic, running_fleet, simulated_cluster, worker_handles
from tests.models import custom_op_rows, make_custom_op_mlp
from tests.needs import skip_unless
from workers.errors import NoCapacity, NoCompatibleWorker

pytestmark = pytest.mark.integration
BUDGET = 100 << 20  # per simulated GPU, small so that evictions happen
T4S = {"t4-node-gpu0", "t4-node-gpu1"}
ALL = T4S | {"p4-node-gpu0", "v100-node-gpu0"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory, demo_models):
    work = tmp_path_factory.mktemp("sim")
    data = yaml.safe_load(open("configs/hetero-sim.yaml"))
    for node in data["nodes"]:
        for gpu in node["gpus"]:
            gpu["budget"] = BUDGET
    data["models"].update({f"custom-sim-{p}": {"trusted_sha256": [extensions_sha256()]} for p in ("float32", "float16", "int8", "int8r")})
    # A build reserves its TensorRT workspace in the budget first (simulated targets too): bounded to fit these
    data["build_workspace_bytes"] = "16MiB"
    config_path = work / "hetero-sim.yaml"
    config_path.write_text(yaml.safe_dump(data))
    with simulated_cluster(config_path) as cluster:
        with running_fleet(str(config_path), work / "repo", cluster_address=cluster.address) as (cfg, url):
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            yield {"url": url, "controller": controller, "models": demo_models,
                   "cluster": cluster, "config": cfg}


def build(sim, name, targets, **kw):
    return build_on_fleet(sim["controller"], sim["models"]["digits-mlp"], model=name, targets=targets, **kw)


def make_room_on_t4s(sim):
    """A build reserves its memory before it starts and never evicts (it waits): free the T4s that the
    earlier tests filled with idle engines, as an operator would before building on a full device."""
    for worker, handle in worker_handles(sim["controller"]).items():
        if worker in T4S:
            for key in ray.get(handle.health.remote()).loaded:
                ray.get(handle.unload.remote(key))
            ray.get(sim["controller"].report_worker.remote(worker))


def status(sim):
    return requests.get(sim["url"] + "/v2/fleet/status", timeout=30).json()


def workers(sim):
    return {w["worker_id"]: w for n in status(sim)["nodes"] for w in n["workers"]}


def test_workers_take_the_declared_identities(sim):
    ws = workers(sim)
    assert set(ws) == ALL
    assert {w["device"]["name"] for w in ws.values()} == {"Tesla T4", "Tesla P4", "Tesla V100-SXM2-16GB"}
    assert all(w["simulated"] for w in ws.values())
    assert ws["p4-node-gpu0"]["device"]["compute_capability"] == "6.1"
    assert {r["version"] for r in ws["v100-node-gpu0"]["runtimes"] if r["backend"] == "tensorrt"} == {"10.4.0"}
    assert ws["t4-node-gpu0"]["device"]["uuid"] != ws["t4-node-gpu1"]["device"]["uuid"]
    assert all(w["budget_bytes"] == BUDGET for w in ws.values())


def test_build_farm_builds_each_target_once_and_caches(sim, capsys):
    outcomes = build(sim, "digits-all", "auto")
    assert sorted(o.target.key() for o in outcomes) == [
        "tensorrt-10.16.1-sm75-sim", "tensorrt-10.4.0-sm70-sim", "tensorrt-8.6.1-sm61-sim"]
    assert all(o.ok and not o.cached for o in outcomes)
    err = capsys.readouterr().err
    assert "building on t4-node" in err and "built on p4-node-gpu0" in err and "done: 3 built" in err
    again = build(sim, "digits-all", "auto")
    assert all(o.cached for o in again)
    assert "done: 0 built, 3 cached" in capsys.readouterr().err


def test_one_failing_target_does_not_stop_the_others(sim, capsys):
    outcomes = build(sim, "digits-t4-p4", "T4,6.1,A100")
    ok = sorted(o.target.key() for o in outcomes if o.ok)
    assert ok == ["tensorrt-10.16.1-sm75-sim", "tensorrt-8.6.1-sm61-sim"]
    failed = [o for o in outcomes if not o.ok]
    assert len(failed) == 1 and "A100: no worker in the fleet matches it" in failed[0].error
    assert "A100: skipped" in capsys.readouterr().err


def served_by(sim, model, n):
    counts = collections.Counter()
    X = np.zeros((1, 64), np.float32)
    with FleetClient(sim["url"]) as client:
        for _ in range(n):
            client.infer(model, {"input": X})
            counts[client.last_parameters["fleet_worker"]] += 1
            assert client.last_parameters["simulated"] is True
    return counts


def concurrently(sim, model, total, threads=8):
    counts = collections.Counter()
    lock = threading.Lock()
    X = np.zeros((1, 64), np.float32)

    def run(n):
        with FleetClient(sim["url"]) as client:
            for _ in range(n):
                client.infer(model, {"input": X})
                with lock:
                    counts[client.last_parameters["fleet_worker"]] += 1

    ts = [threading.Thread(target=run, args=(total // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def test_custom_op_model_builds_and_serves_on_the_t4s_in_every_precision(sim, tmp_path):
    """onnxruntime-extensions' NegPos on simulated T4s (TensorRT 10.16 targets, executed by ONNX Runtime with
    the library): each precision answers as ONNX Runtime run directly with the library; the library went
    to the workers through Ray, by sha256, as artifacts do."""
    library = extensions_library()
    source, calib = make_custom_op_mlp(tmp_path / "custom.onnx"), calibration_data(tmp_path / "calib.npz")
    repo = FleetRepository(sim["controller"])
    # int8_calib calibrates (with the library) and builds int8; int8 builds again from that calibration
    for name, precision in (("float32", "float32"), ("float16", "float16"), ("int8", "int8_calib"), ("int8r", "int8")):
        prepared = prepare_build(repo, source, precision, calib_data=str(calib), calib_method="minmax", custom_ops=(library,))
        outcomes = build_on_fleet(sim["controller"], source, model=f"custom-sim-{name}", targets="7.5", prepared=prepared,
                                  custom_ops=(library,))
        assert [o.ok for o in outcomes] == [True], [o.error for o in outcomes]
        assert outcomes[0].artifact.manifest.target.simulated and outcomes[0].artifact.manifest.custom_ops
    rows = custom_op_rows(64, seed=5)
    reference = direct(source, rows, library)
    names = ("float32", "float16", "int8", "int8r")
    try:
        with FleetClient(sim["url"]) as client:
            for name, precision in zip(names, ("float32", "float16", "int8", "int8")):
                numbers = within_precision(precision, reference, client.infer(f"custom-sim-{name}", {"input": rows})["logits"])
                print(f"simulated fleet {name}: {numbers}")
        held = {w["worker_id"] for w in workers(sim).values() for e in w["ledger"] if e["key"].startswith("custom-sim-")}
        assert held and held <= T4S
    finally:  # the T4s' small budgets belong to the tests after this one
        for name in names:
            ray.get(sim["controller"].unload.remote(f"custom-sim-{name}"))


def test_model_built_for_75_is_served_only_by_the_t4s(sim):
    build(sim, "only-t4", "7.5")
    counts = concurrently(sim, "only-t4", 200)
    assert sum(counts.values()) == 200
    assert set(counts) == T4S, counts


def test_model_built_for_all_targets_spreads_over_all_four(sim):
    build(sim, "digits-all", "auto")
    counts = concurrently(sim, "digits-all", 200)
    assert set(counts) == ALL, counts


def test_loading_more_than_fits_evicts_and_never_overfills(sim):
    names = [f"evict-{c}" for c in "abcdef"]
    make_room_on_t4s(sim)
    for name in names:
        build(sim, name, "T4", options={"footprint_bytes": 40 << 20})
    X = np.zeros((1, 64), np.float32)
    with FleetClient(sim["url"]) as client:
        for name in names * 2:
            client.infer(name, {"input": X})
            for w in workers(sim).values():
                used = sum(e["footprint_bytes"] for e in w["ledger"])
                assert used == w["used_bytes"] <= w["budget_bytes"], w
    evictions = sum(w["counters"]["evictions"] for w in workers(sim).values() if w["worker_id"] in T4S)
    assert evictions > 0


def test_model_larger_than_every_budget_gets_503_and_disturbs_nothing(sim):
    build(sim, "too-big", "auto", options={"footprint_bytes": 1 << 40})
    before = {k: sorted(e["key"] for e in w["ledger"]) for k, w in workers(sim).items()}
    resp = requests.post(sim["url"] + "/v2/models/too-big/infer",
                         json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, timeout=60)
    assert resp.status_code == 503
    msg = resp.json()["error"]
    assert "no capacity for model 'too-big'" in msg and "1.0 TiB" in msg and "more than the whole budget" in msg
    assert resp.headers["X-Fleet-Error"] == NoCapacity.__name__
    after = {k: sorted(e["key"] for e in w["ledger"]) for k, w in workers(sim).items()}
    assert after == before
    with FleetClient(sim["url"]) as client:
        with pytest.raises(NoCapacity):
            client.infer("too-big", {"input": np.zeros((1, 64), np.float32)})


def test_model_with_no_runnable_artifact_names_built_and_present_targets(sim):
    from workers.build import BuildRequest, build_artifact
    from workers.targets import Target

    with tempfile.TemporaryDirectory() as tmp:  # built here, published by the controller (the repository's writer)
        manifest = build_artifact(BuildRequest(str(sim["models"]["digits-mlp"]), "for-h100", Target("tensorrt", "10.16.1", "9.0", provider="tensorrt", simulated=True)), tmp)
        FleetRepository(sim["controller"]).publish(manifest, (Path(tmp) / manifest.artifact_file).read_bytes())
    resp = requests.post(sim["url"] + "/v2/models/for-h100/infer",
                         json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, timeout=60)
    assert resp.status_code == 503 and resp.headers["X-Fleet-Error"] == NoCompatibleWorker.__name__
    msg = resp.json()["error"]
    assert "built targets: 9.0 (TensorRT 10.16.1) [simulated]" in msg
    assert "Tesla P4 (compute capability 6.1, simulated)" in msg and "Tesla T4 (compute capability 7.5, simulated)" in msg


def test_status_lists_runnable_but_not_loaded(sim):
    build(sim, "lazy", "V100")
    ws = workers(sim)
    assert "lazy:1:float32" in ws["v100-node-gpu0"]["runnable_not_loaded"]
    assert all("lazy:1:float32" not in w["runnable_not_loaded"] for k, w in ws.items() if k != "v100-node-gpu0")


def test_killing_a_worker_mid_traffic(sim):
    build(sim, "only-t4", "7.5")
    served_by(sim, "only-t4", 20)
    handles = worker_handles(sim["controller"])
    victim = "t4-node-gpu0"
    with Traffic(sim["url"], "only-t4") as traffic:
        time.sleep(1.0)
        ray.kill(handles[victim], no_restart=True)
        time.sleep(3.0)
    # every failure, if any, was a clear 503 (worker lost), never a hang or a 500
    assert all(getattr(e, "http_status", None) == 503 for e in traffic.errors), traffic.errors
    assert traffic.served_by["t4-node-gpu1"] > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = status(sim)
        ws = {w["worker_id"]: w for n in s["nodes"] for w in n["workers"]}
        if s["restarts"] >= 1 and ws[victim]["alive"]:
            break
        time.sleep(0.5)
    assert s["restarts"] >= 1 and ws[victim]["alive"]
    # the ledger matches what the workers really hold, once the controller's health checks (1 s apart)
    # have seen the loads that follow a replacement (CI: one was in flight when the status was read)
    def ledger_mismatches() -> list[str]:
        ws = {w["worker_id"]: w for n in status(sim)["nodes"] for w in n["workers"]}
        return [worker_id for worker_id, handle in worker_handles(sim["controller"]).items() if worker_id != victim
                and sorted(ray.get(handle.health.remote()).loaded) != sorted(e["key"] for e in ws[worker_id]["ledger"])]

    deadline = time.monotonic() + 15
    while (mismatched := ledger_mismatches()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not mismatched, f"the controller's ledger differs from what these workers hold: {mismatched}"
    assert served_by(sim, "only-t4", 40).keys() <= T4S


def test_status_page_renders_the_four_gpus_in_chromium(sim, tmp_path):
    from tests.chromium import find_chromium, parse_dom, render_dom, screenshot

    skip_unless(find_chromium() is not None, "chromium is not installed (scripts/test.sh installs the Debian package)")
    build(sim, "digits-all", "auto")
    served_by(sim, "digits-all", 5)  # some traffic for the models table
    doc = parse_dom(render_dom(sim["url"] + "/"))
    used = {k: w["used_bytes"] for k, w in workers(sim).items()}
    cards = {c.attrs["data-worker"]: c for c in doc.find_all(cls="device")}
    assert set(cards) == ALL
    for worker_id, card in cards.items():
        (bar,) = card.find_all(cls="budget-bar")
        assert int(bar.attrs["data-total"]) == BUDGET
        assert int(bar.attrs["data-used"]) == used[worker_id] <= BUDGET
        assert card.attrs["data-simulated"] == "true"
    assert any(used.values())
    assert cards["p4-node-gpu0"].attrs["data-cc"] == "6.1"
    assert "digits-all" in {tr.attrs.get("data-model") for tr in doc.by_id("models").find_all("tr")}
    png = screenshot(sim["url"] + "/", tmp_path / "status.png")
    assert Path(png).stat().st_size > 20_000


def infer_raw(sim, model, rows=1):
    body = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": [0.0] * (64 * rows)}]}
    return requests.post(sim["url"] + f"/v2/models/{model}/infer", json=body, timeout=60)


def test_two_models_loading_at_once_into_a_full_budget_under_traffic(sim):
    """Two models, each 60 % of a T4's budget, asked for at once from 8 threads: the T4s load and
    evict them in turn. Every answer is a 200 or a clear 503, never a 500 (a load used to evict the
    other model's engine while it was still loading: KeyError, 500)."""
    make_room_on_t4s(sim)
    for name in ("race-a", "race-b"):
        build(sim, name, "T4", options={"footprint_bytes": 60 << 20})
    statuses: collections.Counter = collections.Counter()
    errors = []
    lock = threading.Lock()

    def traffic(model):
        for _ in range(25):
            r = infer_raw(sim, model)
            with lock:
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    errors.append((r.status_code, r.headers.get("x-fleet-error"), r.text[:200]))

    threads = [threading.Thread(target=traffic, args=(("race-a", "race-b")[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses[200] > 0 and set(statuses) <= {200, 503}, (statuses, errors[:5])
    assert all(kind in ("NoCapacity", "NotReady", "WorkerLost") for _, kind, _ in errors), errors[:5]
    for w in workers(sim).values():
        assert sum(e["footprint_bytes"] for e in w["ledger"]) == w["used_bytes"] <= w["budget_bytes"], w


def test_no_compatible_worker_is_a_clear_503_until_the_host_comes_back(sim):
    """Last in this module: it takes the P4's node away (and brings it back)."""
    from cluster.nodes import add_simulated_node

    build(sim, "only-p4", "P4")
    assert served_by(sim, "only-p4", 3) == {"p4-node-gpu0": 3}
    cluster = sim["cluster"]
    cluster.remove_node(cluster.fleet_nodes["p4-node"])  # the P4's host is gone: nothing else can run it
    deadline = time.monotonic() + 60
    while workers(sim)["p4-node-gpu0"]["alive"] and time.monotonic() < deadline:
        time.sleep(0.25)
    resp = infer_raw(sim, "only-p4")
    assert resp.status_code == 503 and resp.headers["X-Fleet-Error"] == NoCompatibleWorker.__name__, resp.text
    msg = resp.json()["error"]
    assert "built targets: 6.1 (TensorRT 8.6.1) [simulated]" in msg
    fleet_has = msg.split("fleet has:")[1]
    assert "Tesla T4" in fleet_has and "Tesla P4" not in fleet_has
    # the host comes back: its replacement worker serves again, without a restart of the fleet
    (p4,) = [n for n in sim["config"].nodes if n.name == "p4-node"]
    add_simulated_node(cluster, p4)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if infer_raw(sim, "only-p4").status_code == 200:
            break
        time.sleep(0.5)
    assert served_by(sim, "only-p4", 3) == {"p4-node-gpu0": 3}


def test_a_worker_whose_gpu_context_broke_is_restarted_and_routed_around(sim):
    """A sticky CUDA error (simulated on a simulated T4: "an illegal memory access was encountered")
    under traffic: the worker refuses work at once, requests go to the other T4 (passed on, or retried),
    the controller restarts the worker, and it serves again."""
    build(sim, "only-t4", "7.5")
    make_room_on_t4s(sim)  # the earlier tests' engines out: the next load puts it on both T4s
    served_by(sim, "only-t4", 20)  # both T4s hold it
    victim = "t4-node-gpu1"
    restarts = status(sim)["restarts"]
    handle = worker_handles(sim["controller"])[victim]
    with Traffic(sim["url"], "only-t4") as traffic:
        time.sleep(0.5)
        began = time.time()
        ray.get(handle.simulate_device_fault.remote("CUDA failure 700: an illegal memory access was encountered"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = status(sim)
            replaced = any(e["event"] == "worker-replaced" and e.get("worker") == victim and e["time"] >= began
                           for e in s["events"])
            if replaced and {w["worker_id"]: w for n in s["nodes"] for w in n["workers"]}[victim]["alive"]:
                break
            time.sleep(0.25)
    events = [e for e in status(sim)["events"] if e.get("worker") == victim and e["time"] >= began]
    assert any(e["event"] == "worker-device-failed" and "illegal memory access" in e["reason"] for e in events), events
    # restarted once (the fleet-wide count may also move if a loaded CI box drops another worker)
    assert [e["event"] for e in events].count("worker-replaced") == 1, events
    assert status(sim)["restarts"] >= restarts + 1
    # every failure, if any, was a clear 503 naming the broken GPU, never a 500
    assert all(getattr(e, "http_status", None) == 503 for e in traffic.errors), traffic.errors
    assert traffic.served_by["t4-node-gpu0"] > 0
    assert served_by(sim, "only-t4", 40).keys() <= T4S


def test_a_gpu_that_nvml_reports_unhealthy_is_routed_around_and_not_restarted(sim):
    """NVML says the GPU itself is bad (an uncorrectable ECC error; simulated on a simulated T4):
    the worker takes no more work, the controller takes it out of every route without restarting
    it (a new process on that GPU would fail the same way), and says why in the status."""
    build(sim, "only-t4", "7.5")
    served_by(sim, "only-t4", 20)
    victim = "t4-node-gpu0"
    restarts = status(sim)["restarts"]
    handle = worker_handles(sim["controller"])[victim]
    reason = "NVML counted 1 new uncorrectable ECC error(s) on GPU GPU-sim; it needs a reset"
    ray.get(handle.simulate_gpu_unhealthy.remote(reason))
    deadline = time.monotonic() + 30
    while workers(sim)[victim]["alive"] and time.monotonic() < deadline:
        time.sleep(0.25)
    view = workers(sim)[victim]
    assert not view["alive"] and view["out_of_service"] == reason
    assert served_by(sim, "only-t4", 30) == {"t4-node-gpu1": 30}
    # its own endpoint answers nothing more either (HAProxy's check reads this)
    addr = view["http"]
    assert requests.get(f"http://{addr}/v2/health/live", timeout=5).status_code == 503
    time.sleep(3)  # several health rounds: still out, never restarted
    assert not workers(sim)[victim]["alive"] and status(sim)["restarts"] == restarts
    events = [e for e in status(sim)["events"] if e.get("worker") == victim]
    assert [e["event"] for e in events].count("gpu-unhealthy") == 1, events
    # once the GPU is reset, the operator restarts the worker (here: its process is killed) and it serves again
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 60
    while not workers(sim)[victim]["alive"] and time.monotonic() < deadline:
        time.sleep(0.25)
    if not workers(sim)[victim]["alive"]:
        seen = [f'{e["event"]} {e.get("reason", "")}' for e in status(sim)["events"]
                if e.get("worker") == victim and e["event"] != "load"]
        pytest.fail("not back: " + "; ".join(seen[-8:]))
