"""Keeps the head's GCS process running: started again, as it was, when it dies.

With GCS fault tolerance the GCS reloads its tables from Redis when it starts, and raylets
and workers wait ``gcs_fault_tolerance.reconnect_timeout_s`` for it; but `ray start` does
not restart it (KubeRay restarts the whole head pod instead). ``fleet up`` runs this keeper
beside a head it starts with ``gcs_fault_tolerance.restart``: it reads the running
``gcs_server``'s command line and environment once, watches the process, and after
``--delay`` seconds starts the same command again. It exits when the head's raylet is gone
(``fleet down``, ``ray stop``), so a stopped fleet stays stopped.

    python -m cluster.gcs_keeper --port 6379 [--delay 1] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.2
STATE_DIR = Path(tempfile.gettempdir()) / "forward-fleet"


def keeper_pid_file(port: int) -> Path:
    return STATE_DIR / f"gcs-keeper-{port}.pid"


def keeper_log_file(port: int) -> Path:
    return STATE_DIR / f"gcs-keeper-{port}.log"


@dataclass(frozen=True)
class GcsProcess:
    pid: int
    argv: list[str]
    environ: dict[str, str]
    cwd: str


def _read(pid: int, name: str) -> bytes | None:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    stat = _read(pid, "stat")
    if stat is None:
        return False
    return stat.rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")  # a zombie is dead


def _argv(pid: int) -> list[str]:
    raw = _read(pid, "cmdline") or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_gcs(port: int) -> GcsProcess | None:
    """The gcs_server process serving ``port`` on this host, or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _argv(pid)
        if argv and Path(argv[0]).name == "gcs_server" and f"--gcs_server_port={port}" in argv and _alive(pid):
            environ = dict(kv.split("=", 1) for kv in (_read(pid, "environ") or b"").decode(errors="replace").split("\0")
                           if "=" in kv)
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = "/"
            return GcsProcess(pid, argv, environ, cwd)
    return None


def raylet_alive(session_name: str) -> bool:
    """Whether a raylet of this Ray session still runs on this host."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _argv(int(entry.name))
            if argv and Path(argv[0]).name == "raylet" and any(session_name in a for a in argv) and _alive(int(entry.name)):
                return True
    return False


def _session(argv: list[str]) -> str:
    for arg in argv:
        if arg.startswith("--session-name="):
            return arg.split("=", 1)[1]
    raise SystemExit("gcs_keeper: the gcs_server command line names no --session-name")


def _say(log, text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=log, flush=True)


def keep(port: int, delay_s: float, log, find_timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + find_timeout_s
    gcs = find_gcs(port)
    while gcs is None:
        if time.monotonic() > deadline:
            _say(log, f"no gcs_server on port {port} within {find_timeout_s:.0f} s; nothing to keep")
            return 1
        time.sleep(POLL_S)
        gcs = find_gcs(port)
    session = _session(gcs.argv)
    _say(log, f"keeping gcs_server pid {gcs.pid} (port {port}, {session}); restarts {delay_s:g} s after it dies")
    child: subprocess.Popen | None = None
    pid = gcs.pid
    while True:
        time.sleep(POLL_S)
        if (child.poll() is None) if child is not None else _alive(pid):
            continue
        if not raylet_alive(session):
            _say(log, "the head's raylet is gone (fleet down): the GCS stays down; exiting")
            return 0
        _say(log, f"gcs_server pid {pid} died; starting it again in {delay_s:g} s")
        time.sleep(delay_s)
        if not raylet_alive(session):
            _say(log, "the head's raylet is gone (fleet down): the GCS stays down; exiting")
            return 0
        child = subprocess.Popen(gcs.argv, env=gcs.environ, cwd=gcs.cwd, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pid = child.pid
        _say(log, f"gcs_server started again: pid {pid}")


def stop_keepers() -> list[int]:
    """Stop every keeper `fleet up` started on this host (before `ray stop`, so none restarts the GCS)."""
    stopped = []
    for pid_file in STATE_DIR.glob("gcs-keeper-*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            if _alive(pid) and "cluster.gcs_keeper" in " ".join(_argv(pid)):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)
    return stopped


def start_keeper(port: int, delay_s: float) -> Path:
    """Start a detached keeper for the GCS on ``port``; returns its log file."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log = keeper_log_file(port)
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.gcs_keeper", "--port", str(port), "--delay", str(delay_s),
                                 "--log", str(log)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=dict(os.environ))
    keeper_pid_file(port).write_text(str(proc.pid))
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.gcs_keeper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the GCS port of the head (ray_port)")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between a death and the restart")
    parser.add_argument("--log", help="append to this file (default: stderr)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.log:
        with open(args.log, "a") as log:
            return keep(args.port, args.delay, log)
    return keep(args.port, args.delay, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
