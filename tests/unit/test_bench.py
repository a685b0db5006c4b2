"""Smoke tests of the benchmark's pure parts (scripts/bench*.py, scripts/loadgen.py): no Ray, seconds."""

import asyncio
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402
import bench_phases  # noqa: E402
import bench_report  # noqa: E402
import loadgen  # noqa: E402


# ---- percentiles and load results -------------------------------------------------------
def test_percentile_interpolates_like_numpy():
    np = pytest.importorskip("numpy")
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
    rows = bench_phases.router_microbench(n_workers=30, n_models=6, decisions=300)
    assert [r["variant"].split(":")[0] for r in rows] == ["spread", "hot"]
    for r in rows:
        assert r["misses"] == 0 and 0 < r["median_us"] <= r["p99_us"] <= r["max_us"]
        assert r["workers"] == 30 and r["models"] == 6


def test_router_fleet_only_loads_engines_the_worker_can_run():
    from workers.targets import can_run

    router, models, _ = bench_phases.build_router_fleet(40, 8, engines_per_worker=3)
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
    doc = {"schema": bench_report.SCHEMA, "started": "2026-01-01T00-00-00", "quick": True, "host": {"cpus": 2},
           "args": {}, "loadgen": {"tool": "wrk", "ceiling": {"tool": "wrk", "req_per_s": 60000.0, "concurrency": 32}},
           "phases": phases}
    doc["targets"] = bench_report.evaluate_targets(doc)
    return doc


def test_targets_compare_the_right_rows():
    by_start = {t["name"]: t for t in bench_report.evaluate_targets(_doc())}
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
    assert bench_report.shipped_rows(rows) == rows[:1]


def test_missing_phases_give_unmeasured_targets_not_failures():
    doc = {"phases": {"router": _doc()["phases"]["router"]}}
    targets = bench_report.evaluate_targets(doc)
    assert len(targets) == 7
    assert sum(t["met"] is None for t in targets) == 5


def test_result_document_schema():
    doc = _doc()
    assert bench_report.validate(doc) == []
    json.loads(json.dumps(doc))  # plain JSON
    broken = json.loads(json.dumps(doc))
    del broken["phases"]["fleet-http"]["rows"][0]["p99_ms"]
    broken["phases"]["bare"]["status"] = "fine"
    problems = bench_report.validate(broken)
    assert any("p99_ms" in p for p in problems) and any("status" in p for p in problems)


def test_markdown_table_lists_every_measurement():
    table = bench_report.markdown_table(_doc())
    assert table.count("\n") + 1 == 2 + 11  # header, rule, 9 load rows, router, cold start
    assert "| fleet-http-binary | default | digits-mlp | 1 | 32 | 2,000 |" in table
    assert "median 20.0 us" in table and "first inference 16.0 s" in table


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = bench_report.write_chart(_doc(), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the command line -------------------------------------------------------------------------
def test_phase_selection_and_defaults():
    quick = bench.parse_args(["--quick"])
    assert quick.phase_list == list(bench.QUICK_DEFAULT_PHASES) and quick.duration == 2.0
    full = bench.parse_args([])
    assert full.phase_list == list(bench.ALL_PHASES) and full.duration == 4.0
    some = bench.parse_args(["--phases", "router,bare"])
    assert some.phase_list == ["bare", "router"]  # run in the fixed order
    with pytest.raises(SystemExit):
        bench.parse_args(["--phases", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "resnet"])


def test_levels_keep_issue_concurrencies_for_digits():
    for phase in ("fleet-http", "naive-serve", "fleet-client"):
        assert bench.levels_for(phase, quick=False)["digits-mlp"] == [1, 8, 32]
    assert bench.levels_for("triton", quick=False)["digits-mlp/binary"] == [1, 8, 32]
