"""profile: CPU per process and py-spy of the hot processes during a digits-mlp binary run.

The orchestrator runs it with the front door (as shipped) and without it (``spec["front_door"]``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import loadgen
from benchmarks.common import cpu_seconds, local_fleet, machine_busy, processes_by_role, progress
from benchmarks.httpbench import verify_endpoint
from benchmarks.serve_modes import serve_mode

SPIED = ("ingress replica", "serve proxy", "fleet worker", "fleet controller")
# Inclusive shares reported per py-spy profile: label -> what a stack must contain.
NEEDLES = {
    "decode_request": "decode_request", "encode_response": "encode_response",
    "DataPlane.serve": "serve (cluster/dataplane.py", "fastapi/starlette": "starlette",
    "ray serve replica": "serve/_private/replica.py", "ray serve proxy": "serve/_private/proxy.py",
    "worker infer": "infer (workers/actor.py", "runner": "workers/runner.py", "onnxruntime run": "run (onnxruntime",
    "batcher": "workers/batcher.py", "serialization": "serializ", "asyncio event loop": "asyncio/base_events.py",
}


def run(spec: dict) -> dict:
    out: dict = {}
    with local_fleet(spec) as fleet:
        url = f"{fleet.url}/v2/models/digits-mlp/infer"
        out["serve_mode"] = fleet.mode
        verify_endpoint(url, "digits-mlp", "binary", spec["prepared"])
        body_info = spec["prepared"]["models"]["digits-mlp"]["bodies"]["binary"]
        body = Path(body_info["path"]).read_bytes()
        loadgen.run(url, body, body_info["headers"], concurrency=32, duration_s=2, tool=spec["loadgen"])
        # Every process of this Ray instance descends from this driver (gcs, raylet, workers).
        roles = processes_by_role(os.getpid())
        duration = spec["duration_s"]
        spies = _start_spies(spec, roles, duration)
        procs = {pid: role for role, pids in roles.items() for pid in pids}
        before = {pid: cpu_seconds(pid) for pid in procs}
        busy0, total0 = machine_busy()
        t0 = time.monotonic()
        load = loadgen.run(url, body, body_info["headers"], concurrency=32, duration_s=duration, tool=spec["loadgen"])
        wall = time.monotonic() - t0
        busy1, total1 = machine_busy()
        out["cpu_percent_of_one_core"] = _cpu_shares(procs, before, wall)
        out["cpu_seconds_per_request_ms"] = {k: round(v / 100.0 * wall / max(1, load.ok_requests) * 1e3, 3)
                                             for k, v in out["cpu_percent_of_one_core"].items()}
        out["machine_busy_percent"] = round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1)
        out["load"] = load.to_dict()
        out["py_spy_overhead_note"] = "py-spy samples at 100 Hz while this runs; it costs some CPU itself"
        out["py_spy"] = _collect_spies(spies, duration)
        progress(f"profile: {load.req_per_s:.0f} req/s; CPU % of one core: {out['cpu_percent_of_one_core']}")
    return {"rows": [], "info": out}


def _cpu_shares(procs: dict[int, str], before: dict[int, float | None], wall: float) -> dict[str, float]:
    """Percent of one core each process used during ``wall`` seconds (1% and more), busiest first."""
    cpu = {}
    for pid, role in procs.items():
        after, start = cpu_seconds(pid), before.get(pid)
        if after is not None and start is not None:
            share = 100.0 * (after - start) / wall
            if share >= 1.0:
                cpu[f"{role} (pid {pid})"] = round(share, 1)
    return dict(sorted(cpu.items(), key=lambda kv: -kv[1]))


def _start_spies(spec: dict, roles: dict[str, list[int]], duration: float) -> dict[str, tuple[Path, subprocess.Popen]]:
    """py-spy (when installed beside this python) on the first process of each role in SPIED."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not spec.get("py_spy", True) or not py_spy.exists():
        return {}
    spy_dir = Path(spec.get("profile_dir") or tempfile.mkdtemp(prefix="ffb-spy-")) / serve_mode()
    spy_dir.mkdir(parents=True, exist_ok=True)
    spies = {}
    for role in SPIED:
        for pid in roles.get(role, [])[:1]:
            target = spy_dir / f"{role.replace(' ', '-')}.txt"
            spies[role] = (target, record_raw(py_spy, pid, int(duration), target))
    return spies


def record_raw(py_spy: Path, pid: int, duration_s: int, target: Path, extra: tuple[str, ...] = (),
               rate: int = 100) -> subprocess.Popen:
    """py-spy recording ``pid`` for ``duration_s`` into ``target`` as a 'raw' (collapsed) profile, without
    pausing it; ``extra``: more of py-spy's options (--threads, --gil)."""
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(rate),
                             "--format", "raw", "--output", str(target), "--nonblocking", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _collect_spies(spies: dict[str, tuple[Path, subprocess.Popen]], duration: float) -> dict[str, dict]:
    profiles = {}
    for role, (target, proc) in spies.items():
        try:
            proc.wait(duration + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if target.exists():
            profiles[role] = {"raw": str(target), "top_self": collapsed_top(target), "inclusive": inclusive(target, NEEDLES)}
        else:
            profiles[role] = {"error": (proc.stderr.read().decode(errors="replace") if proc.stderr else "")[-400:]}
    return profiles


def samples(path: Path):
    """(stack, count) of each line of a py-spy 'raw' (collapsed) profile."""
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            yield stack, int(count)


def collapsed_top(path: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the leaf frames of a py-spy 'raw' (collapsed) profile."""
    leaf: Counter = Counter()
    for stack, count in samples(path):
        leaf[stack.split(";")[-1]] += count
    total = sum(leaf.values())
    return [(frame, round(100.0 * c / total, 1)) for frame, c in leaf.most_common(n)] if total else []


def inclusive(path: Path, needles: dict[str, str]) -> dict[str, float]:
    """Inclusive share of samples whose stack contains each needle."""
    counts = dict.fromkeys(needles, 0)
    total = 0
    for stack, count in samples(path):
        total += count
        for label, needle in needles.items():
            if needle in stack:
                counts[label] += count
    return {k: round(100.0 * v / total, 1) for k, v in counts.items()} if total else {}
