"""The Triton part of the GPU benchmark (``benchmarks.gpu``): the same model behind Triton on the same GPU.

After the fleet part (its fleet torn down, the GPU free), PyTriton serves the big MLP with ONNX
Runtime's CUDA provider inside its Python callable (``benchmarks.phases.triton``: the fleet engine's
CUDA options, cuBLAS workspace ``:16:8``, no TF32), max batch = the largest bench batch, Triton's
dynamic batcher with a 500 us queue delay (the fleet's). The same load generator drives it with the
same bodies as ``fleet-http-binary`` (``encode_request(feeds, binary=True)``) at the same levels per
batch: rows ``triton-http-binary``. Each batch's first answer is decoded and compared with the bare
engine's output (rtol/atol 1e-3); a wrong or failed answer is an error in the result, not silence.
``vs_triton``: per batch and level, fleet-http-binary req/s over Triton's and both p99s (issue 19:
batch 1, c=64: fleet >= 1.2x Triton's req/s, p99 no worse).

PyTriton 0.7.0 pins numpy < 2, so it runs in its own environment: ``--triton-python PYTHON`` and
``--triton-pythonpath DIRS`` (put before PYTHONPATH for that process only; the checkout's root is
always added, for ``-m benchmarks.phases.triton``). On the GPU host, with the fleet's wheels in
/tmp/site and PyTriton's in the venv /tmp/triton-venv (``scripts/pack_triton_env.sh`` packs them, its
install.sh makes the venv):

    PYTHONPATH=/tmp/site:. python3 scripts/gpu_bench.py --batches 1,256 --levels 1:64/256:8 \\
        --systems fleet-http-binary --loadgen wrk --triton-python /tmp/triton-venv/bin/python3 \\
        --triton-pythonpath /tmp/triton-venv/lib/python3.12/site-packages:/tmp/site

Max batch (the fleet's and Triton's) is the largest of ``--batches``: keep 256 in it, or batch-1
requests have nothing to be batched into.

The venv's site-packages first: its numpy 1.26 (and protobuf 6) win there, onnxruntime-gpu comes from
/tmp/site. A venv, not a bare directory on PYTHONPATH: Triton's Python backend stub runs an isolated
interpreter (PYTHONPATH ignored) that finds numpy, zmq and pytriton only in the venv whose bin/ PyTriton
puts on its PATH, and PyTriton finds its own libraries only when installed in a site directory. Triton
(tritonserver and its Python backend stubs) runs in a process group of its own, ended on every
exit path of this module (SIGTERM included); run the bench under ``unshare --pid --fork
--mount-proc`` where possible, so that even a SIGKILL leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.net import free_port
from workers.kserve.client_codec import decode_response, encode_request

from benchmarks import loadgen
from benchmarks.common import REPO_ROOT, progress, stop_marked
from benchmarks.gpu_observe import observe

SYSTEM = "triton-http-binary"
FLEET_SYSTEM = "fleet-http-binary"
QUEUE_DELAY_US = 500  # the fleet's default dynamic batching delay
READY_TIMEOUT_S = 300
TARGET = {"batch": 1, "concurrency": 64, "req_per_s_ratio": 1.2}  # issue 19, item 3


def add_arguments(p) -> None:
    p.add_argument("--triton-python", help="python of an environment with nvidia-pytriton: after the fleet part, "
                   "measure Triton (PyTriton, ONNX Runtime CUDA inside) on the same GPU with the same load")
    p.add_argument("--triton-pythonpath", default="", help="directories put before PYTHONPATH for the Triton process "
                   "only, e.g. /tmp/triton-venv/lib/python3.12/site-packages:/tmp/site (the checkout's root is always added)")


def triton_env(pythonpath: str, marker: str, base: dict | None = None) -> dict[str, str]:
    """The Triton process's environment: ``pythonpath`` first, then the caller's PYTHONPATH, then the
    checkout's root; ``FLEET_BENCH_MARKER`` so every process it starts can be found and ended."""
    env = dict(os.environ if base is None else base)
    parts = [p for p in pythonpath.split(os.pathsep) if p]
    parts += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    parts.append(str(REPO_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["FLEET_BENCH_MARKER"] = marker
    env.pop(loadgen.CPUS_ENV, None)
    return env


@contextmanager
def pytriton_server(python: str, pythonpath: str, spec: dict, work: Path,
                    stop_grace_s: float = 60) -> Iterator[tuple[str, dict]]:
    """PyTriton serving ``spec`` (``benchmarks.phases.triton``) until the block ends: (base URL, its info).

    Started in a session of its own; on the way out (normally, on an exception, on SIGTERM) its stdin
    closes (PyTriton stops Triton), then whatever is left of its process group and of the processes
    carrying its marker is killed: no tritonserver outlives the bench."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "triton-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / "triton.log"
    marker = f"gpu-triton-{os.getpid()}-{secrets.token_hex(4)}"
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "benchmarks.phases.triton", str(spec_path)], cwd=REPO_ROOT,
                                env=triton_env(pythonpath, marker), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True)
    try:
        info = _wait_ready(proc, log_path, READY_TIMEOUT_S)
        yield f"http://127.0.0.1:{spec['ports']['http']}", info
    finally:
        _stop(proc, marker, stop_grace_s)
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> dict:
    """Lines of the Triton process until ``TRITON_READY``: its ``TRITON_INFO`` line, parsed."""
    assert proc.stdout is not None
    info: dict = {}
    deadline = time.monotonic() + timeout_s
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"PyTriton exited with {proc.wait()} before it was ready: {_tail(log_path)}")
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in (ln.decode(errors="replace").strip() for ln in lines):
                if line.startswith("TRITON_INFO "):
                    info = json.loads(line[len("TRITON_INFO "):])
                elif line == "TRITON_READY":
                    return info
    raise RuntimeError(f"PyTriton was not ready within {timeout_s:.0f} s: {_tail(log_path)}")


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(its log is empty)"
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, marker: str, grace_s: float) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()  # serve_until_stdin_closes: PyTriton stops Triton
        except OSError:
            pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # tritonserver and the stubs, if still there
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    left = stop_marked(marker, grace_s=5)  # any that left the group
    if left:
        progress(f"triton: ended {left} leftover process(es) of PyTriton")


def _check_answer(content: bytes, headers: dict, want) -> str | None:
    """None when Triton's answer holds ``want`` (the bare engine's output), else what is wrong."""
    import numpy as np

    try:
        lower = {k.lower(): v for k, v in headers.items()}
        _, arrays = decode_response(content, lower.get("inference-header-content-length"))
    except Exception as exc:  # noqa: BLE001 (any decode failure is a wrong answer)
        return f"undecodable answer: {type(exc).__name__}: {exc}: {content[:200]!r}"
    for name, expected in want.items():
        got = arrays.get(name)
        if got is None:
            return f"output {name!r} missing (got {sorted(arrays)})"
        got = np.asarray(got).reshape(expected.shape)
        if not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
            worst = float(np.max(np.abs(got - expected)))
            return f"output {name!r} differs from the bare engine's (max abs difference {worst:.3g})"
    return None


def reference_outputs(model_path: Path, batches: list[int], feeds_for, provider: str = "cuda") -> dict[int, dict]:
    """The bare engine's outputs (the fleet's engine class, CUDA, as ``bench_bare``) for each batch's feeds."""
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    with OnnxRuntimeEngine(model_path, provider=provider, device_id=0) as engine:
        return {b: engine.run(feeds_for(b)) for b in batches}


def _post(url: str, body: bytes, headers: dict) -> tuple[int, bytes, dict]:
    import requests

    r = requests.post(url, data=body, headers=headers, timeout=120)
    return r.status_code, r.content, dict(r.headers)


def bench_triton(model_path: Path, args, tool: str, work: Path, feeds_for, provider: str = "cuda") -> dict:
    """``{"rows": [...], "info": {...}}``, plus ``"wrong_answers"`` where Triton answered wrong.
    ``provider`` "cpu" only for tests on a machine without a GPU."""
    model = model_path.stem
    reference = reference_outputs(model_path, args.batches, feeds_for, provider)
    spec = {"models": [model], "provider": provider, "device_id": 0, "queue_delay_us": QUEUE_DELAY_US,
            "access_token": secrets.token_urlsafe(16),
            "ports": {"http": free_port(), "grpc": free_port(), "metrics": free_port()},
            "prepared": {"models": {model: {"onnx": str(model_path), "max_batch": max(args.batches)}}}}
    out: dict = {"rows": [], "info": {"python": args.triton_python, "pythonpath": args.triton_pythonpath,
                                      "max_batch": max(args.batches), "queue_delay_us": QUEUE_DELAY_US}}
    progress(f"triton: starting PyTriton ({args.triton_python}, ONNX Runtime {provider} inside, max batch "
             f"{max(args.batches)}, queue delay {QUEUE_DELAY_US} us)")
    t0 = time.monotonic()
    with pytriton_server(args.triton_python, args.triton_pythonpath, spec, work / "triton") as (base, info):
        out["info"].update(info, start_s=round(time.monotonic() - t0, 1))
        progress(f"triton: up in {out['info']['start_s']} s on {base} ({info})")
        url = f"{base}/v2/models/{model}/infer"
        for batch in args.batches:
            body, headers = encode_request(feeds_for(batch), binary=True)
            status, content, answer_headers = _post(url, body, headers)
            problem = (f"HTTP {status}: {content[:300]!r}" if status != 200
                       else _check_answer(content, answer_headers, reference[batch]))
            if problem:
                out.setdefault("wrong_answers", {})[f"batch {batch}"] = problem
                progress(f"triton: batch {batch}: wrong first answer, not measured: {problem}")
                continue
            levels = args.levels[batch]
            loadgen.run(url, body, headers, concurrency=max(levels), duration_s=2, tool=tool)  # warm-up
            for c in levels:
                with observe(False, args.duration) as observed:  # GPU utilization and CPU, as the fleet's rows
                    r = loadgen.run(url, body, headers, concurrency=c, duration_s=args.duration,
                                    rows_per_request=batch, tool=tool)
                row = {"system": SYSTEM, "variant": f"pytriton {info.get('pytriton', '?')}, onnxruntime "
                       f"{info.get('onnxruntime', '?')} {provider}, {r.tool}", "gpus": 1, "batch": batch, **r.to_dict(),
                       "observed": observed}
                out["rows"].append(row)
                progress(f"{SYSTEM:<18} gpus=1 batch={batch:<4} c={c:<3} {row['rows_per_s']:>10,.0f} rows/s  "
                         f"{row['req_per_s']:>9,.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                         f"errors {row['errors']}  GPU busy {observed.get('gpu_util_mean_pct', '?')} %")
    return out


def vs_triton(rows: list[dict]) -> list[dict]:
    """Per batch and level measured by both: fleet-http-binary (one GPU) req/s over Triton's, and both p99s."""
    def by_key(system: str) -> dict:
        return {(r["batch"], r["concurrency"]): r for r in rows if r["system"] == system and r.get("gpus", 1) == 1}

    fleet, triton = by_key(FLEET_SYSTEM), by_key(SYSTEM)
    out = []
    for key in sorted(fleet.keys() & triton.keys()):
        f, t = fleet[key], triton[key]
        ratio = f["req_per_s"] / t["req_per_s"] if t["req_per_s"] else None
        out.append({"batch": key[0], "concurrency": key[1], "fleet_req_per_s": f["req_per_s"],
                    "triton_req_per_s": t["req_per_s"], "req_per_s_ratio": round(ratio, 3) if ratio else None,
                    "fleet_p99_ms": f["p99_ms"], "triton_p99_ms": t["p99_ms"],
                    "p99_no_worse": f["p99_ms"] <= t["p99_ms"], "fleet_errors": f["errors"],
                    "triton_errors": t["errors"]})
    return out


def target_met(comparison: list[dict]) -> bool | None:
    """Issue 19's item 3 (batch 1, c=64: >= 1.2x Triton's req/s and p99 no worse); None if not measured."""
    hit = next((c for c in comparison if c["batch"] == TARGET["batch"] and c["concurrency"] == TARGET["concurrency"]),
               None)
    if hit is None or hit["req_per_s_ratio"] is None:
        return None
    return hit["req_per_s_ratio"] >= TARGET["req_per_s_ratio"] and hit["p99_no_worse"] and not hit["fleet_errors"]


def table(comparison: list[dict]) -> list[str]:
    lines = ["| batch | conc. | fleet-http-binary req/s | triton req/s | fleet / triton | fleet p99 ms | triton p99 ms "
             "| p99 no worse |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in comparison:
        ratio = f"{c['req_per_s_ratio']:.2f}x" if c["req_per_s_ratio"] is not None else "-"
        lines.append(f"| {c['batch']} | {c['concurrency']} | {c['fleet_req_per_s']:,.0f} | {c['triton_req_per_s']:,.0f} "
                     f"| {ratio} | {c['fleet_p99_ms']:.2f} | {c['triton_p99_ms']:.2f} | "
                     f"{'yes' if c['p99_no_worse'] else '**no**'} |")
    met = target_met(comparison)
    verdict = {True: "met", False: "**not met**", None: "not measured"}[met]
    lines.append(f"\nissue 19 (3): batch {TARGET['batch']}, c={TARGET['concurrency']}: fleet >= "
                 f"{TARGET['req_per_s_ratio']}x Triton's req/s, p99 no worse: {verdict}")
    return lines
