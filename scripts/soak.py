#!/usr/bin/env python3
"""Soak the simulated heterogeneous fleet: mixed traffic for a bounded time while workers are killed.

    python scripts/soak.py --minutes 5 [--threads 8] [--kill-every 20] [--json out.json]

Traffic: several models (one served only by the T4s), batch sizes 1-64, about one bad
request in ten (each must get its 4xx). A worker is killed every ``--kill-every`` seconds
(give or take half). It prints requests, errors by kind, p50/p99 and worker memory over
time, and exits 1 if any accepted request was lost (no answer) or any good request
failed for a reason other than a clearly reported one (a typed 503 while a worker was
being replaced).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.env import apply_ray_env  # noqa: E402

apply_ray_env()

import numpy as np  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402

from cluster import fleet  # noqa: E402
from cluster.buildfarm import build_on_fleet  # noqa: E402
from cluster.client import FleetClient  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.demo import make_demo_models  # noqa: E402
from cluster.names import CONTROLLER_NAME, NAMESPACE  # noqa: E402
from cluster.repository import Repository  # noqa: E402
from workers.errors import FleetError  # noqa: E402

CLEAR_UNDER_FAULT = {"WorkerLost", "NotReady", "NoCompatibleWorker"}  # typed 503s, clearly reported
BAD = [  # (body, expected status)
    ({"inputs": [{"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400),
    ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]}, 400),
    ({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 64}]}, 400),
    ({"inputs": []}, 400),
]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.bad_answered = 0
        self.errors: collections.Counter = collections.Counter()
        self.unclear: list[str] = []
        self.lost = 0
        self.latencies: list[float] = []


def traffic(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    client = FleetClient(url, timeout=60)
    session = requests.Session()
    models = [("digits-mlp", (64,)), ("digits-t4", (64,)), ("cnn-small", (3, 64, 64))]
    while not stop.is_set():
        with tally.lock:
            tally.requests += 1
        if rng.random() < 0.1:
            body, status = rng.choice(BAD)
            try:
                resp = session.post(f"{url}/v2/models/digits-mlp/infer", json=body, timeout=60)
            except requests.RequestException:
                with tally.lock:
                    tally.lost += 1
                continue
            with tally.lock:
                if resp.status_code == status and "error" in resp.json():
                    tally.bad_answered += 1
                else:
                    tally.unclear.append(f"bad request answered {resp.status_code}: {resp.text[:200]}")
            continue
        model, shape = rng.choice(models)
        rows = rng.choice([1, 1, 1, 4, 16, 64]) if model != "cnn-small" else rng.choice([1, 2, 8])
        x = np.random.default_rng(rng.randrange(1 << 30)).random((rows, *shape), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            out = client.infer(model, {"input": x})
        except FleetError as exc:
            kind = type(exc).__name__
            with tally.lock:
                tally.errors[kind] += 1
                if kind not in CLEAR_UNDER_FAULT or exc.http_status != 503:
                    tally.unclear.append(f"{model}: {kind}: {exc.message[:200]}")
            continue
        except Exception as exc:  # no answer at all: a lost request
            with tally.lock:
                tally.lost += 1
                tally.unclear.append(f"{model}: lost: {exc}")
            continue
        n = next(iter(out.values())).shape[0]
        with tally.lock:
            tally.latencies.append(time.perf_counter() - t0)
            if n == rows:
                tally.ok += 1
            else:
                tally.unclear.append(f"{model}: {rows} rows in, {n} out")


def killer(controller, stop: threading.Event, every: float, kills: list, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(every / 2, every * 1.5)):
        handles = ray.get(controller.worker_handles.remote())
        victim = rng.choice(sorted(handles))
        ray.kill(handles[victim], no_restart=True)
        kills.append((time.monotonic(), victim))
        print(f"  killed {victim}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills (average)")
    parser.add_argument("--config", default="configs/hetero-sim.yaml")
    parser.add_argument("--json", help="write the summary here too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
    config = load_config(args.config, repository=str(work / "repo"), port=18555)
    t_start = time.monotonic()
    with fleet.simulated_cluster(config) as cluster:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            fleet.deploy(config)
            controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            models = make_demo_models(work / "models")
            repo = Repository(config.repository)
            build_on_fleet(repo, controller, models["digits-mlp"], model="digits-mlp", max_batch=256)
            build_on_fleet(repo, controller, models["cnn-small"], model="cnn-small", max_batch=64)
            build_on_fleet(repo, controller, models["digits-mlp"], model="digits-t4", targets="T4", max_batch=256)
            url = f"http://127.0.0.1:{config.port}"
            tally, stop, kills, memory = Tally(), threading.Event(), [], []
            threads = [threading.Thread(target=traffic, args=(url, stop, tally, args.seed + i)) for i in range(args.threads)]
            threads.append(threading.Thread(target=killer, args=(controller, stop, args.kill_every, kills, args.seed)))
            print(f"soaking for {args.minutes} min with {args.threads} clients ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            for t in threads:
                t.start()
            deadline = t0 + args.minutes * 60
            while time.monotonic() < deadline:
                time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
                status = requests.get(url + "/v2/fleet/status", timeout=30).json()
                rss = {w["worker_id"]: w.get("rss_bytes") for n in status["nodes"] for w in n["workers"] if w["alive"]}
                memory.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": {k: round((v or 0) / 2**20, 1) for k, v in rss.items()},
                               "restarts": status["restarts"]})
                with tally.lock:
                    print(f"  t={memory[-1]['t_s']:>6.1f}s requests={tally.requests} ok={tally.ok} errors={dict(tally.errors)} "
                          f"lost={tally.lost} restarts={status['restarts']}", file=sys.stderr, flush=True)
            stop.set()
            for t in threads:
                t.join()
            seconds = time.monotonic() - t0
            lat = np.array(tally.latencies) * 1e3
            summary = {
                "minutes": args.minutes, "seconds": round(seconds, 1), "threads": args.threads,
                "requests": tally.requests, "good_ok": tally.ok, "bad_answered_4xx": tally.bad_answered,
                "errors_by_kind": dict(tally.errors), "lost": tally.lost, "unclear": tally.unclear[:20],
                "workers_killed": len(kills), "restarts": memory[-1]["restarts"] if memory else 0,
                "requests_per_s": round(tally.requests / seconds, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
                "memory": memory, "setup_s": round(t0 - t_start, 1),
            }
        finally:
            fleet.teardown()
            ray.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "memory"}, indent=2))
    first, last = summary["memory"][0]["rss_mib"] if summary["memory"] else {}, summary["memory"][-1]["rss_mib"] if summary["memory"] else {}
    print("worker RSS MiB, first -> last sample: " + ", ".join(f"{k} {first.get(k)} -> {v}" for k, v in sorted(last.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    failed = summary["lost"] > 0 or bool(summary["unclear"])
    print("SOAK FAILED" if failed else "SOAK PASSED: no accepted request lost, every failure clearly reported")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
