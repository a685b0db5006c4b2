"""Hosts that share nothing but the network (tests/integration/hostbed.py): the simulated T4, P4 and
V100 nodes of configs/hetero-sim.yaml, each a host of its own (network, mount, PID and UTS
namespaces) that joined the head with `fleet join`. One bed for the module; figures in
docs/multihost.md come from these tests (printed with -s).
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import ray
import requests

from cluster import deploy
from cluster.batch import TMP_GLOB, BatchJob, run_job
from cluster.buildfarm import build_on_fleet
from cluster.client import FleetClient, closed_without_answer
from cluster.config import load_config
from cluster.env import auth_token_path, ray_env
from cluster.names import CONTROLLER_NAME, NAMESPACE, NODE_LABEL
from cluster.net import free_port
from tests.integration.fleet_fixtures import digits_rows, read_parts, worker_handles, write_parquet_rows
from tests.integration.hostbed import FleetBed, namespaces_permitted
from tests.needs import skip_unless

pytestmark = [pytest.mark.integration, pytest.mark.multihost]
CONFIG = "configs/hetero-sim.yaml"
HOSTS = {"t4-host": "t4-node", "p4-host": "p4-node", "v100-host": "v100-node"}
TOKEN = "bed-token"  # the fleet's auth_token: worker endpoints on the network want it
MODEL = "digits-tv"  # built for T4 and V100: two hosts run it, the P4 host cannot
RATE = 20.0  # requests/s of the open-loop load


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def node_alive(node: str) -> bool:
    return any(n.get("Alive") and (n.get("Labels") or {}).get(NODE_LABEL) == node for n in ray.nodes())


@pytest.fixture(scope="module")
def bed(tmp_path_factory, demo_models):
    permitted, why = namespaces_permitted()
    skip_unless(permitted, f"a bed of separate hosts needs network namespaces: {why}")
    skip_unless(auth_token_path().exists(), f"Ray's auth token ({auth_token_path()}) is missing: run `fleet up` once")
    work = tmp_path_factory.mktemp("multihost")
    fleet = FleetBed(work, CONFIG, hidden=[auth_token_path().parent])
    env = {**ray_env(), "RAY_AUTH_TOKEN": auth_token_path().read_text().strip()}
    try:
        fleet.up(env)
        ray.init(address=fleet.address, namespace=NAMESPACE, log_to_driver=False)
        for host, node in HOSTS.items():  # one at a time: a raylet has 30 s to register, on 2 busy cores
            fleet.join(host, node)
            wait_for(lambda: node_alive(node), 90, f"{host} joining")
        head = fleet.bed.head_address
        config = load_config(CONFIG, repository=str(work / "repo"), port=free_port(head), host=head,
                             grpc_port=None, auth_token=TOKEN)
        t0 = time.monotonic()
        deploy.deploy(config)
        print(f"\nbed: 3 hosts joined, fleet deployed in {time.monotonic() - t0:.1f} s")
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        build_on_fleet(controller, demo_models["digits-mlp"], model=MODEL, targets="T4,V100", max_batch=256)
        yield {"fleet": fleet, "controller": controller, "url": f"http://{head}:{config.port}", "work": work,
               "models": demo_models}
    finally:
        if ray.is_initialized():
            deploy.teardown()
            ray.shutdown()
        leftovers = fleet.down()
        assert leftovers == [], f"processes of the bed outlived it: {leftovers}"


def node_id_of(node: str) -> str | None:
    return next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and (n.get("Labels") or {}).get(NODE_LABEL) == node),
                None)


def host_of(worker: str) -> str:
    return {node: host for host, node in HOSTS.items()}[worker.rsplit("-gpu", 1)[0]]


def status(bed) -> dict:
    return requests.get(bed["url"] + "/v2/fleet/status", headers={"authorization": f"Bearer {TOKEN}"},
                        timeout=30, verify=False).json()


def test_artifacts_go_only_where_they_run_and_requests_reach_other_hosts(bed, digits_test):
    import tritonclient.http as httpclient

    X = digits_test[0][:8]
    expected = ort.InferenceSession(str(bed["models"]["digits-mlp"])).run(None, {"input": X})[0]
    served = collections.Counter()
    with FleetClient(bed["url"], token=TOKEN) as client:
        client.load(MODEL)
        for _ in range(12):
            np.testing.assert_array_equal(client.infer(MODEL, {"input": X})["label"], expected)
            served[client.last_parameters["fleet_worker"]] += 1
    triton = httpclient.InferenceServerClient(bed["url"].removeprefix("http://"))
    for _ in range(12):
        inp = httpclient.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        answer = triton.infer(MODEL, [inp])
        np.testing.assert_array_equal(answer.as_numpy("label"), expected)
        served[answer.get_response()["parameters"]["fleet_worker"]] += 1

    def one(_):
        with FleetClient(bed["url"], token=TOKEN) as client:
            for _ in range(4):
                np.testing.assert_array_equal(client.infer(MODEL, {"input": X})["label"], expected)
                served[client.last_parameters["fleet_worker"]] += 1

    with ThreadPoolExecutor(6) as pool:  # concurrent: the front door's least-connections spreads them
        list(pool.map(one, range(6)))
    assert {host_of(w) for w in served} == {"t4-host", "v100-host"}, served  # both hosts, never the P4's

    # each host fetched each artifact it can run once, into its own cache; the P4 host fetched nothing
    caches = {w: ray.get(h.stats.remote())["artifact_cache"] for w, h in worker_handles(bed["controller"]).items()}
    fills = collections.Counter()
    for worker, cache in caches.items():
        fills[host_of(worker)] += cache["fills"]
    assert fills == {"t4-host": 1, "v100-host": 1, "p4-host": 0}, fills

    # workers listen on their host's own address (never every interface) and want the fleet's token there
    addresses = {h.name: h.address for h in bed["fleet"].bed.hosts.values()}
    for node in status(bed)["nodes"]:
        for w in node["workers"]:
            host, port = w["http"].rsplit(":", 1)
            assert host == addresses[host_of(w["worker_id"])], w["http"]
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
            direct = requests.post(f"http://{w['http']}/v2/models/{MODEL}/infer", json=body, timeout=30)
            assert direct.status_code == 401, (w["worker_id"], direct.status_code, direct.text)


def test_a_batch_job_spreads_over_hosts_and_writes_every_row_once(bed):
    rows = 6000
    X = digits_rows(rows)
    data = write_parquet_rows(bed["work"] / "rows.parquet", X)
    expected = ort.InferenceSession(str(bed["models"]["digits-mlp"])).run(None, {"input": X})[0]
    out = bed["work"] / "scored"
    summary = run_job(BatchJob(MODEL, str(data), str(out), batch_size=500), bed["controller"])
    assert not list(out.glob(TMP_GLOB))
    row_ids, labels = read_parts(out)
    assert np.array_equal(np.sort(row_ids), np.arange(rows))  # each row once
    np.testing.assert_array_equal(labels[np.argsort(row_ids)], expected)
    by_host = collections.Counter()
    for worker, n in summary.rows_per_worker.items():
        by_host[host_of(worker)] += n
    assert by_host["t4-host"] > 0 and by_host["v100-host"] > 0 and "p4-host" not in by_host, by_host


# ---- open-loop load ----------------------------------------------------------------------
@dataclass
class Outcome:
    sent: float  # seconds since the load started
    done: float
    status: int  # 0: no HTTP answer at all
    worker: str | None
    error: str | None
    resent: bool = False  # closed without an answer once, then sent again (as FleetClient does)


class OpenLoop:
    """Requests at a fixed rate whatever the answers take (an arrival schedule, not a closed loop)."""

    def __init__(self, url: str, rate: float, duration_s: float) -> None:
        self.url, self.rate, self.duration_s = url, rate, duration_s
        self.outcomes: list[Outcome] = []
        self.t0 = 0.0
        self._local = threading.local()
        body = {"inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": [0.25] * 256}]}
        self._body = json.dumps(body)

    def _one(self, sent: float) -> None:
        status, worker, error, resent = 0, None, None, False
        for attempt in (1, 2):
            session = getattr(self._local, "session", None) or requests.Session()
            self._local.session = session
            try:
                r = session.post(f"{self.url}/v2/models/{MODEL}/infer", data=self._body, timeout=60, verify=False,
                                 headers={"content-type": "application/json"})
                status = r.status_code
                if status == 200:
                    worker = r.json()["parameters"]["fleet_worker"]
                else:
                    error = r.text[:300]
                break
            except requests.RequestException as exc:
                self._local.session = None
                # As FleetClient does: HAProxy closes a reused client connection without an answer
                # when the worker's connection under it fails, so that the client sends it again
                # (haproxy#2375, #1423; docs/multihost.md). Anything else is a failure.
                if attempt == 1 and isinstance(exc, requests.ConnectionError) and closed_without_answer(exc):
                    resent = True
                    continue
                error = f"{type(exc).__name__}: {exc}"
                break
        self.outcomes.append(Outcome(sent, time.monotonic() - self.t0, status, worker, error, resent))

    def run(self, at: dict[float, callable] | None = None) -> list[Outcome]:
        """Send for ``duration_s``; ``at``: actions to run (on their own thread) at those seconds."""
        at = dict(at or {})
        n = int(self.rate * self.duration_s)
        self.t0 = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            for i in range(n):
                due = i / self.rate
                for when in sorted(t for t in at if t <= due):
                    threading.Thread(target=at.pop(when), daemon=True).start()
                time.sleep(max(0.0, self.t0 + due - time.monotonic()))
                pool.submit(self._one, time.monotonic() - self.t0)
        return sorted(self.outcomes, key=lambda o: o.sent)


def first_answer_from(url: str, worker_prefix: str, timeout_s: float) -> float:
    """Seconds until a request through the front door is answered by a worker of that prefix."""
    t0 = time.monotonic()
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}

    def answered():
        try:
            r = requests.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30, verify=False)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.json()["parameters"]["fleet_worker"].startswith(worker_prefix)

    wait_for(answered, timeout_s, f"an answer from {worker_prefix}", period_s=0.1)
    return time.monotonic() - t0


def test_a_cut_link_costs_only_what_was_on_its_way_and_the_host_comes_back(bed):
    fleet = bed["fleet"]
    cut_at, window_s, duration_s = 8.0, 10.0, 36.0
    cut: dict[str, float] = {}

    def cut_link():
        fleet.bed.cut("v100-host")
        cut["at"] = time.monotonic() - load.t0

    load = OpenLoop(bed["url"], RATE, duration_s)
    node_before = node_id_of("v100-node")
    try:
        outcomes = load.run({cut_at: cut_link})
    finally:
        fleet.bed.mend("v100-host")
    mended = time.monotonic()
    t_cut = cut["at"]
    back_s = first_answer_from(bed["url"], "v100-node", 30)  # through the front door (its own checks)

    def v100_up():
        w = next(w for n in status(bed)["nodes"] for w in n["workers"] if w["worker_id"] == "v100-node-gpu0")
        return w["state"] == "up" and any(e["key"].startswith(MODEL) for e in w["ledger"])

    wait_for(v100_up, 90, "the V100 worker up again in the controller's view, with its engine")
    controller_s = time.monotonic() - mended
    dead_in_ray = node_id_of("v100-node") != node_before  # Ray gave up on it: `fleet join --block` started another
    failed = [o for o in outcomes if o.status != 200]
    in_flight = [o for o in outcomes if o.sent < t_cut < o.done]
    in_window = [o for o in outcomes if t_cut <= o.sent < t_cut + window_s]
    v100_in_flight = [o for o in in_flight if o in failed or (o.worker or "").startswith("v100")]
    late = [o for o in failed if o.sent >= t_cut + window_s]
    detected = max((o.sent for o in failed), default=t_cut) - t_cut
    print(f"\ncut link: {len(outcomes)} requests at {RATE:.0f}/s over {duration_s:.0f} s, cut at {t_cut:.1f} s; "
          f"{len(failed)} failed ({len(v100_in_flight)} in flight to the cut host, {len(in_flight)} in flight in all, "
          f"{len(in_window)} sent within {window_s:.0f} s); last failed request sent {detected:.1f} s after the cut; "
          f"{sum(o.resent for o in outcomes)} closed without an answer and sent again; "
          f"failures {collections.Counter((o.status, (o.error or '')[:60]) for o in failed)}")
    assert not late, f"requests sent after the detection window failed: {late[:3]}"
    assert len(failed) <= len(in_flight) + len(in_window)
    for o in failed:  # a clear 503, in the fleet's error format
        assert o.status == 503 and "error" in json.loads(o.error), o
    after = [o for o in outcomes if o.sent >= t_cut + window_s]
    assert after and {host_of(o.worker) for o in after} == {"t4-host"}  # the others carried on alone
    print(f"link up again: the V100 host served through the front door {back_s:.1f} s later, and was up in the "
          f"controller's view (Ray calls) {controller_s:.1f} s later "
          f"({'Ray had counted its node dead: it joined again' if dead_in_ray else 'its Ray node had stayed'})")
    assert back_s <= 30


def test_a_host_leaves_drained_and_joins_again(bed):
    fleet = bed["fleet"]
    left: dict[str, float] = {}

    def leave():
        t0 = time.monotonic()
        done = fleet.bed.run_on("v100-host", [sys.executable, "-m", "cluster.cli", "leave",
                                              f"--address={fleet.address}"],
                                env={"RAY_AUTH_TOKEN": fleet.env["RAY_AUTH_TOKEN"], "TMPDIR": "/tmp"}, timeout=120)
        left["s"], left["rc"], left["out"] = time.monotonic() - t0, done.returncode, done.stdout + done.stderr

    load = OpenLoop(bed["url"], RATE, 20.0)
    outcomes = load.run({5.0: leave})
    wait_for(lambda: "s" in left, 120, "fleet leave")
    failed = [o for o in outcomes if o.status != 200]
    by_host = collections.Counter(host_of(o.worker) for o in outcomes if o.worker)
    print(f"\nleave: `fleet leave` took {left['s']:.1f} s under {RATE:.0f} requests/s; {len(outcomes)} requests, "
          f"{len(failed)} failed; served by {dict(by_host)}")
    assert left["rc"] == 0, left["out"]
    assert not failed, failed[:3]
    # `fleet join --block` (the host's first process) returns once `fleet leave` has stopped its node
    assert fleet.bed.hosts["v100-host"].proc.wait(60) == 0, "fleet join --block did not exit 0 after fleet leave"
    wait_for(lambda: not node_alive("v100-node"), 60, "the V100 host's node gone")
    hosts = {h["name"]: h for h in status(bed)["hosts"]}
    assert set(hosts["v100-node"]["workers"].values()) == {"waiting for its host"}, hosts

    t0 = time.monotonic()
    fleet.join("v100-host", "v100-node")
    wait_for(lambda: node_alive("v100-node"), 90, "the V100 host joining again")
    joined_s = time.monotonic() - t0
    first_s = first_answer_from(bed["url"], "v100-node", 90)
    print(f"join: the V100 host's node was in the cluster {joined_s:.1f} s after `fleet join`, and answered its "
          f"first request {first_s:.1f} s after that ({joined_s + first_s:.1f} s in all)")
