"""The worker's own HTTP endpoint: KServe v2 inference straight into its batcher.

The fleet's front door (HAProxy, ``cluster/frontdoor.py``) sends
``POST /v2/models/{model}[/versions/{v}]/infer`` here when this worker holds the
model's engine, so a request crosses one Python process instead of three (Serve
proxy or ingress replica, then a Ray actor call). Everything else (metadata, the
repository API, a model this worker does not hold) goes to the Ray Serve ingress;
a request that lands here for an engine evicted a moment ago is passed on to it.

The server runs uvicorn (httptools) on its own event loop in a thread of the
worker process. Requests join the engine's dynamic batcher without blocking the
loop; the batch runs on the batcher's threads (ONNX Runtime releases the GIL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.batcher import batch_rows
from workers.engines.base import check_feeds
from workers.errors import FleetError, InvalidInput, NotReady
from workers.manifest import check_name
from workers.protocol import HEADER_LENGTH, check_bearer, check_declared_length, encode_response, read_infer_request

if TYPE_CHECKING:
    from workers.actor import FleetWorker

log = logging.getLogger("forward-fleet.worker-http")

# Headers passed on when a request goes on to the ingress (and back).
_FORWARD_REQUEST = ("content-type", "content-encoding", HEADER_LENGTH, "authorization")
_FORWARD_RESPONSE = ("content-type", HEADER_LENGTH, "x-fleet-error")


@dataclass(frozen=True)
class HttpOptions:
    """How a worker serves HTTP; decided by the controller from the fleet config."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    auth_token: str | None = None
    auth_inference: bool = False
    max_request_bytes: int = 64 << 20
    reject_non_finite: frozenset[str] = field(default_factory=frozenset)  # model names
    fallback_url: str | None = None  # the Serve ingress, for engines not loaded here

    @classmethod
    def from_dict(cls, d: dict) -> "HttpOptions":
        return cls(
            host=str(d.get("host", "127.0.0.1")),
            port=int(d.get("port", 0)),
            auth_token=d.get("auth_token") or None,
            auth_inference=bool(d.get("auth_inference", False)),
            max_request_bytes=int(d.get("max_request_bytes", 64 << 20)),
            reject_non_finite=frozenset(d.get("reject_non_finite", ())),
            fallback_url=d.get("fallback_url") or None,
        )


def parse_infer_path(path: str) -> tuple[str, str | None] | None:
    """'/v2/models/m/infer' -> ('m', None); '/v2/models/m/versions/3/infer' -> ('m', '3')."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "infer":
        return parts[3], None
    if len(parts) == 7 and parts[:3] == ["", "v2", "models"] and parts[4] == "versions" and parts[6] == "infer":
        return parts[3], parts[5]
    return None


def _json(status: int, body: dict, extra: list[tuple[bytes, bytes]] = ()) -> tuple[int, list, bytes]:
    data = json.dumps(body).encode()
    return status, [(b"content-type", b"application/json"), *extra], data


def _error(exc: FleetError) -> tuple[int, list, bytes]:
    return _json(exc.http_status, {"error": exc.message}, [(b"x-fleet-error", type(exc).__name__.encode())])


class WorkerHttpServer:
    """ASGI app + uvicorn server thread for one FleetWorker."""

    def __init__(self, worker: "FleetWorker", options: HttpOptions) -> None:
        self.worker = worker
        self.options = options
        self.port = 0
        self._server = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session = None  # aiohttp session for passing requests on, made on first use
        caps = worker.caps
        self._served_by = {
            "fleet_worker": worker.spec.worker_id,
            "fleet_device": caps.device.name,
            "compute_capability": caps.device.compute_capability or "cpu",
            "simulated": caps.device.simulated,
        }

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> int:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.options.host, self.options.port))
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self, http="httptools", loop="none", lifespan="off", access_log=False, log_level="warning",
            timeout_keep_alive=300,  # HAProxy keeps its server connections open for reuse
        )
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def serve() -> None:
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop.call_soon(started.set)
            loop.run_until_complete(self._server.serve(sockets=[sock]))
            if self._session is not None:
                loop.run_until_complete(self._session.close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="worker-http", daemon=True)
        self._thread.start()
        started.wait(10)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- ASGI ------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/v2/health/live" and method in ("GET", "HEAD"):
            status, headers, body = _json(200, {"live": True})
        else:
            target = parse_infer_path(path)
            if target is None or method != "POST":
                status, headers, body = _json(404, {"error": f"no route for {method} {path} on a worker"})
            else:
                status, headers, body = await self._infer(target[0], target[1], scope, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                check_declared_length(str(size), limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(self, model: str, version: str | None, scope, receive) -> tuple[int, list, bytes]:
        opts = self.options
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        started = time.perf_counter()
        worker = self.worker
        key = None
        try:
            check_name("model name", model)
            if version is not None:
                check_name("model version", version)
        except ValueError as exc:
            return _error(InvalidInput(str(exc)))
        try:
            if opts.auth_token and opts.auth_inference:
                check_bearer(headers.get("authorization"), opts.auth_token)
            key = worker.engine_for(model, version)
            if key is None:  # evicted or never here: the ingress loads it where it fits
                return await self._pass_on(scope, headers, receive)
            check_declared_length(headers.get("content-length"), opts.max_request_bytes)
            body = await self._read_body(receive, opts.max_request_bytes)
            parsed = read_infer_request(body, headers.get("content-encoding"), headers.get(HEADER_LENGTH),
                                        limit=opts.max_request_bytes, reject_non_finite=model in opts.reject_non_finite)
            outputs, manifest = await self._run(key, parsed.inputs)
            content, out_headers = encode_response(
                model, manifest.version, outputs, parsed, dict(self._served_by, fleet_target=manifest.target.key()))
        except FleetError as exc:
            if key is not None:
                worker.request_stats.record(model, version, time.perf_counter() - started, type(exc).__name__)
            return _error(exc)
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            log.exception("internal error serving %s", model)
            if key is not None:
                worker.request_stats.record(model, version, time.perf_counter() - started, type(exc).__name__)
            return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        worker.request_stats.record(model, manifest.version, time.perf_counter() - started)
        return 200, [(k.lower().encode(), str(v).encode()) for k, v in out_headers.items()], content

    async def _run(self, key: str, feeds: dict):
        """One request through the engine's batcher, awaited without blocking the loop."""
        worker = self.worker
        loaded = worker.begin_request(key)
        ok = False
        try:
            check_feeds(loaded.manifest.inputs, feeds)
            if loaded.batcher is not None and batch_rows(feeds) <= loaded.manifest.max_batch:
                outputs = await asyncio.wrap_future(loaded.batcher.submit_nowait(feeds))
            else:  # larger than max batch (split into chunks), or an engine without batching
                outputs = await asyncio.get_running_loop().run_in_executor(None, loaded.run, feeds)
            ok = True
            return outputs, loaded.manifest
        finally:
            worker.end_request(key, ok)

    async def _pass_on(self, scope, headers: dict, receive) -> tuple[int, list, bytes]:
        """Forward a request for an engine this worker does not hold to the ingress."""
        if not self.options.fallback_url:
            raise NotReady(f"worker {self.worker.spec.worker_id} does not hold that model and has no ingress to ask")
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        body = await self._read_body(receive, self.options.max_request_bytes)
        url = self.options.fallback_url.rstrip("/") + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        forward = {k: v for k, v in headers.items() if k in _FORWARD_REQUEST}
        try:
            async with self._session.post(url, data=body, headers=forward, skip_auto_headers=("Content-Type",)) as resp:
                content = await resp.read()
                out = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE]
                return resp.status, out, content
        except aiohttp.ClientError as exc:
            raise NotReady(f"could not reach the ingress at {self.options.fallback_url}: {exc}") from None
