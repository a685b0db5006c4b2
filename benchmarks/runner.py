"""Run a phase's plan: each run in a process of its own, fully torn down before the next.

A phase process is ``python -m benchmarks.phases PHASE SPEC.json`` started from the
checkout's root in a session of its own (so a timeout ends it and everything it
started), with the environment ``serve_modes.phase_env`` builds for its Serve mode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, progress
from benchmarks.phases import RESULT_MARK
from benchmarks.plans import Context, Plan, Run, plan_for
from benchmarks.serve_modes import phase_env


def run_phase(name: str, ctx: Context, retries: int = 1) -> dict:
    """The phase's entry of the result document: rows, runs, status ("ok", "partial", "skipped",
    "wrong answers" or "error"), seconds. A failing phase is reported, never raised."""
    t0 = time.monotonic()
    out: dict = {"rows": [], "runs": []}
    try:
        plan = plan_for(name, ctx)
        if plan.skipped:
            out.update(status="skipped", reason=plan.skipped)
        else:
            _collect(plan, out, retries)
            out["status"] = _status(out)
    except Exception as exc:  # noqa: BLE001 (report and go on with the next phase)
        progress(f"phase {name} failed: {exc}")
        out.update(status="error", error=str(exc))
    out["seconds"] = time.monotonic() - t0
    if not out["runs"]:
        out.pop("runs")
    return out


def _collect(plan: Plan, out: dict, retries: int) -> None:
    if plan.collect == "single":
        res = run_process(plan.runs[0])
        out.update(plan.check(res) if plan.check else res)
        return
    for run in plan.runs:
        try:  # one run failing must not hide the others
            res = _with_retries(run, retries)
        except Exception as exc:  # noqa: BLE001
            progress(f"{run.phase} [{run.label}] failed: {exc}")
            out["runs"].append({"mode": run.label, "status": "error", "error": str(exc)})
            continue
        if plan.collect == "profiles":
            out.setdefault("profiles", {})[run.label] = res.get("info", {})
        else:
            out["rows"] += res.get("rows", [])
            out["runs"].append({"mode": run.label, "status": "ok", **res.get("info", {})})
    if not out["rows"] and not out.get("profiles"):
        raise RuntimeError("; ".join(r.get("error", "") for r in out["runs"]) or "no results")


def _with_retries(run: Run, retries: int) -> dict:
    try:
        return run_process(run)
    except RuntimeError as exc:
        if retries < 1:
            raise
        progress(f"{run.phase} [{run.label}] failed ({exc}); retrying once")
        res = run_process(run)
        res.setdefault("info", {})["first_attempt_error"] = str(exc)
        return res


def _status(out: dict) -> str:
    if not out.get("verified", True):
        return "wrong answers"
    if out.get("incidents") or any(r.get("status") == "error" for r in out["runs"]):
        return "partial"
    return "ok"


def run_process(run: Run) -> dict:
    """Start the phase process, wait for it (``run.timeout_s`` at most) and return its result."""
    scratch = Path(tempfile.mkdtemp(prefix="ffb-", dir="/tmp"))  # short: HAProxy's unix sockets live here
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-spec-", delete=False) as f:
        json.dump(run.spec, f)
        spec_path = f.name
    try:
        proc = subprocess.Popen([run.python, "-m", "benchmarks.phases", run.phase, spec_path], stdout=subprocess.PIPE,
                                stderr=None, text=True, env=phase_env(run.mode, scratch), cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=run.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the phase process and what it started (its own session)
            proc.communicate()
            raise RuntimeError(f"timed out after {run.timeout_s:.0f} s") from None
        line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"exited {proc.returncode} without a result")
        return json.loads(line[len(RESULT_MARK):])
    finally:
        os.unlink(spec_path)
        shutil.rmtree(scratch, ignore_errors=True)
