"""What the host and the GPU did while one GPU benchmark row ran: where a fleet path's time goes.

For each row it records the GPU's utilization (NVML, sampled every 50 ms: the share of time a
kernel was running), the CPU each of the fleet's processes used (percent of one core, from /proc),
the load generator's CPU (a child of this process), and, with ``profile=True``, py-spy's self-time
top and busy threads of the fleet's GPU worker and of the first in-cluster client actor. The numbers go into the row under ``observed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import cpu_seconds, processes_by_role
from benchmarks.phases.profile import collapsed_top, record_raw, samples

SAMPLE_S = 0.05


class _GpuUtilization:
    """NVML utilization of GPU 0 sampled on a thread; mean and share of samples at 90 % or more."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-util")

    def _run(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return  # no GPU here: nothing to sample
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.wait(SAMPLE_S):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        finally:
            pynvml.nvmlShutdown()

    def __enter__(self) -> "_GpuUtilization":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict:
        """Mean and quantiles: the window includes a client's start-up (processes importing), so the
        median and p90 say more of the steady state than the mean."""
        if not self.samples:
            return {}
        ordered = sorted(self.samples)
        return {"gpu_util_mean_pct": round(sum(ordered) / len(ordered), 1),
                "gpu_util_p50_pct": ordered[len(ordered) // 2], "gpu_util_p90_pct": ordered[int(len(ordered) * 0.9)]}


SPY_RATE = 100
# The GPU worker sampled only while a thread holds its GIL (--gil: the busy shares then add up to how
# much of the time the GIL was held, 100 % when Python is the limit), and the in-cluster clients' first actor.
SPIED = {"fleet worker": ["--gil"], "ray::ClientBench": []}


def _py_spy() -> Path | None:
    """py-spy beside this python, on PATH, or in a ``bin`` beside a PYTHONPATH entry (pip --target)."""
    places = [Path(sys.executable).parent] + [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    places += [Path(p) / "bin" for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return next((p / "py-spy" for p in places if (p / "py-spy").exists()), None)


def _spy(pid: int, seconds: float, extra: list[str]) -> tuple[Path, subprocess.Popen, float] | None:
    py_spy = _py_spy()
    if py_spy is None:
        return None
    duration = max(1, int(seconds))
    target = Path(tempfile.mkdtemp(prefix="gpu-spy-")) / f"{pid}.txt"
    return target, record_raw(py_spy, pid, duration, target, ("--threads", *extra), SPY_RATE), duration


def thread_busy(path: Path, duration_s: float) -> dict[str, float]:
    """Percent of one core each thread of a ``--threads`` raw profile was seen running (its name)."""
    busy: dict[str, int] = {}
    for stack, count in samples(path):
        head = stack.split(";", 1)[0]
        name = head.split(": ", 1)[-1] if ": " in head else head
        busy[name] = busy.get(name, 0) + count
    return {n: round(100.0 * c / (SPY_RATE * duration_s), 1) for n, c in sorted(busy.items(), key=lambda kv: -kv[1])[:12]}


def _collect(spy: tuple[Path, subprocess.Popen, float]) -> dict:
    target, proc, duration = spy
    try:
        proc.wait(duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not target.exists():
        return {"error": (proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else "no profile")}
    return {"top_self_pct": collapsed_top(target, 20), "thread_busy_pct_of_core": thread_busy(target, duration)}


@contextmanager
def observe(profile: bool, seconds: float, *, this_process: str | None = None) -> Iterator[dict]:
    """Yields a dict that holds, after the block, what the GPU and the fleet's processes did during it.
    ``this_process``: the block's work runs here too (the batch job in the bench's driver): it is
    counted, and spied, under that name."""
    out: dict = {}
    roles = processes_by_role(os.getpid())
    if this_process:
        roles[this_process] = [os.getpid()]
    procs = {pid: role for role, pids in roles.items() for pid in pids}
    before = {pid: cpu_seconds(pid) for pid in procs}
    spied = dict(SPIED, **({this_process: []} if this_process else {}))
    spies = {role: _spy(roles[role][0], seconds * 0.8, extra) for role, extra in spied.items()
             if profile and roles.get(role)}
    children = os.times()  # the load generator is a child of this process (it ends within the block)
    t0 = time.monotonic()
    with _GpuUtilization() as gpu:
        yield out
    wall = time.monotonic() - t0
    after_children = os.times()
    out.update(gpu.summary())
    out["loadgen_cpu_pct"] = round(100.0 * (after_children.children_user + after_children.children_system
                                            - children.children_user - children.children_system) / wall, 1)
    by_role: dict[str, float] = {}
    for pid, role in procs.items():
        after, start = cpu_seconds(pid), before.get(pid)
        if after is not None and start is not None:
            by_role[role] = by_role.get(role, 0.0) + 100.0 * (after - start) / wall
    out["cpu_pct_by_role"] = {r: round(v, 1) for r, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 1.0}
    out["py_spy"] = {role: _collect(spy) for role, spy in spies.items() if spy is not None}
