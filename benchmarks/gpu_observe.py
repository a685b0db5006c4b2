"""What the host and the GPU did while one GPU benchmark row ran: where a fleet path's time goes.

For each row it records the GPU's utilization (NVML, sampled every 50 ms: the share of time a
kernel was running), the CPU each of the fleet's processes used (percent of one core, from /proc),
and, with ``profile=True``, py-spy's self-time top of the fleet's GPU worker (py-spy beside this
python, as the GPU host's wheels install it). The numbers go into the row under ``observed``.
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
from benchmarks.phases.profile import collapsed_top

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
        if not self.samples:
            return {}
        return {"gpu_util_mean_pct": round(sum(self.samples) / len(self.samples), 1),
                "gpu_util_ge90_share": round(sum(s >= 90 for s in self.samples) / len(self.samples), 3)}


def _spy(pid: int, seconds: float) -> tuple[Path, subprocess.Popen] | None:
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        found = [Path(p) / "py-spy" for p in os.environ.get("PATH", "").split(os.pathsep)]
        py_spy = next((p for p in found if p.exists()), py_spy)
    if not py_spy.exists():
        return None
    target = Path(tempfile.mkdtemp(prefix="gpu-spy-")) / f"worker-{pid}.txt"
    proc = subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "100", "--format", "raw", "--output", str(target), "--nonblocking", "--threads"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return target, proc


@contextmanager
def observe(profile: bool, seconds: float) -> Iterator[dict]:
    """Yields a dict that holds, after the block, what the GPU and the fleet's processes did during it."""
    out: dict = {}
    procs = {pid: role for role, pids in processes_by_role(os.getpid()).items() for pid in pids}
    before = {pid: cpu_seconds(pid) for pid in procs}
    workers = [pid for pid, role in procs.items() if role == "fleet worker"]
    spy = _spy(workers[0], seconds * 0.8) if profile and workers else None
    t0 = time.monotonic()
    with _GpuUtilization() as gpu:
        yield out
    wall = time.monotonic() - t0
    out.update(gpu.summary())
    by_role: dict[str, float] = {}
    for pid, role in procs.items():
        after, start = cpu_seconds(pid), before.get(pid)
        if after is not None and start is not None:
            by_role[role] = by_role.get(role, 0.0) + 100.0 * (after - start) / wall
    out["cpu_pct_by_role"] = {r: round(v, 1) for r, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 1.0}
    if spy is not None:
        target, proc = spy
        try:
            proc.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out["worker_py_spy_top_self"] = collapsed_top(target, 20) if target.exists() else \
            (proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else "no profile")
