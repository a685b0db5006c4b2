"""How each phase runs: its processes (one per Serve mode where modes matter), their specs and limits.

A ``Plan`` is a list of ``Run``s; ``benchmarks.runner`` starts each in a process of its
own (``python -m benchmarks.phases``) and puts the results together as ``collect`` says.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cluster.net import free_port
from workers.cpus import usable_cpus

from benchmarks.common import REPO_ROOT, prepare
from benchmarks.httpbench import check_saved_answers
from benchmarks.serve_modes import SERVE_MODES, shipped_mode

PHASE_TIMEOUT_S = 420


@dataclass
class Run:
    """One phase process."""

    phase: str  # the module that runs (benchmarks.phases name)
    spec: dict
    mode: str | None = None  # Ray Serve mode (serve_modes.SERVE_MODES); None: as the fleet ships
    label: str | None = None  # which of several runs of a phase this is, in the result document
    timeout_s: float = PHASE_TIMEOUT_S
    python: str = sys.executable


@dataclass
class Plan:
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None  # why the phase cannot run here
    # "single": the one run's result is the phase's; "modes": the rows of every run, and one
    # entry per run in "runs"; "profiles": each run's info under its label in "profiles"
    collect: str = "single"
    check: Callable[[dict], dict] | None = None  # the single run's result -> what the phase reports


@dataclass
class Context:
    quick: bool
    models: list[str]
    duration_s: float
    tool: str  # the load generator
    prepared: dict
    workdir: Path
    triton_python: str | None = None
    slots: int = 0  # the fleet's slots (0: the fleet config's)

    def base(self) -> dict:
        """What every phase's spec holds."""
        return {"prepared": self.prepared, "models": self.models, "duration_s": self.duration_s,
                "warmup_s": 1 if self.quick else 2, "loadgen": self.tool, "quick": self.quick, "slots": self.slots}


def levels_for(phase: str, quick: bool) -> dict:
    """Concurrency levels per model (and per model/protocol) for each HTTP phase.

    cnn-small as JSON is a 15 MB body (about a second a request): full runs only. With 8 cores or
    more (say a GPU host's, ``--pin``), the fleet's CPU worker has as many slots: 16 requests in
    flight keep them busy while others are read and answered.
    """
    digits = [1, 32] if quick else [1, 8, 32]
    cnn = [8] if quick else [1, 8]
    cnn_json = [] if quick else [2]
    if phase == "fleet-http":
        cnn_fleet = cnn + ([16] if usable_cpus() >= 8 else [])
        return {"digits-mlp": digits, "cnn-small/binary": cnn_fleet, "cnn-small/json": cnn_json}
    if phase == "fleet-levers":
        return {"digits-mlp/binary": digits, "digits-mlp/json": [], "cnn-small/binary": [8], "cnn-small/json": []}
    if phase == "fleet-client":
        return {"digits-mlp": digits, "cnn-small": [8]}
    if phase == "naive-serve":  # JSON only
        return {"digits-mlp": digits, "cnn-small": cnn_json}
    if phase == "triton":
        return {"digits-mlp/binary": digits, "digits-mlp/json": [32] if quick else digits, "cnn-small/binary": cnn,
                "cnn-small/json": cnn_json}
    return {}


def plan_for(phase: str, ctx: Context) -> Plan:
    return _PLANS[phase](phase, ctx)


def _single(phase: str, ctx: Context, timeout_s: float = PHASE_TIMEOUT_S, **spec) -> Plan:
    return Plan([Run(phase, dict(ctx.base(), **spec), timeout_s=timeout_s)])


def _bare(phase: str, ctx: Context) -> Plan:
    return _single(phase, ctx, 120, duration_s=1.0 if ctx.quick else 3.0)


def _router(phase: str, ctx: Context) -> Plan:
    return _single(phase, ctx, 300, workers=1000, n_models=200, decisions=5000 if ctx.quick else 20000)


def _cold_start(phase: str, ctx: Context) -> Plan:
    prepared = ctx.prepared if "digits-mlp" in ctx.prepared["models"] else prepare(ctx.workdir, ["digits-mlp"])
    return _single(phase, ctx, 300, prepared=prepared)


def _fleet_client(phase: str, ctx: Context) -> Plan:
    return _single(phase, ctx, levels=levels_for(phase, ctx.quick))


def _profile(phase: str, ctx: Context) -> Plan:
    """The fleet as shipped (front door), and without it in the Serve mode it shipped before."""
    spec = dict(ctx.base(), duration_s=min(6.0, max(3.0, ctx.duration_s)), profile_dir=str(ctx.workdir / "profile"))
    runs = [Run(phase, dict(spec, front_door=True), None, "front door", 300),
            Run(phase, dict(spec, front_door=False), "throughput-optimized+haproxy",
                "no front door, throughput-optimized+haproxy", 300)]
    return Plan(runs, collect="profiles")


def _by_mode(phase: str, ctx: Context) -> Plan:
    """The HTTP phases, once per Serve mode (None: the fleet as shipped, cluster.env decides)."""
    modes: list[str | None] = {"fleet-http": [None], "fleet-levers": list(SERVE_MODES),
                               "naive-serve": ["classic-proxy", "throughput-optimized+haproxy"]}[phase]
    shipped = shipped_mode()
    runs = [Run(phase, dict(ctx.base(), levels=levels_for(phase, ctx.quick), shipped=mode is None), mode,
                mode or f"as shipped ({shipped})") for mode in modes]
    return Plan(runs, collect="modes")


def _triton(phase: str, ctx: Context) -> Plan:
    python, reason = _triton_python(ctx.triton_python)
    if python is None:
        return Plan(skipped=reason)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    spec = dict(ctx.base(), levels=levels_for(phase, ctx.quick), answers_dir=str(ctx.workdir / "answers"), ports=ports)
    return Plan([Run(phase, spec, python=python)], check=partial(_checked_triton, prepared=ctx.prepared))


def _perf_analyzer(phase: str, ctx: Context) -> Plan:
    """perf_analyzer against the fleet (HTTP, gRPC) and, with a PyTriton environment, against Triton."""
    binary = Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer"
    if not binary.is_file():
        installed = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "install_perf_analyzer.py")],
                                   capture_output=True, text=True)
        if installed.returncode != 0:
            return Plan(skipped=f"perf_analyzer could not be installed: {installed.stderr.strip()[-500:]}")
    python, _ = _triton_python(ctx.triton_python)
    prepared = ctx.prepared if "digits-mlp" in ctx.prepared["models"] else prepare(ctx.workdir, ["digits-mlp"])
    spec = dict(ctx.base(), prepared=prepared, models=["digits-mlp"], model="digits-mlp", levels=[1, 8, 32],
                window_s=2.0 if ctx.quick else 4.0, perf_analyzer=str(binary), triton_python=python,
                ports={"http": free_port(), "grpc": free_port(), "metrics": free_port()})
    return Plan([Run(phase, spec, timeout_s=900)])


def _triton_python(chosen: str | None) -> tuple[str | None, str]:
    """The python of an environment with PyTriton, or None and why there is none."""
    if chosen:
        return chosen, ""
    probe = subprocess.run([sys.executable, "-c", "import pytriton"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable, ""
    return None, ("nvidia-pytriton is not installed here; it pins numpy<2, so install it in its own venv "
                  "(python -m venv V && V/bin/pip install nvidia-pytriton==0.7.0 onnxruntime) and pass "
                  "--triton-python V/bin/python")


def _checked_triton(res: dict, prepared: dict) -> dict:
    """Triton's answers, saved by its phase, checked against ONNX Runtime here (with the project's codec)."""
    wrong = check_saved_answers(res.get("answers", {}), prepared)
    res["verified"] = not wrong
    if wrong:
        res["wrong_answers"] = wrong
    if not res.get("incidents"):
        res.pop("incidents", None)
    return res


_PLANS: dict[str, Callable[[str, Context], Plan]] = {
    "bare": _bare, "fleet-http": _by_mode, "fleet-levers": _by_mode, "fleet-client": _fleet_client,
    "naive-serve": _by_mode, "triton": _triton, "perf-analyzer": _perf_analyzer, "router": _router, "cold-start": _cold_start, "profile": _profile,
}
