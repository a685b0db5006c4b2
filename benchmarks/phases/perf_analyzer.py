"""perf-analyzer: Triton's own load generator (the C++ perf_analyzer) against the fleet and against Triton.

The same model (digits-mlp, one row per request), the same concurrency levels (1, 8, 32),
in one run: the fleet as shipped over HTTP (the front door) and gRPC (the gRPC router),
then Triton via PyTriton (``benchmarks/phases/triton.py``, in its own environment) over
HTTP and gRPC. perf_analyzer reads each server's metadata, configuration and statistics
itself, so its server-side queue and compute times come with every row.

perf_analyzer comes from ``scripts/install_perf_analyzer.py`` (the plan finds or installs it).
"""

from __future__ import annotations

import csv
import json
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import REPO_ROOT, local_fleet, progress


def measure(spec: dict, system: str, protocol: str, url: str, concurrency: int, headers: dict | None = None) -> dict:
    """One perf_analyzer run at one concurrency: a row (req/s, p50/p99 ms, the server's own times)."""
    model = spec["model"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        command = [spec["perf_analyzer"], "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(concurrency),
                   "--measurement-interval", str(int(spec["window_s"] * 1000)), "--stability-percentage", "100",
                   "--max-trials", "10", "-f", str(report)]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}:{value}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        if done.returncode != 0 or not report.is_file():
            raise RuntimeError(f"perf_analyzer {system} c={concurrency} exited {done.returncode}: {output[-1500:]}")
        (line,) = list(csv.DictReader(report.open()))
    us = {k: float(v) for k, v in line.items() if v not in ("", None) and k != "Concurrency"}
    row = {"system": system, "variant": f"perf_analyzer -i {protocol}", "model": model, "batch": 1,
           "concurrency": concurrency, "requests": None, "errors": 0, "req_per_s": us["Inferences/Second"],
           "rows_per_s": us["Inferences/Second"], "p50_ms": us["p50 latency"] / 1000, "p99_ms": us["p99 latency"] / 1000,
           "server_queue_ms": us.get("Server Queue", 0) / 1000, "server_compute_ms": us.get("Server Compute Infer", 0) / 1000}
    progress(f"{system} c={concurrency}: {row['req_per_s']:.0f} infer/s, p50 {row['p50_ms']:.2f} ms, "
             f"p99 {row['p99_ms']:.2f} ms (server: queue {row['server_queue_ms']:.2f} ms, "
             f"compute {row['server_compute_ms']:.2f} ms)")
    return row


@contextmanager
def pytriton(spec: dict) -> Iterator[tuple[dict, str]]:
    """Triton via PyTriton in its own environment, until the block ends: (ports, access token)."""
    token = secrets.token_urlsafe(16)
    served = dict(spec, access_token=token)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "triton.json"
        spec_path.write_text(json.dumps(served))
        proc = subprocess.Popen([spec["triton_python"], "-m", "benchmarks.phases.triton", str(spec_path)], cwd=REPO_ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip() == "TRITON_READY":
                    break
            else:
                raise RuntimeError(f"PyTriton exited with {proc.wait()} before it was ready")
            yield spec["ports"], token
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(spec: dict) -> dict:
    rows: list[dict] = []
    incidents: list[str] = []
    levels = spec["levels"]
    with local_fleet(spec) as fleet:
        targets = {"http": fleet.url.removeprefix("http://"), "grpc": f"127.0.0.1:{fleet.config.grpc_port}"}
        for protocol, url in targets.items():
            for c in levels:
                rows.append(measure(spec, f"pa-fleet-{protocol}", protocol, url, c))
    if spec.get("triton_python"):
        try:
            with pytriton(spec) as (ports, token):
                progress(f"PyTriton up on HTTP {ports['http']}, gRPC {ports['grpc']}")
                headers = {"http": {"triton-access-token": token},
                           "grpc": {"triton-grpc-protocol-triton-access-token": token}}
                for protocol in ("http", "grpc"):
                    for c in levels:
                        rows.append(measure(spec, f"pa-triton-{protocol}", protocol, f"127.0.0.1:{ports[protocol]}", c,
                                            headers[protocol]))
        except Exception as exc:  # noqa: BLE001 (keep the fleet's rows; say what broke)
            incidents.append(f"triton: {type(exc).__name__}: {exc}")
    else:
        incidents.append("triton: no PyTriton environment (--triton-python): only the fleet was measured")
    return {"rows": rows, "info": {"perf_analyzer": spec["perf_analyzer"], "python": sys.version.split()[0]},
            "incidents": incidents}
