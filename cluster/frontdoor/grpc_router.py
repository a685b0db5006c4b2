"""The gRPC router: what HAProxy cannot do on the fleet's gRPC port (``inference.GRPCInferenceService``).

HAProxy takes the fleet's gRPC port and sends ``ModelInfer`` for a model some worker
holds straight to that worker (``routes.py``: it reads the model's name out of the
buffered body). Everything else comes here, beside HAProxy in the front door's actor
(on loopback), as the rest of HTTP goes to the ingress:

- ``ModelInfer`` that HAProxy could not route (no worker holds the model, a body larger
  than HAProxy's buffer, a worker's miss passed back): reads only fields 1 and 2 of the
  raw request (``model_name_of``), picks
  a worker that holds the model from the routes the controller pushes (least in flight),
  and forwards the raw bytes over a generic channel to that worker's own gRPC endpoint
  (``workers/grpc_server.py``, told by ``x-fleet-routed`` not to pass a miss back), whose
  answer (or status) goes back as it came. No worker holds the model: the router asks the
  controller to load it (``load``: after the token check, as the HTTP ingress does) and
  routes by the placement. A worker gone, or an engine evicted a moment ago, costs another
  attempt.
- ``ModelStreamInfer``: each request of the stream is routed as ``ModelInfer``; answers go
  back as they finish (per-request errors in ``error_message``, as Triton's).
- Every other call: the ingress over HTTP (``grpc_gateway``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from workers.errors import FleetError, NotReady
from workers.grpc_server import MODEL_INFER, ROUTED_HEADER, SERVICE, abort, channel_options
from workers.kserve.grpc_codec import model_name_of
from workers.kserve.handler import ERROR_TYPE_HEADER, InferPolicy
from workers.manifest import validate_model_ref

from cluster.frontdoor.grpc_gateway import IngressGateway
from cluster.frontdoor.routes import GRPC_MISS_HEADER, Route
from cluster.inventory import Placement

log = logging.getLogger("forward-fleet.grpc-router")

MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
ATTEMPTS = 3
TIMEOUT_S = 300.0
LoadFn = Callable[[str, "str | None"], Awaitable[Placement]]


@dataclass(frozen=True)
class GrpcFront:
    """Where the fleet serves gRPC (HAProxy's bind) and its inference policy (the token rule for loads on a miss)."""

    bind: tuple[str, int]
    policy: InferPolicy = field(default_factory=InferPolicy)
    router_host: str = "127.0.0.1"  # the router itself, beside HAProxy (and where workers send their misses)
    router_port: int = 0  # 0: any free port


def _length_delimited(number: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (a message or a string), to wrap a stream's answers."""
    size, prefix = len(payload), bytearray([(number << 3) | 2])
    while True:
        byte, size = size & 0x7F, size >> 7
        prefix.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(prefix) + payload


def _forwarded(metadata) -> tuple[tuple[str, str], ...]:
    """The caller's metadata that goes on to the worker (not gRPC's own, not the miss mark), marked as routed."""
    kept = tuple((k, v) for k, v in metadata
                 if not k.startswith(("grpc-", ":")) and k not in ("user-agent", "te", GRPC_MISS_HEADER, ROUTED_HEADER))
    return (*kept, (ROUTED_HEADER, "1"))


def _worker_went_away(err: grpc.aio.AioRpcError) -> tuple[bool, bool]:
    """(retry elsewhere, the worker itself is gone) for a worker's failed answer."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False, False
    kind = dict(err.trailing_metadata() or ()).get(ERROR_TYPE_HEADER)
    if kind == "EngineNotHere":
        return True, False
    if kind == "DeviceFailed":  # alive, but its GPU computes no more: as good as gone
        return True, True
    return kind is None, kind is None  # no type: the connection failed, not the worker's own answer


class GrpcRouter:
    def __init__(self, front: GrpcFront, ingress_url: str, load: LoadFn) -> None:
        self.front = front
        self.gateway = IngressGateway(ingress_url)
        self._load = load
        self._table: dict[tuple[str, str], list[str]] = {}  # (model, version) -> worker ids holding it
        self._addresses: dict[str, str] = {}  # worker id -> "host:port" of its gRPC endpoint
        self._in_flight: dict[str, int] = defaultdict(int)
        self._stubs: dict[str, Callable] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._server: grpc.aio.Server | None = None
        self.port = 0

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> int:
        server = grpc.aio.server(options=channel_options(self.front.policy.max_request_bytes))
        handlers = dict(self.gateway.handlers())
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)  # raw bytes both ways
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port(f"{self.front.router_host}:{self.front.router_port}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=2)
        for channel in self._channels:
            await channel.close()
        await self.gateway.close()

    def set_routes(self, routes: list[Route]) -> None:
        """The controller's routes (the workers' gRPC ports in them); applies at once."""
        table: dict[tuple[str, str], list[str]] = {}
        for route in routes:
            held = [s.name for s in route.servers if s.grpc_port]
            for s in route.servers:
                if s.grpc_port:
                    self._addresses[s.name] = f"{s.host}:{s.grpc_port}"
            table[(route.model, route.version)] = held
            if route.latest:  # the unversioned requests (a route of its own, "", when defaults differ)
                table[(route.model, "")] = held
        self._table = table

    def set_addresses(self, addresses: dict[str, tuple[str, int]]) -> None:
        """Every worker's gRPC endpoint, holding the model or not (a load on a miss routes by worker id)."""
        self._addresses.update({w: f"{h}:{p}" for w, (h, p) in addresses.items()})

    # ---- routing ------------------------------------------------------------------
    def _pick(self, candidates: list[str], avoid: set[str]) -> str | None:
        usable = [w for w in candidates if w not in avoid and w in self._addresses]
        return min(usable, key=lambda w: self._in_flight[w]) if usable else None

    def _holders(self, model: str, version: str | None) -> list[str]:
        return self._table.get((model, version or ""), [])

    def _stub(self, worker_id: str) -> Callable:
        address = self._addresses[worker_id]
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options(-1))
            self._channels.append(channel)
            stub = self._stubs[address] = channel.unary_unary(MODEL_INFER)  # raw bytes both ways
        return stub

    async def forward(self, raw: bytes, metadata) -> bytes:
        """One ModelInfer: to a holder of the model, loading it on a miss; the worker's answer as bytes."""
        model, version = model_name_of(raw)
        validate_model_ref(model, version or None)
        version = version or None
        avoid: set[str] = set()
        last: grpc.aio.AioRpcError | None = None
        policy = self.front.policy
        if policy.auth_token and not policy.auth_inference:  # workers want the token; the fleet's port does not
            metadata = (*((k, v) for k, v in metadata if k != "authorization"),
                        ("authorization", f"Bearer {policy.auth_token}"))
        for _ in range(ATTEMPTS):
            worker = self._pick(self._holders(model, version), avoid)
            if worker is None:
                self.front.policy.admit({k: v for k, v in metadata})  # the token, before anything loads
                placement = await self._load(model, version)
                worker = self._pick(placement.workers, avoid) or self._pick(placement.workers, set())
                if worker is None:
                    raise NotReady(f"model '{model}' is loaded on workers that serve no gRPC "
                                   f"({', '.join(placement.workers)})")
            self._in_flight[worker] += 1
            try:
                return await self._stub(worker)(raw, metadata=metadata, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                retry, gone = _worker_went_away(err)
                if not retry:
                    raise
                last = err
                avoid.add(worker)
                if not gone:  # evicted there: the routes are behind; load it (again) on the next attempt
                    self._table[(model, version or "")] = []
            finally:
                self._in_flight[worker] -= 1
        assert last is not None
        raise last

    # ---- calls -------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self.forward(raw, _forwarded(context.invocation_metadata()))
        except grpc.aio.AioRpcError as err:  # the worker's own answer, as it came
            await context.abort(err.code(), err.details() or "",
                                trailing_metadata=tuple(err.trailing_metadata() or ()))
        except Exception as exc:
            if not isinstance(exc, FleetError):
                log.exception("internal error routing a gRPC request")
            await abort(context, exc)
        raise AssertionError("unreachable: abort raises")

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        """Each request routed as ModelInfer; answers as they finish (ModelStreamInferResponse, raw)."""
        metadata = _forwarded(context.invocation_metadata())
        answers: asyncio.Queue = asyncio.Queue()

        async def one(raw: bytes) -> None:
            try:
                answer = _length_delimited(2, await self.forward(raw, metadata))
            except grpc.aio.AioRpcError as err:
                answer = _length_delimited(1, (err.details() or str(err.code())).encode())
            except FleetError as exc:
                answer = _length_delimited(1, exc.message.encode())
            except Exception as exc:  # a bug: say so in the stream, and keep it open
                log.exception("internal error routing a gRPC stream request")
                answer = _length_delimited(1, f"internal error: {type(exc).__name__}: {exc}".encode())
            await answers.put(answer)

        async def feed() -> None:
            tasks = [asyncio.ensure_future(one(raw)) async for raw in requests]
            await asyncio.gather(*tasks)
            await answers.put(None)

        feeder = asyncio.ensure_future(feed())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            feeder.cancel()
