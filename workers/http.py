"""The worker's own HTTP endpoint: KServe v2 inference straight into its runner.

The fleet's front door (HAProxy) sends ``POST /v2/models/{model}[/versions/{v}]/infer``
here when this worker holds the model's engine, so a request crosses one Python
process instead of three (Serve proxy or ingress replica, then a Ray actor call).
Everything else goes to the Ray Serve ingress. A request for an engine this worker
does not hold (evicted a moment ago) goes to ``on_miss``, which the fleet supplies
(it passes the request on to the ingress); the worker itself knows nothing of it.

The server runs its own event loop (uvloop when present) in a thread of the worker process;
requests join the engine's dynamic batcher without blocking the loop, and the batch runs on
the batcher's threads (ONNX Runtime releases the GIL). ``HttpOptions.loops`` runs more loops,
all accepting on one listening socket. A loop spends about a millisecond of kernel time
reading each 4 MB body and another writing it, and reads run without the GIL, so more loops
read large bodies in parallel. On one H200 host, once the loop's own GIL use under large bodies was
cut (``httpwire``: bodies read into reused buffers, large answers written with ``os.writev``), four
loops took 4 MB bodies from 0.32-0.35x to 0.78-0.81x of bare ONNX Runtime; batch-1 requests ran at
3,897 requests/s against one loop's 7,097 in a run a few minutes earlier (docs/gpu-results.md,
2026-12-05): the loops and the batcher's threads hand the GIL to each other more often. So one loop
by default; four for a fleet of large bodies (``worker_http_loops``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

from workers.errors import FleetError
from workers.grpc_server import MODEL_INFER
from workers.kserve.codec import InferRequest
from workers.kserve.handler import HttpAnswer, InferPolicy, Served, error_answer, handle_infer, json_answer, served_by
from workers.httpwire import Handler, HttpConnection, RawHttpRequest
from workers.loopthread import LoopThread
from workers.runner import EngineRunner
from workers.stats import RequestStats

MissHandler = Handler  # an HTTP request this worker cannot serve, passed on


@dataclass(frozen=True)
class HttpOptions:
    """How a worker serves HTTP; decided by the controller from the fleet config."""

    host: str | None = "127.0.0.1"  # None: the fleet picks (its node's own address; loopback on the head)
    port: int = 0  # 0: any free port
    policy: InferPolicy = field(default_factory=InferPolicy)
    loops: int = 1  # event loop threads (see the module's docstring before raising it)


def parse_infer_path(path: str) -> tuple[str, str | None] | None:
    """'/v2/models/m/infer' -> ('m', None); '/v2/models/m/versions/3/infer' -> ('m', '3')."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "infer":
        return parts[3], None
    if len(parts) == 7 and parts[:3] == ["", "v2", "models"] and parts[4] == "versions" and parts[6] == "infer":
        return parts[3], parts[5]
    return None


class WorkerHttpServer:
    """The HTTP server (threads with an event loop each, one listening socket) in front of one EngineRunner."""

    def __init__(self, runner: EngineRunner, options: HttpOptions, stats: RequestStats,
                 on_miss: MissHandler | None = None) -> None:
        self.runner = runner
        self.options = options
        self.stats = stats
        self.on_miss = on_miss
        self.grpc: Handler | None = None  # gRPC ModelInfer over HTTP/1.1 (workers/grpc_http1.py), once gRPC is on
        self.port = 0
        self.active = 0  # inference requests in this server now (a draining fleet waits for none)
        self._active_lock = threading.Lock()  # the loops count from their own threads
        self._loops = [LoopThread("worker-http" + (f"-{i}" if i else ""), fast=True)
                       for i in range(max(1, options.loops))]

    @property
    def address(self) -> tuple[str, int]:
        return self.options.host, self.port

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.options.host, self.options.port))
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        limit = self.options.policy.max_request_bytes
        # Each loop accepts on its own descriptor of the one listening socket (the kernel gives each
        # connection to one of them), so closing one loop's server leaves the others' open.
        for loop_thread in self._loops:
            self._start_loop(loop_thread, sock.dup(), limit)
        sock.close()
        return self.port

    def _start_loop(self, loop_thread: LoopThread, sock: socket.socket, limit: int) -> None:
        servers: list[asyncio.AbstractServer] = []

        async def setup() -> None:
            loop = asyncio.get_running_loop()
            servers.append(await loop.create_server(lambda: HttpConnection(self.handle, limit), sock=sock))

        async def teardown() -> None:
            for server in servers:
                server.close()
            closer = getattr(self.on_miss, "aclose", None)
            if closer is not None:
                await closer()  # this loop's own session, where the handler keeps one per loop

        loop_thread.start(setup, teardown)

    def stop(self) -> None:
        for loop_thread in self._loops:
            loop_thread.stop()

    # ---- requests ----------------------------------------------------------------
    async def handle(self, request: RawHttpRequest) -> HttpAnswer:
        method, path = request.method, request.path
        if path == "/v2/health/live" and method in ("GET", "HEAD"):
            if self.runner.out_of_service:  # HAProxy's check takes this worker out of every route
                return json_answer(503, {"live": False, "error": self.runner.out_of_service})
            return json_answer(200, {"live": True})
        target = parse_infer_path(path)
        grpc = self.grpc if path == MODEL_INFER else None
        if (target is None and grpc is None) or method != "POST":
            return json_answer(404, {"error": f"no route for {method} {path} on a worker"})
        with self._active_lock:
            self.active += 1
        try:
            if grpc is not None:
                return await grpc(request)
            assert target is not None
            return await self._infer(*target, request)
        finally:
            with self._active_lock:
                self.active -= 1

    async def _infer(self, model: str, version: str | None, request: RawHttpRequest) -> HttpAnswer:
        try:  # the token first: on another host this endpoint is reachable from the network
            self.options.policy.admit(request.headers, request.size)
        except FleetError as exc:
            return error_answer(exc)
        on_miss = self.on_miss
        if on_miss is not None and (self.runner.out_of_service or self.runner.engine_key(model, version) is None):
            return await on_miss(request)  # not here: no point decoding what the ingress decodes again
        return await handle_infer(
            model, version, request.body, request.headers, policy=self.options.policy, serve=self._serve,
            stats=self.stats, body_size=request.size, on_miss=(lambda: on_miss(request)) if on_miss else None)

    async def _serve(self, model: str, version: str | None, request: InferRequest) -> Served:
        result = await self.runner.submit_async(request, model, version)
        manifest = result.manifest
        return Served(manifest.version, result.outputs,
                      served_by(self.runner.worker_id, self.runner.device, manifest.target.key()))
