"""A bounded, closed-loop HTTP load generator for the benchmarks (a separate process).

Two engines, same result shape (``LoadResult``):

* ``wrk`` (Debian package ``wrk``; C, epoll, keep-alive) driven by a Lua script
  that POSTs a fixed body and prints its summary as one JSON line. Preferred.
* ``python``: this file run as a program: asyncio (uvloop when installed) with
  one keep-alive connection per concurrent slot and a minimal HTTP/1.1 parser.
  The fallback where wrk is missing; its own ceiling is lower, and
  ``benchmarks.ceiling`` measures it so a report can say when the generator, not the
  server, was the limit.

Both are closed loop: ``concurrency`` connections, each sends its next request as
soon as the previous answer arrives, for ``duration_s`` seconds.

Pinning: with ``FLEET_LOADGEN_CPUS`` set (taskset's list syntax, e.g. ``8-15``; ``scripts/bench.py
--pin`` sets it), the generator process runs on those cores only (``sched_setaffinity`` in the
child before it execs), and wrk's thread count follows them, so it never competes with a server
pinned elsewhere.

Standard library only: the Triton phase runs in PyTriton's own environment and uses
this module there too. Run ``python -m benchmarks.loadgen --help`` for the standalone form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

RESULT_MARK = "LOADGEN_RESULT "
CPUS_ENV = "FLEET_LOADGEN_CPUS"  # the cores the load generator runs on (taskset list syntax); unset: any

_WRK_LUA = r"""
local f = assert(io.open(os.getenv("LOADGEN_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("LOADGEN_CONTENT_TYPE")
local hl = os.getenv("LOADGEN_HEADER_LENGTH")
if hl ~= nil and hl ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = hl
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADGEN_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class LoadResult:
    """What one load run measured. Latencies in milliseconds."""

    tool: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    rows_per_request: int = 1
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    mean_ms: float = math.nan
    error_detail: dict = field(default_factory=dict)

    @property
    def ok_requests(self) -> int:
        return max(0, self.requests - self.errors)

    @property
    def req_per_s(self) -> float:
        return self.ok_requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.req_per_s * self.rows_per_request

    def to_dict(self) -> dict:
        d = asdict(self)
        d["req_per_s"] = round(self.req_per_s, 2)
        d["rows_per_s"] = round(self.rows_per_s, 2)
        return d


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); nan if empty."""
    data = sorted(values)
    if not data:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def pick_tool(tool: str = "auto") -> str:
    if tool == "auto":
        return "wrk" if wrk_path() else "python"
    if tool == "wrk" and not wrk_path():
        raise RuntimeError("wrk is not installed (apt-get install wrk), use --loadgen python")
    if tool not in ("wrk", "python"):
        raise ValueError(f"unknown load generator {tool!r} (wrk, python or auto)")
    return tool


def run(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration_s: float,
    rows_per_request: int = 1,
    tool: str = "auto",
    timeout_s: float = 30.0,
) -> LoadResult:
    """Drive ``url`` with POSTs of ``body`` from a separate process; blocks for about duration_s."""
    tool = pick_tool(tool)
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        body_path = Path(tmp) / "body.bin"
        body_path.write_bytes(body)
        lower = {k.lower(): v for k, v in headers.items()}
        content_type = lower.get("content-type", "application/octet-stream")
        header_length = lower.get("inference-header-content-length", "")
        if tool == "wrk":
            result = _run_wrk(url, body_path, content_type, header_length, concurrency, duration_s, timeout_s, Path(tmp))
        else:
            result = _run_python_subprocess(url, body_path, content_type, header_length, concurrency, duration_s, timeout_s)
    result.rows_per_request = rows_per_request
    return result


def parse_cpu_list(text: str) -> frozenset[int]:
    """taskset's list syntax, "0-7,9,12-13" -> {0, ..., 7, 9, 12, 13}; ValueError naming bad text."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {part!r} is neither N nor N-M") from None
        if first < 0 or last < first:
            raise ValueError(f"CPU list {text!r}: {part!r} is not an ascending range of CPU numbers")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (taskset's list syntax)."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == cpu - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        elif out and "-" not in out[-1] and int(out[-1]) == cpu - 1:
            out[-1] = f"{out[-1]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)


def pinned_cpus() -> frozenset[int] | None:
    """The cores ``FLEET_LOADGEN_CPUS`` names, or None when it is unset or empty."""
    text = os.environ.get(CPUS_ENV, "").strip()
    return parse_cpu_list(text) if text else None


def _pin_child(cpus: frozenset[int] | None):
    """A ``preexec_fn`` that moves the child onto ``cpus`` before it execs (None: no pinning)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wrk_threads(concurrency: int, cpus: frozenset[int] | None, cores: int | None = None) -> int:
    """wrk's threads. Unpinned on up to 4 cores: 1 (2 from 64 connections), as every core wrk takes is
    one the server lacks. Unpinned on more: a quarter of the cores (one thread moving 4 MB bodies both
    ways tops out near 5 GB/s, below what one GPU serves). Pinned: up to one per core it has, with at
    least 8 connections each."""
    if cpus is None:
        cores = cores or len(os.sched_getaffinity(0))
        if cores <= 4:
            return 1 if concurrency < 64 else 2
        return max(1, min(concurrency, cores // 4))
    return max(1, min(len(cpus), concurrency // 8))


def _run_wrk(url, body_path, content_type, header_length, concurrency, duration_s, timeout_s, tmp: Path) -> LoadResult:
    script = tmp / "post.lua"
    script.write_text(_WRK_LUA)
    env = dict(os.environ, LOADGEN_BODY=str(body_path), LOADGEN_CONTENT_TYPE=content_type, LOADGEN_HEADER_LENGTH=header_length)
    cpus = pinned_cpus()
    threads = wrk_threads(concurrency, cpus)
    cmd = [
        wrk_path() or "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s", "-s", str(script), url,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + timeout_s + 30,
                          preexec_fn=_pin_child(cpus))
    r = _marked_result(proc, "wrk")
    detail = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    # wrk counts a non-2xx answer as a completed request and as a 'status' error;
    # socket errors are not in 'requests'.
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=r["duration_us"] / 1e6,
        requests=r["requests"],
        errors=r["status"],
        p50_ms=r["p50_us"] / 1e3,
        p90_ms=r["p90_us"] / 1e3,
        p99_ms=r["p99_us"] / 1e3,
        mean_ms=r["mean_us"] / 1e3,
        error_detail=detail,
    )


def _run_python_subprocess(url, body_path, content_type, header_length, concurrency, duration_s, timeout_s) -> LoadResult:
    cmd = [
        sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--body-file", str(body_path),
        "--content-type", content_type, "--concurrency", str(concurrency), "--duration", str(duration_s),
        "--timeout", str(timeout_s),
    ]
    if header_length:
        cmd += ["--header-length", header_length]
    # From the checkout's root, so that `-m benchmarks.loadgen` finds this package in any environment
    # (PyTriton's has no install of the project).
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 60,
                          cwd=Path(__file__).resolve().parents[1], preexec_fn=_pin_child(pinned_cpus()))
    d = _marked_result(proc, "python load generator")
    d.pop("req_per_s", None)
    d.pop("rows_per_s", None)
    return LoadResult(**d)


def _marked_result(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON an engine printed after RESULT_MARK; raises naming ``what`` when it printed none or failed."""
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    return json.loads(line[len(RESULT_MARK):])


# ---- the asyncio engine (runs inside the separate process) ---------------------------
def _request_bytes(url: str, body: bytes, content_type: str, header_length: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
    ]
    if header_length:
        head.append(f"Inference-Header-Content-Length: {header_length}")
    return host, port, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = False
    for ln in lines[1:]:
        name, _, value = ln.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def drive(url: str, body: bytes, content_type: str, header_length: str, concurrency: int,
                duration_s: float, timeout_s: float) -> LoadResult:
    host, port, request = _request_bytes(url, body, content_type, header_length)
    latencies: list[float] = []
    errors = {"status": 0, "connect": 0, "read": 0, "timeout": 0}
    requests = 0
    started = time.perf_counter()
    deadline = started + duration_s

    async def one_connection() -> None:
        nonlocal requests
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.perf_counter() < deadline:
            if writer is None or reader is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    errors["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
            t0 = time.perf_counter()
            try:
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), timeout_s)
            except asyncio.TimeoutError:
                errors["timeout"] += 1
                writer.close()
                writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                errors["read"] += 1
                writer.close()
                writer = None
                continue
            requests += 1
            latencies.append(time.perf_counter() - t0)
            if not 200 <= status < 300:
                errors["status"] += 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = [x * 1e3 for x in latencies]
    return LoadResult(
        tool="python",
        concurrency=concurrency,
        duration_s=elapsed,
        requests=requests,
        errors=errors["status"],
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms) if ms else math.nan,
        error_detail={k: v for k, v in errors.items() if v},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop HTTP POST load (asyncio engine); prints one JSON line")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--header-length", default="", help="Inference-Header-Content-Length for binary KServe bodies")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except (ImportError, AttributeError):
        pass
    body = Path(args.body_file).read_bytes()
    result = runner(drive(args.url, body, args.content_type, args.header_length, args.concurrency,
                               args.duration, args.timeout))
    print(RESULT_MARK + json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
