"""The benchmark phases. Each runs in its own process, started by scripts/bench.py:

    python scripts/bench_phases.py PHASE SPEC.json

and prints its result as one line ``BENCH_RESULT {...}`` on stdout (logs go to
stderr). A phase that starts Ray starts a fresh local instance (``address="local"``,
so it never joins another Ray on this host) and tears it down before it returns;
environment switches such as ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` are set by the
caller in this process's environment, before Ray is imported.

Phases: bare, fleet-http, fleet-client, naive-serve, router, cold-start, profile.
(triton runs in its own environment: scripts/bench_triton.py.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
from bench_common import CONFIG, MODELS, REPO_ROOT, free_port, model_inputs, reference_outputs, summarize_ms, wait_http  # noqa: E402

RESULT_MARK = "BENCH_RESULT "


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[bench +{time.monotonic() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- checks ----------------------------------------------------------------------------
def check_answer(model: str, content: bytes, headers, prepared: dict) -> str | None:
    """None when an HTTP answer holds the right outputs for the bench payload, else why not."""
    import numpy as np

    from workers.protocol import decode_response

    try:
        lower = {k.lower(): v for k, v in dict(headers).items()}
        _, arrays = decode_response(content, lower.get("inference-header-content-length"))
    except Exception as exc:  # noqa: BLE001 (any decode failure is a wrong answer)
        return f"undecodable answer: {type(exc).__name__}: {exc}: {content[:200]!r}"
    spec = prepared["models"][model]
    reference = reference_outputs(spec["onnx"], model_inputs(model, spec["request_rows"]))
    for name, want in reference.items():
        got = arrays.get(name)
        if got is None:
            return f"output {name!r} missing (got {sorted(arrays)})"
        got = np.asarray(got).reshape(want.shape)
        ok = np.array_equal(got, want) if want.dtype.kind in "iub" else np.allclose(got, want, rtol=1e-3, atol=1e-4)
        if not ok:
            return f"output {name!r} differs from ONNX Runtime's"
    return None


def verify_endpoint(url: str, model: str, protocol: str, prepared: dict, timeout_s: float = 60) -> None:
    import requests

    body_info = prepared["models"][model]["bodies"][protocol]
    body = Path(body_info["path"]).read_bytes()
    r = requests.post(url, data=body, headers=body_info["headers"], timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"{url} ({protocol}) answered HTTP {r.status_code}: {r.text[:300]}")
    problem = check_answer(model, r.content, r.headers, prepared)
    if problem:
        raise RuntimeError(f"{url} ({protocol}): {problem}")


# ---- HTTP load matrix --------------------------------------------------------------------
def http_matrix(system: str, variant: str, base_url: str, spec: dict, *, protocols=("binary", "json"),
                path=lambda m: f"/v2/models/{m}/infer") -> list[dict]:
    """Verify, warm up, then load every (model, protocol, concurrency) of ``spec``."""
    prepared = spec["prepared"]
    rows = []
    for model in spec["models"]:
        info = prepared["models"][model]
        for protocol in protocols:
            levels = spec["levels"].get(f"{model}/{protocol}", spec["levels"].get(model, []))
            if not levels:
                continue
            url = base_url + path(model)
            verify_endpoint(url, model, protocol, prepared)
            body_info = info["bodies"][protocol]
            body = Path(body_info["path"]).read_bytes()
            # A multi-MB body (cnn-small as JSON) takes about a second a request: run long
            # enough that wrk completes some (it drops what is in flight at the end).
            duration = spec["duration_s"] if len(body) < (1 << 20) else max(spec["duration_s"], 8.0)
            if spec.get("warmup_s", 0) > 0:
                loadgen.run(url, body, body_info["headers"], concurrency=max(levels), duration_s=spec["warmup_s"],
                            tool=spec["loadgen"])
            for c in levels:
                r = loadgen.run(url, body, body_info["headers"], concurrency=c, duration_s=duration,
                                rows_per_request=info["request_rows"], tool=spec["loadgen"])
                row = {"system": f"{system}-{protocol}" if system.startswith("fleet-http") else system,
                       "variant": variant, "model": model, "protocol": protocol, "batch": info["request_rows"],
                       **r.to_dict()}
                if spec.get("shipped"):
                    row["shipped"] = True  # the fleet as it runs by default: what the targets judge
                say(f"{row['system']} [{variant}] {model} c={c}: {row['req_per_s']:.0f} req/s, "
                    f"{row['rows_per_s']:.0f} rows/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                    f"errors {row['errors']}")
                rows.append(row)
    return rows


# ---- Ray helpers -------------------------------------------------------------------------
def ray_start():
    from cluster.env import apply_ray_env

    apply_ray_env()
    import ray

    from cluster.names import NAMESPACE

    # address="local": always a fresh instance, never another user's `ray start` cluster.
    ray.init(address="local", namespace=NAMESPACE, num_cpus=2, log_to_driver=False, include_dashboard=False,
             logging_level=logging.ERROR)
    return ray


def teardown_fleet(ray, spec: dict) -> None:
    """The fleet's own teardown (ingress, controller, workers), then Ray. With --quick only
    Ray's: ray.shutdown() ends this local instance and every process of it either way."""
    from cluster import fleet

    t0 = time.monotonic()
    if not spec.get("quick"):
        fleet.teardown()
    ray.shutdown()
    say(f"torn down in {time.monotonic() - t0:.1f} s")


def serve_mode() -> str:
    """The Ray Serve mode this process's environment selects (read after apply_ray_env)."""
    on = lambda k: os.environ.get(k) == "1"  # noqa: E731
    if on("RAY_SERVE_ENABLE_HA_PROXY"):
        return "throughput-optimized+haproxy" if on("RAY_SERVE_THROUGHPUT_OPTIMIZED") else "haproxy"
    if on("RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        return "throughput-optimized"
    return "direct-ingress" if on("RAY_SERVE_ENABLE_DIRECT_INGRESS") else "classic-proxy"


def direct_ingress_url(app_name: str, timeout_s: float = 60) -> str | None:
    """The ingress replica's own HTTP port under direct ingress (no HAProxy), else None.

    Serve has no public call for it yet, so this asks the Serve controller (benchmark only).
    """
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return None
    if not (os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" or os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"):
        return None
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups: list = ray.get(controller.get_target_groups.remote(app_name))
        for group in groups:
            if str(group.protocol).upper().endswith("HTTP") and group.targets:
                t = group.targets[0]
                if t.port and "proxy" not in t.name.lower():
                    return f"http://127.0.0.1:{t.port}"
        time.sleep(0.5)
    raise RuntimeError(f"no direct-ingress HTTP target for app {app_name} within {timeout_s:.0f} s")


def front_door_on() -> bool:
    """FLEET_BENCH_FRONT_DOOR=0 runs the fleet without its HAProxy front door (Serve on the port)."""
    return os.environ.get("FLEET_BENCH_FRONT_DOOR", "1") == "1"


def fleet_mode() -> str:
    """How the fleet of this phase process serves HTTP, as rows and the chart name it."""
    return f"front door + {serve_mode()}" if front_door_on() else serve_mode()


def _fleet_config(spec: dict):
    from cluster.config import load_config

    return load_config(str(CONFIG), repository=spec["prepared"]["repository"], port=free_port(),
                       front_door=front_door_on())


# ---- phase: bare ---------------------------------------------------------------------------
def phase_bare(spec: dict) -> dict:
    import onnxruntime as ort

    rows = []
    for model in spec["models"]:
        info = spec["prepared"]["models"][model]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # same options as workers/engines/onnxruntime.py (intra_op_threads 0)
        session = ort.InferenceSession(info["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for batch in sorted({1, info["max_batch"]}):
            feeds = model_inputs(model, batch)
            for _ in range(20):
                session.run(names, feeds)
            # Five windows; the best one is the machine's limit (other tenants of a shared
            # machine only ever slow a window down), the whole run is reported beside it.
            latencies = []
            window_rates = []
            t_start = time.perf_counter()
            for w in range(5):
                w_start = time.perf_counter()
                w_end = w_start + spec["duration_s"] / 5
                n = 0
                while True:
                    t0 = time.perf_counter()
                    session.run(names, feeds)
                    t1 = time.perf_counter()
                    latencies.append(t1 - t0)
                    n += 1
                    if t1 >= w_end:
                        break
                window_rates.append(n / (t1 - w_start))
            elapsed = time.perf_counter() - t_start
            calls = max(window_rates)
            row = {"system": "bare", "variant": f"onnxruntime {ort.__version__} cpu", "model": model, "batch": batch,
                   "concurrency": 1, "requests": len(latencies), "errors": 0, "duration_s": elapsed,
                   "req_per_s": calls, "rows_per_s": calls * batch,
                   "rows_per_s_whole_run": len(latencies) / elapsed * batch,
                   "rows_per_s_windows": [round(r * batch, 1) for r in window_rates], **summarize_ms(latencies)}
            say(f"bare {model} batch {batch}: {row['rows_per_s']:.0f} rows/s, {row['p50_ms'] * 1e3:.0f} us/call p50")
            rows.append(row)
    return {"rows": rows}


# ---- phase: fleet over HTTP ---------------------------------------------------------------
def phase_fleet_http(spec: dict) -> dict:
    ray = ray_start()
    from cluster import fleet
    from cluster.names import SERVE_APP_NAME

    front = front_door_on()
    mode = fleet_mode()
    try:
        config = _fleet_config(spec)
        t0 = time.monotonic()
        fleet.deploy(config)
        deploy_s = time.monotonic() - t0
        url = f"http://127.0.0.1:{config.port}"
        direct = None if front else direct_ingress_url(SERVE_APP_NAME)
        if direct:
            say(f"direct ingress: the ingress replica listens on {direct} (the head proxy stays on {url})")
            url = direct
        say(f"fleet [{mode}] deployed in {deploy_s:.1f} s at {url}")
        rows = http_matrix("fleet-http", mode, url, spec, protocols=spec.get("protocols", ("binary", "json")))
        return {"rows": rows, "info": {"deploy_s": deploy_s, "serve_mode": mode, "url": url}}
    finally:
        teardown_fleet(ray, spec)


# ---- phase: fleet from inside the cluster (no HTTP) -------------------------------------
def _client_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class ClientBench:
        """Calls the fleet the way the ingress does (DataPlane: route + worker call) or
        straight at the worker holding the engine (as cluster/batch.py's FleetWorkers)."""

        def __init__(self) -> None:
            from cluster.dataplane import DataPlane
            from cluster.names import CONTROLLER_NAME, NAMESPACE

            self.plane = DataPlane(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE))

        async def run(self, how: str, model: str, feeds: dict, concurrency: int, duration_s: float) -> dict:
            await self.plane.refresh(force=True)
            if how == "direct":
                version = self.plane.router.resolve(model, None)
                choice = self.plane.router.choose(model, version)
                if choice is None:
                    await self.plane.infer(model, None, feeds)  # loads it
                    await self.plane.refresh(force=True)
                    choice = self.plane.router.choose(model, version)
                if choice is None:
                    raise RuntimeError(f"no worker holds {model} after loading it")
                handle, key = self.plane.handles[choice.worker_id], choice.manifest.engine_key

                def call():
                    return handle.infer.remote(key, feeds)
            else:
                def call():
                    return self.plane.infer(model, None, feeds)
            for _ in range(20):
                await call()
            latencies: list[float] = []
            started = time.perf_counter()
            deadline = started + duration_s

            async def loop():
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    await call()
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
            return {"elapsed": time.perf_counter() - started, "latencies": latencies}

    return ClientBench


def phase_fleet_client(spec: dict) -> dict:
    ray = ray_start()
    from cluster import fleet

    try:
        config = _fleet_config(spec)
        fleet.deploy(config)
        bench = _client_actor_class().remote()
        rows = []
        for model in spec["models"]:
            info = spec["prepared"]["models"][model]
            feeds = model_inputs(model, info["request_rows"])
            for how in spec.get("hows", ("dataplane", "direct")):
                for c in spec["levels"].get(model, []):
                    out = ray.get(bench.run.remote(how, model, feeds, c, spec["duration_s"]))
                    n = len(out["latencies"])
                    req_s = n / out["elapsed"]
                    row = {"system": "fleet-client", "variant": how, "model": model, "batch": info["request_rows"],
                           "concurrency": c, "requests": n, "errors": 0, "duration_s": out["elapsed"],
                           "req_per_s": req_s, "rows_per_s": req_s * info["request_rows"],
                           **summarize_ms(out["latencies"])}
                    say(f"fleet-client [{how}] {model} c={c}: {req_s:.0f} req/s, p50 {row['p50_ms']:.2f} ms")
                    rows.append(row)
        return {"rows": rows}
    finally:
        teardown_fleet(ray, spec)


# ---- phase: the naive Ray Serve deployment ------------------------------------------------
def _naive_deployment():
    """What a user writes in ten minutes: one replica, ONNX Runtime inside, JSON in and out."""
    import numpy as np
    from ray import serve
    from starlette.requests import Request

    @serve.deployment
    class NaiveOnnx:
        def __init__(self, model_path: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
            self.outputs = [o.name for o in self.session.get_outputs()]

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            feeds = {i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"]) for i in body["inputs"]}
            results = self.session.run(self.outputs, feeds)
            return {"outputs": [
                {"name": n, "datatype": "INT64" if r.dtype == np.int64 else "FP32", "shape": list(r.shape),
                 "data": r.reshape(-1).tolist()}
                for n, r in zip(self.outputs, results)
            ]}

    return NaiveOnnx


def phase_naive_serve(spec: dict) -> dict:
    ray = ray_start()
    from ray import serve

    mode = serve_mode()
    models = [m for m in spec["models"] if spec["levels"].get(m) or spec["levels"].get(f"{m}/json")]
    spec = dict(spec, models=models)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        naive = _naive_deployment()
        t0 = time.monotonic()
        urls = {}
        for model in spec["models"]:
            app = f"naive-{model}"
            serve.run(naive.bind(spec["prepared"]["models"][model]["onnx"]), name=app,
                      route_prefix=f"/v2/models/{model}", blocking=False)
        base = f"http://127.0.0.1:{port}"
        for model in spec["models"]:
            direct = direct_ingress_url(f"naive-{model}")
            urls[model] = direct or base
            body_info = spec["prepared"]["models"][model]["bodies"]["json"]
            wait_http(urls[model] + f"/v2/models/{model}/infer", 120, method="POST",
                      body=Path(body_info["path"]).read_bytes(), headers=body_info["headers"])
        deploy_s = time.monotonic() - t0
        say(f"naive serve [{mode}] up in {deploy_s:.1f} s: {urls}")
        rows = []
        for model in spec["models"]:
            sub = dict(spec, models=[model])
            rows += http_matrix("naive-serve", mode, urls[model], sub, protocols=("json",))
        return {"rows": rows, "info": {"deploy_s": deploy_s, "serve_mode": mode, "urls": urls}}
    finally:
        t1 = time.monotonic()
        try:
            if not spec.get("quick"):
                serve.shutdown()
        finally:
            ray.shutdown()
        say(f"torn down in {time.monotonic() - t1:.1f} s")


# ---- phase: the router alone --------------------------------------------------------------
TARGET_MIX = (("7.5", "10.16.1", 0.4), ("6.1", "8.6.1", 0.3), ("7.0", "10.4.0", 0.3))


def build_router_fleet(n_workers: int, n_models: int, engines_per_worker: int = 10, seed: int = 0):
    """A Router over n simulated workers (T4/P4/V100-like mix) and n models, each model
    built for every target, each worker holding ``engines_per_worker`` engines."""
    from cluster.router import Router, WorkerState
    from workers.devices import Device
    from workers.manifest import Manifest
    from workers.targets import Runtime, Target, WorkerCaps
    from workers.tensors import TensorSpec

    rng = random.Random(seed)
    ort_rt = Runtime("onnxruntime", "1.23.2", "cpu")
    io_spec = (TensorSpec("input", "FP32", (-1, 4)),)
    manifests = {}
    for i in range(n_models):
        model = f"model-{i:03d}"
        for cc, trt, _ in TARGET_MIX:
            target = Target("tensorrt", trt, cc, provider="tensorrt", simulated=True)
            manifests[(model, cc)] = Manifest(model, "1", "float32", target, "model.plan", "0" * 64, "1" * 64,
                                              io_spec, io_spec, 10 << 20)
    workers = []
    for w in range(n_workers):
        cc, trt, _ = rng.choices(TARGET_MIX, weights=[t[2] for t in TARGET_MIX])[0]
        wid = f"w{w:04d}"
        device = Device(wid, f"SIM-{wid}", "gpu", cc, 16 << 30, simulated=True)
        caps = WorkerCaps(wid, device, (Runtime("tensorrt", trt, "tensorrt", simulated=True), ort_rt))
        models = rng.sample(range(n_models), min(engines_per_worker, n_models))
        loaded = {manifests[(f"model-{m:03d}", cc)].engine_key for m in models}
        state = WorkerState(caps, budget_bytes=15 << 30, used_bytes=len(loaded) * (10 << 20), loaded=loaded)
        state.outstanding = rng.randrange(4)
        workers.append(state)
    router = Router()
    t0 = time.perf_counter()
    router.set_inventory(workers, list(manifests.values()))
    inventory_s = time.perf_counter() - t0
    return router, [f"model-{i:03d}" for i in range(n_models)], inventory_s


def router_microbench(n_workers: int = 1000, n_models: int = 200, decisions: int = 20000, seed: int = 0) -> list[dict]:
    """Median / p99 of one Router.choose (plus begin/end bookkeeping) in microseconds."""
    from loadgen import percentile

    router, models, inventory_s = build_router_fleet(n_workers, n_models, seed=seed)
    rng = random.Random(seed + 1)
    rows = []
    scenarios = [("spread: each model on ~50 workers", lambda: rng.choice(models))]
    hot = models[0]
    for wid, m in router.compatible(hot, "1"):  # one hot model loaded on every worker that can run it
        router.workers[wid].loaded.add(m.engine_key)
    router._reindex_loaded()  # noqa: SLF001 (test setup: the loaded sets were edited in place)
    scenarios.append(("hot: one model on all 1,000 workers", lambda: hot))
    perf = time.perf_counter_ns
    for label, pick in scenarios:
        n = decisions if label.startswith("spread") else max(200, decisions // 10)  # the hot case is slow
        for _ in range(min(1000, n)):  # warm up
            router.choose(pick(), "1")
        samples = []
        misses = 0
        for _ in range(n):
            model = pick()
            t0 = perf()
            choice = router.choose(model, "1")
            if choice is not None:
                router.begin(choice.worker_id)
                router.end(choice.worker_id)
            samples.append((perf() - t0) / 1e3)
            misses += choice is None
        rows.append({"system": "router", "variant": label, "workers": n_workers, "models": n_models,
                     "decisions": n, "misses": misses, "median_us": percentile(samples, 50),
                     "p99_us": percentile(samples, 99), "max_us": max(samples), "set_inventory_ms": inventory_s * 1e3})
    return rows


def phase_router(spec: dict) -> dict:
    rows = router_microbench(spec.get("workers", 1000), spec.get("n_models", 200), spec.get("decisions", 20000))
    for r in rows:
        say(f"router [{r['variant']}]: median {r['median_us']:.1f} us, p99 {r['p99_us']:.1f} us")
    return {"rows": rows}


# ---- phase: cold start -------------------------------------------------------------------
def _pids_with_marker(marker: str) -> list[int]:
    needle = f"FLEET_BENCH_MARKER={marker}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_marked(marker: str, grace_s: float = 10.0) -> int:
    """End the processes (and only those) that carry our marker in their environment."""
    pids = _pids_with_marker(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pids_with_marker(marker):
        time.sleep(0.2)
    for pid in _pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def phase_cold_start(spec: dict) -> dict:
    """`fleet up --demo` in a fresh directory, to the first good inference over HTTP.

    The demo ONNX sources are copied in (a user has their model already); the
    repository, Ray, the controller, the workers and Serve all start from nothing.
    Ray runs under its own RAY_TMPDIR with fresh ports, so it never touches another
    Ray on this host, and it is stopped by process id afterwards (`fleet down` would
    run `ray stop --force`, which stops every Ray on the host).
    """
    import shutil

    import requests
    import yaml

    from cluster.env import ray_env

    tmp = Path(tempfile.mkdtemp(prefix="ffb-", dir="/tmp"))
    marker = uuid.uuid4().hex
    port, ray_port, dash_port = free_port(), free_port(), free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config.update(port=port, ray_port=ray_port, dashboard_port=dash_port, repository=str(tmp / "repository"))
    cfg_path = tmp / "fleet.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    (tmp / "models").mkdir()
    for model, info in spec["prepared"]["models"].items():
        shutil.copy(info["onnx"], tmp / "models" / f"{model}.onnx")
    env = dict(ray_env(), RAY_TMPDIR=str(tmp / "r"), FLEET_BENCH_MARKER=marker)
    env.pop("RAY_ADDRESS", None)
    (tmp / "r").mkdir()
    fleet_cli = str(Path(sys.executable).with_name("fleet"))
    prepared = spec["prepared"]
    body_info = prepared["models"]["digits-mlp"]["bodies"]["binary"]
    body = Path(body_info["path"]).read_bytes()
    url = f"http://127.0.0.1:{port}/v2/models/digits-mlp/infer"
    info = {"dir": str(tmp)}
    try:
        import threading

        t0 = time.monotonic()
        proc = subprocess.Popen([fleet_cli, "up", "--config", str(cfg_path), "--port", str(port), "--demo"],
                                cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stages: list[tuple[float, str]] = []

        def read_output() -> None:
            for line in proc.stdout or ():
                if line.strip():
                    stages.append((round(time.monotonic() - t0, 2), line.rstrip()[:160]))

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        # Poll from the start: the first good answer may come before `fleet up` exits.
        t_first = t_up = None
        last_error = None
        timeout_s = spec.get("timeout_s", 240)
        while time.monotonic() - t0 < timeout_s and (t_first is None or t_up is None):
            if t_up is None and proc.poll() is not None:
                t_up = time.monotonic() - t0
                if proc.returncode != 0:
                    reader.join(5)
                    raise RuntimeError(f"fleet up exited {proc.returncode}: {[s for _, s in stages][-10:]}")
            if t_first is None:
                try:
                    r = requests.post(url, data=body, headers=body_info["headers"], timeout=5)
                    if r.status_code == 200 and check_answer("digits-mlp", r.content, r.headers, prepared) is None:
                        t_first = time.monotonic() - t0
                    else:
                        last_error = f"HTTP {r.status_code}"
                except requests.RequestException as exc:
                    last_error = str(exc)[:200]
            time.sleep(0.05)
        reader.join(5)
        info["stages"] = stages
        if t_first is None or t_up is None:
            proc.kill()
            raise RuntimeError(f"no good inference within {timeout_s} s ({last_error})")
        say(f"cold start: first good inference at {t_first:.1f} s, fleet up returned at {t_up:.1f} s")
        t1 = time.monotonic()
        down = subprocess.run(
            [sys.executable, "-c",
             "import sys; from cluster.env import apply_ray_env; apply_ray_env(); from cluster import fleet; "
             "fleet.connect(sys.argv[1]); fleet.teardown(); fleet.disconnect()", f"127.0.0.1:{ray_port}"],
            env=env, capture_output=True, text=True, timeout=120)
        info["teardown_rc"] = down.returncode
        t_teardown = time.monotonic() - t1
        row = {"system": "cold-start", "variant": "fleet up --demo (fresh repository, fresh Ray)",
               "fleet_up_s": t_up, "first_inference_s": t_first, "teardown_s": t_teardown,
               "first_inference_after_fleet_up_s": max(t_first, t_up)}
        return {"rows": [row], "info": info}
    finally:
        info["stopped_processes"] = stop_marked(marker)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- phase: profile of the fleet HTTP path ---------------------------------------------------
def _label_of(pid: int) -> str:
    """What a process of our Ray instance is, from its title (Ray titles actors 'ray::Class...')."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    for needle, label in (("FleetIngress", "ingress replica"), ("ProxyActor", "serve proxy"), ("HAProxy", "serve proxy"),
                          ("FleetWorker", "fleet worker"), ("FleetController", "fleet controller"),
                          ("ServeController", "serve controller"), ("haproxy", "haproxy")):
        if needle in title:
            return label
    if title.startswith("ray::"):
        return title.split()[0]
    return comm


def _actor_pids(root: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for pid in _descendants(root):
        out.setdefault(_label_of(pid), []).append(pid)
    return out


def _collapsed_top(path: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the leaf frames of a py-spy 'raw' (collapsed) profile."""
    from collections import Counter

    leaf: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf[frames[-1]] += int(count)
        total += int(count)
    return [(frame, round(100.0 * c / total, 1)) for frame, c in leaf.most_common(n)] if total else []


def _inclusive(path: Path, needles: dict[str, str]) -> dict[str, float]:
    """Inclusive share of samples whose stack contains each needle."""
    counts = dict.fromkeys(needles, 0)
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for label, needle in needles.items():
            if needle in stack:
                counts[label] += int(count)
    return {k: round(100.0 * v / total, 1) for k, v in counts.items()} if total else {}


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cpu_seconds(pid: int) -> float | None:
    fields = _stat(pid)
    if not fields:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def phase_profile(spec: dict) -> dict:
    """CPU seconds per process during a digits-mlp binary run, plus py-spy on the hot processes."""
    ray = ray_start()
    from cluster import fleet

    out: dict = {}
    try:
        from cluster.names import SERVE_APP_NAME

        config = _fleet_config(spec)
        fleet.deploy(config)
        direct = None if front_door_on() else direct_ingress_url(SERVE_APP_NAME)
        url = f"{direct or f'http://127.0.0.1:{config.port}'}/v2/models/digits-mlp/infer"
        out["serve_mode"] = fleet_mode()
        verify_endpoint(url, "digits-mlp", "binary", spec["prepared"])
        body_info = spec["prepared"]["models"]["digits-mlp"]["bodies"]["binary"]
        body = Path(body_info["path"]).read_bytes()
        loadgen.run(url, body, body_info["headers"], concurrency=32, duration_s=2, tool=spec["loadgen"])
        # Every process of this Ray instance descends from this driver (gcs, raylet, workers).
        pids = _actor_pids(os.getpid())
        procs = {pid: label for label, ps in pids.items() for pid in ps}
        duration = spec["duration_s"]
        spy_dir = Path(spec.get("profile_dir") or tempfile.mkdtemp(prefix="ffb-spy-")) / serve_mode()
        spy_dir.mkdir(parents=True, exist_ok=True)
        spies = {}
        py_spy = Path(sys.executable).with_name("py-spy")
        if spec.get("py_spy", True) and py_spy.exists():
            for label in ("ingress replica", "serve proxy", "fleet worker", "fleet controller"):
                for pid in pids.get(label, [])[:1]:
                    target = spy_dir / f"{label.replace(' ', '-')}.txt"
                    spies[label] = (target, subprocess.Popen(
                        [str(py_spy), "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "100",
                         "--format", "raw", "--output", str(target), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        before = {pid: _cpu_seconds(pid) for pid in procs}
        busy0, total0 = _machine_busy()
        t0 = time.monotonic()
        load = loadgen.run(url, body, body_info["headers"], concurrency=32, duration_s=duration, tool=spec["loadgen"])
        wall = time.monotonic() - t0
        busy1, total1 = _machine_busy()
        cpu = {}
        for pid, label in procs.items():
            after, start = _cpu_seconds(pid), before.get(pid)
            if after is not None and start is not None:
                share = 100.0 * (after - start) / wall
                if share >= 1.0:
                    cpu[f"{label} (pid {pid})"] = round(share, 1)
        out["cpu_percent_of_one_core"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
        out["cpu_seconds_per_request_ms"] = {k: round(v / 100.0 * wall / max(1, load.ok_requests) * 1e3, 3)
                                             for k, v in out["cpu_percent_of_one_core"].items()}
        out["machine_busy_percent"] = round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1)
        out["load"] = load.to_dict()
        out["py_spy_overhead_note"] = "py-spy samples at 100 Hz while this runs; it costs some CPU itself"
        profiles = {}
        for label, (target, proc) in spies.items():
            try:
                proc.wait(duration + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if target.exists():
                profiles[label] = {
                    "raw": str(target),
                    "top_self": _collapsed_top(target),
                    "inclusive": _inclusive(target, {
                        "decode_request": "decode_request", "encode_response": "encode_response",
                        "DataPlane.infer": "infer (cluster/dataplane.py", "fastapi/starlette": "starlette",
                        "ray serve replica": "serve/_private/replica.py", "ray serve proxy": "serve/_private/proxy.py",
                        "worker infer": "infer (workers/actor.py", "onnxruntime run": "run (onnxruntime",
                        "batcher": "workers/batcher.py", "serialization": "serializ",
                        "asyncio event loop": "asyncio/base_events.py",
                    }),
                }
            else:
                profiles[label] = {"error": (proc.stderr.read().decode(errors="replace") if proc.stderr else "")[-400:]}
        out["py_spy"] = profiles
        say(f"profile: {load.req_per_s:.0f} req/s; CPU % of one core: {out['cpu_percent_of_one_core']}")
        return {"rows": [], "info": out}
    finally:
        teardown_fleet(ray, spec)


PHASES = {
    "bare": phase_bare,
    "fleet-http": phase_fleet_http,
    "fleet-client": phase_fleet_client,
    "naive-serve": phase_naive_serve,
    "router": phase_router,
    "cold-start": phase_cold_start,
    "profile": phase_profile,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in PHASES:
        print(f"usage: bench_phases.py {{{','.join(PHASES)}}} SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    os.chdir(REPO_ROOT)
    result = PHASES[argv[0]](spec)
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
