"""cold-start: `fleet up --demo` in a fresh directory, to the first good inference over HTTP.

The demo ONNX sources are copied in (a user has their model already); the repository,
Ray, the controller, the workers and Serve all start from nothing. Ray runs under its
own RAY_TMPDIR with fresh ports, so it never touches another Ray on this host, and it
is stopped by process id afterwards (`fleet down` would run `ray stop --force`, which
stops every Ray on the host).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
import yaml

from cluster.env import ray_env
from cluster.net import free_port

from benchmarks.common import CONFIG, progress, stop_marked
from benchmarks.httpbench import check_answer

# The fleet's own teardown, from a process of its own connected to the cold-started Ray.
_TEARDOWN = ("import sys; from cluster.env import apply_ray_env; apply_ray_env(); "
             "from cluster import deploy, nodes; nodes.connect(sys.argv[1]); deploy.teardown(); nodes.disconnect()")


def run(spec: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ffb-", dir="/tmp"))
    marker = uuid.uuid4().hex
    info: dict = {"dir": str(tmp)}
    try:
        cfg_path, port, ray_port = _fresh_directory(tmp, spec["prepared"])
        env = dict(ray_env(), RAY_TMPDIR=str(tmp / "r"), FLEET_BENCH_MARKER=marker)
        env.pop("RAY_ADDRESS", None)
        t_first, t_up, info["stages"] = _up_to_first_answer(cfg_path, port, tmp, env, spec)
        progress(f"cold start: first good inference at {t_first:.1f} s, fleet up returned at {t_up:.1f} s")
        t1 = time.monotonic()
        down = subprocess.run([sys.executable, "-c", _TEARDOWN, f"127.0.0.1:{ray_port}"], env=env,
                              capture_output=True, text=True, timeout=120)
        info["teardown_rc"] = down.returncode
        row = {"system": "cold-start", "variant": "fleet up --demo (fresh repository, fresh Ray)",
               "fleet_up_s": t_up, "first_inference_s": t_first, "teardown_s": time.monotonic() - t1,
               "first_inference_after_fleet_up_s": max(t_first, t_up)}
        return {"rows": [row], "info": info}
    finally:
        info["stopped_processes"] = stop_marked(marker)
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_directory(tmp: Path, prepared: dict) -> tuple[Path, int, int]:
    """A config with fresh ports and repository, and the ONNX sources, in ``tmp``: (config, port, Ray's port)."""
    port, ray_port, dash_port = free_port(), free_port(), free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config.update(port=port, grpc_port=free_port(), ray_port=ray_port, dashboard_port=dash_port, repository=str(tmp / "repository"))
    cfg_path = tmp / "fleet.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    (tmp / "models").mkdir()
    (tmp / "r").mkdir()
    for model, info in prepared["models"].items():
        shutil.copy(info["onnx"], tmp / "models" / f"{model}.onnx")
    return cfg_path, port, ray_port


def _up_to_first_answer(cfg_path: Path, port: int, cwd: Path, env: dict, spec: dict):
    """Start `fleet up --demo` and poll from the start (the first good answer may come before it
    exits). Returns (seconds to the first good answer, seconds until it exited, its output lines)."""
    prepared = spec["prepared"]
    body_info = prepared["models"]["digits-mlp"]["bodies"]["binary"]
    body = Path(body_info["path"]).read_bytes()
    url = f"http://127.0.0.1:{port}/v2/models/digits-mlp/infer"
    fleet_cli = str(Path(sys.executable).with_name("fleet"))
    t0 = time.monotonic()
    proc = subprocess.Popen([fleet_cli, "up", "--config", str(cfg_path), "--port", str(port), "--demo"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_stages, args=(proc, t0, stages), daemon=True)
    reader.start()
    t_first = t_up = None
    last_error = None
    timeout_s = spec.get("timeout_s", 240)
    while time.monotonic() - t0 < timeout_s and (t_first is None or t_up is None):
        if t_up is None and proc.poll() is not None:
            t_up = time.monotonic() - t0
            if proc.returncode != 0:
                reader.join(5)
                raise RuntimeError(f"fleet up exited {proc.returncode}: {[s for _, s in stages][-10:]}")
        if t_first is None:
            try:
                r = requests.post(url, data=body, headers=body_info["headers"], timeout=5)
                if r.status_code == 200 and check_answer("digits-mlp", r.content, r.headers, prepared) is None:
                    t_first = time.monotonic() - t0
                else:
                    last_error = f"HTTP {r.status_code}"
            except requests.RequestException as exc:
                last_error = str(exc)[:200]
        time.sleep(0.05)
    reader.join(5)
    if t_first is None or t_up is None:
        proc.kill()
        raise RuntimeError(f"no good inference within {timeout_s} s ({last_error})")
    return t_first, t_up, stages


def _read_stages(proc: subprocess.Popen, t0: float, stages: list) -> None:
    for line in proc.stdout or ():
        if line.strip():
            stages.append((round(time.monotonic() - t0, 2), line.rstrip()[:160]))
