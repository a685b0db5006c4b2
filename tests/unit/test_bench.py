"""Smoke tests of the benchmarks' pure parts (the benchmarks package): no Ray, seconds."""

import asyncio
import importlib.util
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.needs import skip_unless

from benchmarks import cli, loadgen, report, serve_modes
from benchmarks.phases import PHASES, module_name
from benchmarks.phases.router import build_router_fleet, router_microbench
from benchmarks.plans import Context, levels_for, plan_for


# ---- percentiles and load results -------------------------------------------------------
def test_percentile_interpolates_like_numpy():
    import numpy as np
    data = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert loadgen.percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_percentile_edges():
    assert math.isnan(loadgen.percentile([], 50))
    assert loadgen.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        loadgen.percentile([1.0], 101)


def test_load_result_counts_only_good_answers():
    r = loadgen.LoadResult(tool="wrk", concurrency=8, duration_s=2.0, requests=1000, errors=100, rows_per_request=64)
    d = r.to_dict()
    assert d["req_per_s"] == 450.0 and d["rows_per_s"] == 450.0 * 64
    assert {"tool", "concurrency", "p50_ms", "p99_ms", "errors", "error_detail"} <= set(d)


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the generators expect

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if self.path.endswith("/bad") else 200
        body = b'{"ok":true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tiny_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_asyncio_engine_drives_a_server_and_counts_errors(tiny_server):
    ok = asyncio.run(loadgen.drive(tiny_server + "/v2/models/m/infer", b"x" * 100, "application/octet-stream", "10",
                                   concurrency=2, duration_s=0.3, timeout_s=5))
    assert ok.requests > 0 and ok.errors == 0 and ok.p50_ms > 0 and ok.p99_ms >= ok.p50_ms
    bad = asyncio.run(loadgen.drive(tiny_server + "/bad", b"x", "application/json", "", concurrency=1,
                                    duration_s=0.2, timeout_s=5))
    assert bad.requests > 0 and bad.errors == bad.requests and bad.req_per_s == 0


def test_request_bytes_carry_the_kserve_binary_header():
    host, port, raw = loadgen._request_bytes("http://127.0.0.1:8123/v2/models/m/infer", b"BODY", "application/octet-stream", "42")
    assert (host, port) == ("127.0.0.1", 8123)
    head = raw.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v2/models/m/infer HTTP/1.1")
    assert "Inference-Header-Content-Length: 42" in head and "Content-Length: 4" in head
    assert raw.endswith(b"\r\n\r\nBODY")


# ---- the router microbenchmark, small ------------------------------------------------------
def test_router_microbench_small_scale():
    rows = router_microbench(n_workers=30, n_models=6, decisions=300)
    assert [r["variant"].split(":")[0] for r in rows] == ["spread", "hot"]
    for r in rows:
        assert r["misses"] == 0 and 0 < r["median_us"] <= r["p99_us"] <= r["max_us"]
        assert r["workers"] == 30 and r["models"] == 6


def test_router_fleet_only_loads_engines_the_worker_can_run():
    from workers.targets import can_run

    router, models, _ = build_router_fleet(40, 8, engines_per_worker=3)
    assert len(models) == 8 and len(router.workers) == 40
    manifests = {m.engine_key: m for model in models for m in router.manifests(model, "1")}
    for w in router.workers.values():
        assert len(w.loaded) == 3
        assert all(can_run(manifests[key], w.caps) for key in w.loaded)


# ---- result document, targets, table, chart -------------------------------------------------
def _row(system, model, c, req_s, p99, variant="default", batch=1, **extra):
    return {"system": system, "variant": variant, "model": model, "batch": batch, "concurrency": c, "requests": 100,
            "errors": 0, "req_per_s": req_s, "rows_per_s": req_s * batch, "p50_ms": p99 / 2, "p99_ms": p99, **extra}


def _doc():
    phases = {
        "bare": {"status": "ok", "seconds": 1.0, "rows": [
            _row("bare", "digits-mlp", 1, 20000.0, 0.1),
            _row("bare", "cnn-small", 1, 60.0, 20.0, batch=64)]},
        "fleet-http": {"status": "ok", "seconds": 1.0, "rows": [
            _row("fleet-http-binary", "digits-mlp", 32, 2000.0, 30.0, shipped=True),
            _row("fleet-http-binary", "digits-mlp", 8, 1500.0, 10.0, shipped=True),
            _row("fleet-http-binary", "cnn-small", 8, 50.0, 200.0, batch=64, shipped=True)]},
        "fleet-levers": {"status": "ok", "seconds": 1.0, "rows": [  # faster, but not how the fleet ships
            _row("fleet-http-binary", "digits-mlp", 32, 9000.0, 1.0, variant="direct-ingress")]},
        "naive-serve": {"status": "ok", "seconds": 1.0, "rows": [
            _row("naive-serve", "digits-mlp", 32, 150.0, 900.0),
            _row("naive-serve", "digits-mlp", 32, 1800.0, 40.0, variant="throughput-optimized+haproxy")]},
        "triton": {"status": "ok", "seconds": 1.0, "rows": [_row("triton-binary", "digits-mlp", 32, 1500.0, 25.0)]},
        "router": {"status": "ok", "seconds": 1.0, "rows": [
            {"system": "router", "variant": "spread: x", "workers": 1000, "models": 200, "median_us": 20.0, "p99_us": 250.0}]},
        "cold-start": {"status": "ok", "seconds": 1.0, "rows": [
            {"system": "cold-start", "variant": "x", "fleet_up_s": 15.0, "first_inference_s": 16.0}]},
    }
    doc = {"schema": report.SCHEMA, "started": "2026-01-01T00-00-00", "quick": True, "host": {"cpus": 2},
           "args": {}, "loadgen": {"tool": "wrk", "ceiling": {"tool": "wrk", "req_per_s": 60000.0, "concurrency": 32}},
           "phases": phases}
    doc["targets"] = report.evaluate_targets(doc)
    return doc


def test_targets_compare_the_right_rows():
    by_start = {t["name"]: t for t in report.evaluate_targets(_doc())}
    naive = next(t for n, t in by_start.items() if "naive-serve" in n)
    assert naive["value"] == pytest.approx(2000 / 1800, abs=1e-3) and naive["met"] is True  # the throughput-mode row
    triton = next(t for n, t in by_start.items() if "/ Triton" in n)
    assert triton["value"] == pytest.approx(2000 / 1500, abs=1e-3) and triton["met"] is True
    p99 = next(t for n, t in by_start.items() if "p99 <= Triton" in n)
    assert p99["met"] is False  # 30 ms > 25 ms
    cnn = next(t for n, t in by_start.items() if n.startswith("cnn-small"))
    assert cnn["value"] == pytest.approx(50 * 64 / (60 * 64), abs=1e-3) and cnn["met"] is True
    router = [t for n, t in by_start.items() if n.startswith("router")]
    assert [t["met"] for t in router] == [True, False]
    assert next(t for n, t in by_start.items() if n.startswith("cold start"))["met"] is True


def test_targets_fall_back_to_the_default_variant_of_older_documents():
    rows = [_row("fleet-http-binary", "digits-mlp", 32, 2000.0, 30.0), _row("fleet-http-binary", "digits-mlp", 32, 1.0, 30.0, variant="x")]
    assert report.shipped_rows(rows) == rows[:1]


def test_missing_phases_give_unmeasured_targets_not_failures():
    doc = {"phases": {"router": _doc()["phases"]["router"]}}
    targets = report.evaluate_targets(doc)
    assert len(targets) == 12
    assert sum(t["met"] is None for t in targets) == 10


def test_perf_analyzer_targets_compare_fleet_and_triton_per_protocol():
    rows = [dict(_row(f"pa-{name}", "digits-mlp", 32, rate, p99), variant="perf_analyzer")
            for name, rate, p99 in (("fleet-http", 3000.0, 9.0), ("fleet-grpc", 2000.0, 12.0),
                                    ("triton-http", 2000.0, 20.0), ("triton-grpc", 1900.0, 11.0))]
    by_name = {t["name"]: t for t in report.perf_analyzer_targets(rows)}
    http = by_name["perf_analyzer digits-mlp c=32: fleet http / Triton http, infer/s"]
    grpc = by_name["perf_analyzer digits-mlp c=32: fleet grpc / Triton grpc, infer/s"]
    assert http["value"] == pytest.approx(1.5) and http["met"] is True
    assert grpc["value"] == pytest.approx(2000 / 1900, abs=1e-3) and grpc["met"] is False  # under 1.2x
    assert by_name["perf_analyzer digits-mlp c=32: fleet grpc p99 <= Triton grpc p99 (ms)"]["met"] is False
    assert by_name["perf_analyzer digits-mlp c=32: fleet gRPC / fleet HTTP, infer/s"]["met"] is False


def test_result_document_schema():
    doc = _doc()
    assert report.validate(doc) == []
    json.loads(json.dumps(doc))  # plain JSON
    broken = json.loads(json.dumps(doc))
    del broken["phases"]["fleet-http"]["rows"][0]["p99_ms"]
    broken["phases"]["bare"]["status"] = "fine"
    problems = report.validate(broken)
    assert any("p99_ms" in p for p in problems) and any("status" in p for p in problems)


def test_markdown_table_lists_every_measurement():
    table = report.markdown_table(_doc())
    assert table.count("\n") + 1 == 2 + 11  # header, rule, 9 load rows, router, cold start
    assert "| fleet-http-binary | default | digits-mlp | 1 | 32 | 2,000 |" in table
    assert "median 20.0 us" in table and "first inference 16.0 s" in table


def test_chart_is_written(tmp_path):
    skip_unless(importlib.util.find_spec("matplotlib") is not None, "matplotlib is not installed (the dev extra has it)")
    path = report.write_chart(_doc(), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the command line -------------------------------------------------------------------------
def test_phase_selection_and_defaults():
    quick = cli.parse_args(["--quick"])
    assert quick.phase_list == list(cli.QUICK_DEFAULT_PHASES) and quick.duration == 2.0
    full = cli.parse_args([])
    assert full.phase_list == list(cli.ALL_PHASES) and full.duration == 4.0
    some = cli.parse_args(["--phases", "router,bare"])
    assert some.phase_list == ["bare", "router"]  # run in the fixed order
    with pytest.raises(SystemExit):
        cli.parse_args(["--phases", "nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "resnet"])


def test_levels_keep_issue_concurrencies_for_digits():
    for phase in ("fleet-http", "naive-serve", "fleet-client"):
        assert levels_for(phase, quick=False)["digits-mlp"] == [1, 8, 32]
    assert levels_for("triton", quick=False)["digits-mlp/binary"] == [1, 8, 32]


# ---- the package: phases, what the Triton environment may import --------------------------------
REPO = Path(__file__).resolve().parents[2]


def test_every_phase_has_a_module_with_run():
    import importlib

    for phase in PHASES:
        assert callable(importlib.import_module(module_name(phase)).run), phase
    with pytest.raises(ValueError):
        module_name("nope")


def test_triton_phase_imports_only_what_pytritons_environment_has():
    """The triton phase runs in PyTriton's venv (numpy, onnxruntime, pytriton): importing it, and
    the phase runner, must not pull in the project's other packages or their dependencies."""
    import subprocess
    import sys

    probe = ("import sys, benchmarks.phases.__main__, benchmarks.phases.triton, benchmarks.loadgen; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'cluster', 'workers', 'ray', 'requests', 'pydantic', 'numpy', 'onnxruntime', 'yaml'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_phase_runs_in_its_own_process_and_reports_one_result_line():
    from benchmarks.plans import Run
    from benchmarks.runner import run_process

    result = run_process(Run("router", {"workers": 30, "n_models": 6, "decisions": 300}, timeout_s=120))
    assert [r["system"] for r in result["rows"]] == ["router", "router"]


# ---- Serve modes: the environment of a phase, the direct-ingress URL without private Ray ---------
def test_each_serve_mode_reads_back_as_itself():
    for mode, switches in serve_modes.SERVE_MODES.items():
        assert serve_modes.mode_of(switches) == mode


def test_phase_env_never_inherits_the_callers_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    shipped = serve_modes.phase_env(None, tmp_path)
    assert serve_modes.mode_of(shipped) == serve_modes.shipped_mode() != "haproxy"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the caller's environment is left alone
    assert shipped["RAY_AUTH_MODE"]  # complete: a phase may import Ray at its top
    for mode in serve_modes.SERVE_MODES:
        env = serve_modes.phase_env(mode, tmp_path)
        assert serve_modes.mode_of(env) == mode
        # HAProxy mode: its socket, config and state in this run's own directory
        assert env.get("RAY_SERVE_HAPROXY_SOCKET_PATH", "").startswith(str(tmp_path)) == ("haproxy" in mode)
        low, high = int(env[serve_modes.DI_PORT_MIN]), int(env[serve_modes.DI_PORT_MAX])
        assert high - low == serve_modes.DI_PORTS and 20000 <= low and high <= 30000


class _Routes(BaseHTTPRequestHandler):
    """A direct-ingress replica as Serve answers GET /-/routes: {route_prefix: app_name}."""

    app = ""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"/": self.app}).encode()
        self.send_response(200 if self.path == "/-/routes" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_direct_ingress_url_is_the_replica_whose_routes_name_the_app(monkeypatch):
    low = serve_modes._free_port_block(3)
    servers = []
    for port, app in ((low, "other-app"), (low + 2, "forward-fleet")):
        server = ThreadingHTTPServer(("127.0.0.1", port), type("R", (_Routes,), {"app": app}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        monkeypatch.setenv(serve_modes.DI_PORT_MIN, str(low))
        monkeypatch.setenv(serve_modes.DI_PORT_MAX, str(low + 3))
        for k, v in serve_modes.SERVE_MODES["direct-ingress"].items():
            monkeypatch.setenv(k, v)
        assert serve_modes.direct_ingress_url("forward-fleet", timeout_s=5) == f"http://127.0.0.1:{low + 2}"
        with pytest.raises(RuntimeError, match="no direct-ingress replica"):
            serve_modes.direct_ingress_url("naive-x", timeout_s=0.5)
        monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # HAProxy in front: no replica URL to find
        assert serve_modes.direct_ingress_url("forward-fleet") is None
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# ---- plans: which processes each phase runs ----------------------------------------------------
def _context(tmp_path, triton_python=None):
    prepared = {"repository": str(tmp_path), "models": {"digits-mlp": {}, "cnn-small": {}}}
    return Context(quick=True, models=["digits-mlp", "cnn-small"], duration_s=2.0, tool="python", prepared=prepared,
                   workdir=tmp_path, triton_python=triton_python)


def test_http_phases_run_once_per_serve_mode(tmp_path):
    ctx = _context(tmp_path)
    shipped = plan_for("fleet-http", ctx)
    assert shipped.collect == "modes" and [(r.mode, r.spec["shipped"]) for r in shipped.runs] == [(None, True)]
    assert shipped.runs[0].label.startswith("as shipped (")
    levers = plan_for("fleet-levers", ctx)
    assert [r.mode for r in levers.runs] == list(serve_modes.SERVE_MODES) == [r.label for r in levers.runs]
    assert all(r.phase == "fleet-levers" and not r.spec["shipped"] for r in levers.runs)
    naive = plan_for("naive-serve", ctx)
    assert [r.mode for r in naive.runs] == ["classic-proxy", "throughput-optimized+haproxy"]
    profile = plan_for("profile", ctx)
    assert profile.collect == "profiles" and [r.spec["front_door"] for r in profile.runs] == [True, False]
    router = plan_for("router", ctx)
    assert router.collect == "single" and router.runs[0].spec["decisions"] == 5000


def test_triton_runs_with_its_own_python_and_checks_answers_here(tmp_path):
    plan = plan_for("triton", _context(tmp_path, triton_python="/opt/triton/bin/python"))
    (run,) = plan.runs
    assert run.python == "/opt/triton/bin/python" and set(run.spec["ports"]) == {"http", "grpc", "metrics"}
    assert plan.check({"rows": [], "answers": {}, "incidents": []}) == {"rows": [], "answers": {}, "verified": True}
