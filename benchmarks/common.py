"""What the benchmarks share: the models and their payloads, progress lines, small stats,
a local Ray and fleet for a phase process, and finding processes through /proc.

Runs in the project's environment (numpy, onnxruntime, cluster/). The Triton phase runs
in another environment and gets what it needs as files (model paths, request bodies)
written by ``prepare``. Nothing here imports Ray at module level: a process must set
Ray's and Serve's switches (``cluster.env``) before the first import of Ray, so the
helpers that need it import it once they are called.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.config import FleetConfig, load_config
from cluster.console import say
from cluster.env import apply_ray_env
from cluster.names import NAMESPACE, SERVE_APP_NAME
from cluster.net import free_port

from workers.cpus import usable_cpus

from benchmarks.loadgen import percentile
from benchmarks.serve_modes import direct_ingress_url, fleet_mode

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench-results"
CONFIG = REPO_ROOT / "configs" / "local.yaml"

_T0 = time.monotonic()


def progress(msg: str) -> None:
    """A progress line (cluster.console.say), tagged with the seconds since this process started."""
    say(f"[bench +{time.monotonic() - _T0:5.1f}s] {msg}")


@dataclass(frozen=True)
class BenchModel:
    name: str
    max_batch: int  # what the artifact is built with (configs/local.yaml agrees)
    request_rows: int  # rows per request in the HTTP phases
    note: str


MODELS = {
    "digits-mlp": BenchModel("digits-mlp", 256, 1, "tiny MLP, one row per request: overhead-bound"),
    "cnn-small": BenchModel("cnn-small", 64, 64, "small CNN at its max batch (64 x 3x64x64): compute-bound"),
}


def summarize_ms(latencies_s: list[float]) -> dict:
    """p50 / p90 / p99 / mean in ms of latencies given in seconds."""
    ms = [x * 1e3 for x in latencies_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": (sum(ms) / len(ms)) if ms else math.nan,
    }


def closed_loop_row(system: str, variant: str, batch: int, concurrency: int, latencies_s: list[float],
                    elapsed_s: float, **extra) -> dict:
    """A result row of a closed loop measured in-process (no load generator): every call succeeded."""
    req_s = len(latencies_s) / elapsed_s
    return {"system": system, "variant": variant, **extra, "batch": batch, "concurrency": concurrency,
            "requests": len(latencies_s), "errors": 0, "duration_s": elapsed_s, "req_per_s": req_s,
            "rows_per_s": req_s * batch, **summarize_ms(latencies_s)}


# ---- inputs and the work directory ----------------------------------------------------------
def model_inputs(model: str, rows: int):
    """The feeds a benchmark sends: real digits rows, or fixed random images for the CNN."""
    import numpy as np

    if model == "digits-mlp":
        from cluster.demo import digits_split

        X = digits_split()[1]
        return {"input": np.tile(X, (-(-rows // len(X)), 1))[:rows].astype(np.float32)}
    if model == "cnn-small":
        rng = np.random.default_rng(0)
        return {"input": rng.standard_normal((rows, 3, 64, 64)).astype(np.float32)}
    raise ValueError(f"unknown benchmark model {model!r}")


def prepare(workdir: Path, models: list[str]) -> dict:
    """Demo ONNX files, CPU artifacts in a repository, and the request bodies, under workdir.

    Idempotent (the build is cached by source sha256). Returns a manifest of paths
    that the phases (including the one in Triton's environment) read.
    """
    from cluster.buildfarm import build_locally, local_target
    from cluster.demo import make_demo_models
    from cluster.repository import Repository
    from workers.build import BuildRequest
    from workers.kserve.client_codec import encode_request
    from workers.manifest import sha256_file

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sources = make_demo_models(workdir / "models")
    repo_root = workdir / "repository"
    repo = Repository(repo_root)
    payloads = workdir / "payloads"
    payloads.mkdir(exist_ok=True)
    out: dict = {"repository": str(repo_root), "models": {}}
    for name in models:
        spec = MODELS[name]
        source = sources[name]
        request = BuildRequest(str(source), name, local_target(), max_batch=spec.max_batch)
        outcome = build_locally(repo, request, sha256_file(source), progress=io.StringIO())
        if not outcome.ok:
            raise RuntimeError(f"building {name} for the CPU failed: {outcome.error}")
        feeds = model_inputs(name, spec.request_rows)
        entry: dict = {"onnx": str(source), "max_batch": spec.max_batch, "request_rows": spec.request_rows, "bodies": {}}
        for protocol, binary in (("binary", True), ("json", False)):
            body, headers = encode_request(feeds, binary=binary)
            path = payloads / f"{name}-{protocol}.bin"
            path.write_bytes(body)
            entry["bodies"][protocol] = {"path": str(path), "headers": headers, "bytes": len(body)}
        out["models"][name] = entry
    (workdir / "prepared.json").write_text(json.dumps(out, indent=2))
    return out


def reference_outputs(onnx_path: str, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def wait_http(url: str, timeout_s: float, *, method: str = "GET", body: bytes | None = None,
              headers: dict | None = None) -> float:
    """Poll until ``url`` answers 2xx; returns the seconds waited."""
    import requests

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            r = requests.request(method, url, data=body, headers=headers or {}, timeout=10)
            if 200 <= r.status_code < 300:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)[:200]
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 2xx within {timeout_s:.0f} s ({last})")


# ---- a local Ray and fleet for one phase process ------------------------------------------------
def ray_start():
    """A fresh local Ray: ``address="local"`` never joins another user's `ray start` cluster."""
    apply_ray_env()  # a no-op when the orchestrator built the environment (serve_modes.phase_env)
    import ray

    ray.init(address="local", namespace=NAMESPACE, num_cpus=max(2, usable_cpus()), log_to_driver=False, include_dashboard=False,
             logging_level=logging.ERROR)
    return ray


def teardown_fleet(ray, spec: dict) -> None:
    """The fleet's own teardown (ingress, controller, workers), then Ray. With --quick only
    Ray's: ray.shutdown() ends this local instance and every process of it either way."""
    from cluster.deploy import teardown

    t0 = time.monotonic()
    if not spec.get("quick"):
        teardown()
    ray.shutdown()
    progress(f"torn down in {time.monotonic() - t0:.1f} s")


@dataclass(frozen=True)
class LocalFleet:
    config: FleetConfig
    deploy_s: float
    url: str  # where HTTP clients reach it (the ingress replica itself under direct ingress without the front door)
    mode: str  # fleet_mode(): the front door and the Serve mode


@contextmanager
def local_fleet(spec: dict) -> Iterator[LocalFleet]:
    """Ray, then the fleet on configs/local.yaml over the prepared repository; both torn down after.

    ``spec["front_door"]`` False runs it without its HAProxy front door (Serve on the port)."""
    ray = ray_start()
    from cluster.deploy import deploy  # imports Ray: after ray_start set its switches

    front = spec.get("front_door", True)
    try:
        config = load_config(str(CONFIG), repository=spec["prepared"]["repository"], port=free_port(),
                             grpc_port=free_port(), front_door=front, allow_client_shm=True,
                             **({"slots": spec["slots"]} if spec.get("slots") else {}))
        t0 = time.monotonic()
        deploy(config)
        deploy_s = time.monotonic() - t0
        url = f"http://127.0.0.1:{config.port}"
        direct = None if front else direct_ingress_url(SERVE_APP_NAME)
        if direct:
            progress(f"direct ingress: the ingress replica listens on {direct} (the head proxy stays on {url})")
        fleet = LocalFleet(config, deploy_s, direct or url, fleet_mode(front))
        progress(f"fleet [{fleet.mode}] deployed in {deploy_s:.1f} s at {fleet.url}")
        yield fleet
    finally:
        teardown_fleet(ray, spec)


# ---- processes, through /proc ------------------------------------------------------------------
def pids_with_marker(marker: str) -> list[int]:
    """The processes (other than this one) whose environment holds FLEET_BENCH_MARKER=marker."""
    needle = f"FLEET_BENCH_MARKER={marker}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_marked(marker: str, grace_s: float = 10.0) -> int:
    """End the processes (and only those) that carry our marker in their environment."""
    pids = pids_with_marker(marker)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pids_with_marker(marker):
        time.sleep(0.2)
    _signal_all(pids_with_marker(marker), signal.SIGKILL)
    return len(pids)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command (which may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None once it is gone)."""
    fields = _stat(pid)
    if not fields:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


_ROLES = (("FleetIngress", "ingress replica"), ("ProxyActor", "serve proxy"), ("HAProxy", "serve proxy"),
          ("FleetWorker", "fleet worker"), ("FleetController", "fleet controller"),
          ("FrontDoorActor", "front door actor"), ("ServeController", "serve controller"), ("haproxy", "haproxy"))


def role_of(pid: int) -> str:
    """What a process of our Ray instance is, from its title (Ray titles actors 'ray::Class...')."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    for needle, role in _ROLES:
        if needle in title:
            return role
    if title.startswith("ray::"):
        return title.split()[0]
    return comm


def processes_by_role(root: int) -> dict[str, list[int]]:
    """The descendants of ``root`` grouped by ``role_of``."""
    out: dict[str, list[int]] = {}
    for pid in descendants(root):
        out.setdefault(role_of(pid), []).append(pid)
    return out


def write_tensor_rows(path: Path, chunks: "Iterator", tensors: str = "lists", dictionary: bool = False) -> Path:
    """A Parquet file of one tensor column, ``input``: each numpy chunk a row group, its rows as
    fixed-size lists of numbers or as bytes (``cluster/tensor_columns.py``): what the batch job reads.
    ``dictionary``: dictionary-encode the column (chunks that repeat a few rows then take little disk;
    a reader still gets every row in full)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.tensor_columns import tensor_column

    writer = None
    try:
        for chunk in chunks:
            field, column = tensor_column("input", chunk, tensors)
            table = pa.Table.from_arrays([column], schema=pa.schema([field]))
            writer = writer or pq.ParquetWriter(path, table.schema, use_dictionary=dictionary, compression="none",
                                                dictionary_pagesize_limit=1 << 30)
            writer.write_table(table, row_group_size=len(chunk))
    finally:
        if writer is not None:
            writer.close()
    return path
