"""The worker's own HTTP endpoint: KServe v2 inference straight into its batcher.

The fleet's front door (HAProxy, ``cluster/frontdoor.py``) sends
``POST /v2/models/{model}[/versions/{v}]/infer`` here when this worker holds the
model's engine, so a request crosses one Python process instead of three (Serve
proxy or ingress replica, then a Ray actor call). Everything else (metadata, the
repository API, a model this worker does not hold) goes to the Ray Serve ingress;
a request that lands here for an engine evicted a moment ago is passed on to it.

The server is a small HTTP/1.1 protocol on httptools (the parser uvicorn uses)
running on its own event loop (uvloop when present) in a thread of the worker process. Requests join the engine's dynamic batcher without blocking the
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
from workers.errors import FleetError, NotReady, PayloadTooLarge
from workers.manifest import validate_model_ref
from workers.protocol import (
    HEADER_LENGTH,
    InferRequest,
    check_bearer,
    check_declared_length,
    encode_response,
    read_infer_request,
    shm_feeds,
    write_shm_outputs,
)

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
    """The HTTP server (a thread with its own event loop) for one FleetWorker."""

    def __init__(self, worker: "FleetWorker", options: HttpOptions) -> None:
        self.worker = worker
        self.options = options
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
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
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.options.host, self.options.port))
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        started = threading.Event()

        def serve() -> None:
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._server = loop.run_until_complete(loop.create_server(lambda: _Connection(self), sock=sock))
            started.set()
            loop.run_forever()
            self._server.close()
            if self._session is not None:
                loop.run_until_complete(self._session.close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="worker-http", daemon=True)
        self._thread.start()
        started.wait(10)
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- requests ----------------------------------------------------------------
    async def handle(self, request: "_Request") -> tuple[int, list, bytes]:
        method, path = request.method, request.path
        if path == "/v2/health/live" and method in ("GET", "HEAD"):
            return _json(200, {"live": True})
        target = parse_infer_path(path)
        if target is None or method != "POST":
            return _json(404, {"error": f"no route for {method} {path} on a worker"})
        return await self._infer(target[0], target[1], request)

    async def _infer(self, model: str, version: str | None, request: "_Request") -> tuple[int, list, bytes]:
        opts = self.options
        headers = request.headers
        started = time.perf_counter()
        worker = self.worker
        key = None
        try:
            validate_model_ref(model, version)
            if request.too_large:
                check_declared_length(str(request.size), opts.max_request_bytes)
            if opts.auth_token and opts.auth_inference:
                check_bearer(headers.get("authorization"), opts.auth_token)
            key = worker.engine_for(model, version)
            if key is None:  # evicted or never here: the ingress loads it where it fits
                return await self._pass_on(request)
            reject_non_finite = model in opts.reject_non_finite
            parsed = read_infer_request(request.body, headers.get("content-encoding"), headers.get(HEADER_LENGTH),
                                        limit=opts.max_request_bytes, reject_non_finite=reject_non_finite)
            regions = parsed.regions()
            if regions - worker.shm.names():  # another host's region (or none): the ingress knows who has it
                return await self._pass_on(request)
            with worker.shm.using(regions):
                feeds = shm_feeds(parsed, worker.shm, reject_non_finite)
                outputs, manifest = await self._run(key, feeds, parsed if regions else None)
                if regions:  # copying megabytes into the region: off the event loop
                    outputs = await asyncio.get_running_loop().run_in_executor(
                        None, write_shm_outputs, parsed, outputs, worker.shm)
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

    async def _run(self, key: str, feeds: dict, request: "InferRequest | None" = None):
        """One request through the engine's batcher, awaited without blocking the loop (the
        request, when its outputs go to shared memory: the engine may write them there)."""
        worker = self.worker
        loaded = worker.begin_request(key)
        ok = False
        try:
            check_feeds(loaded.manifest.inputs, feeds)
            if loaded.batcher is not None and batch_rows(feeds) <= loaded.manifest.max_batch:
                out = worker.shm_targets(loaded, request, feeds)
                outputs = await asyncio.wrap_future(loaded.batcher.submit_nowait(feeds, out))
            else:  # larger than max batch (split into chunks), or an engine without batching
                outputs = await asyncio.get_running_loop().run_in_executor(None, loaded.run, feeds)
            ok = True
            return outputs, loaded.manifest
        finally:
            worker.end_request(key, ok)

    async def _pass_on(self, request: "_Request") -> tuple[int, list, bytes]:
        """Forward a request for an engine this worker does not hold to the ingress."""
        if not self.options.fallback_url:
            raise NotReady(f"worker {self.worker.spec.worker_id} does not hold that model and has no ingress to ask")
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        url = self.options.fallback_url.rstrip("/") + request.target
        forward = {k: v for k, v in request.headers.items() if k in _FORWARD_REQUEST}
        try:
            async with self._session.post(url, data=request.body, headers=forward,
                                          skip_auto_headers=("Content-Type",)) as resp:
                content = await resp.read()
                out = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE]
                return resp.status, out, content
        except aiohttp.ClientError as exc:
            raise NotReady(f"could not reach the ingress at {self.options.fallback_url}: {exc}") from None


@dataclass
class _Request:
    method: str
    target: str  # path and query, as sent
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool
    size: int  # body bytes received (more than body when too_large)
    too_large: bool


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 413: b"Payload Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class _Connection(asyncio.Protocol):
    """HTTP/1.1 on one connection (httptools parser): keep-alive, pipelining in order,
    chunked or sized bodies, ``Expect: 100-continue``. A body is kept whole in memory up to
    the request limit (no flow-control round trips per 64 KiB, as ASGI servers make)."""

    def __init__(self, server: WorkerHttpServer) -> None:
        import httptools

        self.server = server
        self.limit = server.options.max_request_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: list[_Request] = []
        self.busy = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        import httptools

        if self.transport is None:  # answered and closing (e.g. 413): ignore the rest
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._write(*_json(400, {"error": "protocol upgrades are not supported"}), keep_alive=False)
        except httptools.HttpParserError as exc:
            self._write(*_json(400, {"error": f"malformed HTTP request: {exc}"}), keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        declared = dict(self.header_list).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:  # answer now, do not read it
            self._write(*_error(PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of "
                                                f"{self.limit} bytes")), keep_alive=False)
            return
        if any(n == b"expect" and v.lower() == b"100-continue" for n, v in self.header_list):
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= self.limit:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        target = self.url.decode("latin-1")
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.pending.append(_Request(
            method=self.parser.get_method().decode(), target=target, path=target.split("?", 1)[0],
            headers={n.decode("latin-1"): v.decode("latin-1") for n, v in self.header_list},
            body=body, keep_alive=self.parser.should_keep_alive(), size=self.size, too_large=self.size > self.limit))
        self._reset()
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """Answer queued requests one at a time, in order (HTTP/1.1 pipelining)."""
        try:
            while self.pending and self.transport is not None:
                request = self.pending.pop(0)
                try:
                    status, headers, body = await self.server.handle(request)
                except Exception as exc:  # never leave a client without an answer
                    log.exception("internal error")
                    status, headers, body = _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
                self._write(status, headers, b"" if request.method == "HEAD" else body, request.keep_alive,
                            length=len(body))
        finally:
            self.busy = False

    def _write(self, status: int, headers: list, body: bytes, keep_alive: bool, length: int | None = None) -> None:
        if self.transport is None:
            return
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))]
        head += [b"%s: %s\r\n" % (k, v) for k, v in headers]
        head.append(b"content-length: %d\r\n" % (len(body) if length is None else length))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head) + body if len(body) < 65536 else b"".join(head))
        if len(body) >= 65536:
            self.transport.write(body)  # large answers: no extra copy to join them
        if not keep_alive:
            self.transport.close()
            self.transport = None
