"""The worker's own KServe v2 gRPC endpoint: ``ModelInfer`` straight into its runner.

The fleet's gRPC router sends a ``ModelInferRequest`` here when this worker holds the
model's engine; HAProxy on the gRPC port sends it to the worker's HTTP endpoint instead,
over HTTP/1.1 (``workers/grpc_http1.py``), and both end in ``answer``: one hop, as over
HTTP. The same ``run_infer`` as HTTP does the checks, the token rule (gRPC metadata
``authorization``) and the statistics; errors become gRPC status codes through the one
table (``FleetError.grpc_status``), with the error's type in trailing metadata
(``x-fleet-error``). A request for an engine this worker does not hold (evicted a moment
ago) goes to ``on_miss``, which the fleet supplies (it passes the request on to its gRPC
router, which loads the model where a budget allows); a request the router itself sent
(metadata ``x-fleet-routed``) answers UNAVAILABLE with type ``EngineNotHere`` instead, and
the router tries again.

grpc.aio on its own event loop, in a thread of the worker process (ONNX Runtime runs on
the batcher's threads and releases the GIL), as the HTTP endpoint does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from workers.errors import DeviceFailed, EngineNotHere, FleetError, InvalidInput
from workers.kserve.grpc_codec import grpc_response, read_grpc_request
from workers.kserve.handler import ERROR_TYPE_HEADER, InferPolicy, Served, run_infer, served_by
from workers.kserve.codec import InferRequest
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.loopthread import LoopThread
from workers.runner import EngineRunner
from workers.stats import RequestStats

log = logging.getLogger("forward-fleet.worker-grpc")

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
ROUTED_HEADER = "x-fleet-routed"  # sent by the fleet's gRPC router: a miss here goes back to it as an error
Metadata = tuple[tuple[str, str], ...]
MissFn = Callable[[bytes, Metadata], Awaitable[bytes]]


def channel_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """Message size limits for servers and channels that carry tensors (gRPC's default is 4 MiB)."""
    return [("grpc.max_receive_message_length", max_receive_bytes), ("grpc.max_send_message_length", -1)]


def status_of(exc: FleetError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_status)


def grpc_error(exc: BaseException) -> tuple[grpc.StatusCode, str, Metadata]:
    """(status code, details, trailing metadata) that end a call with ``exc``: a FleetError's own code
    and its type in a trailer (the Python client raises the same class again); a bug: INTERNAL."""
    if isinstance(exc, FleetError):
        return status_of(exc), exc.message, ((ERROR_TYPE_HEADER, type(exc).__name__),)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ()


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the error's status code and type (a bug: INTERNAL, and keep serving)."""
    code, details, trailing = grpc_error(exc)
    await context.abort(code, details, trailing_metadata=trailing)


@dataclass(frozen=True)
class GrpcOptions:
    """How a worker serves gRPC; decided by the controller from the fleet config."""

    host: str | None = "127.0.0.1"  # None: as HttpOptions
    port: int = 0  # 0: any free port
    policy: InferPolicy = field(default_factory=InferPolicy)


class WorkerGrpcServer:
    """grpc.aio (a thread with its own event loop) in front of one EngineRunner."""

    def __init__(self, runner: EngineRunner, options: GrpcOptions, stats: RequestStats,
                 on_miss: MissFn | None = None) -> None:
        self.runner = runner
        self.options = options
        self.stats = stats
        self.on_miss = on_miss
        self.port = 0
        self.active = 0  # ModelInfer calls in this server now (a draining fleet waits for none)
        self._loop = LoopThread("worker-grpc")  # grpc.aio: asyncio's own loop
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.options.host, self.port

    def start(self) -> int:
        self._loop.start(self._start, self._stop)
        return self.port

    async def _start(self) -> None:
        server = grpc.aio.server(options=channel_options(self.options.policy.max_request_bytes))
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),  # bytes: a miss passes them on
            "ServerLive": grpc.unary_unary_rpc_method_handler(
                self.server_live, request_deserializer=pb.ServerLiveRequest.FromString,
                response_serializer=pb.ServerLiveResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port(f"{self.options.host}:{self.options.port}")
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=2)

    def stop(self) -> None:
        self._loop.stop()

    # ---- calls -------------------------------------------------------------------
    async def server_live(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def model_infer(self, raw: bytes, context) -> bytes:
        self.active += 1
        try:
            return await self._model_infer(raw, context)
        finally:
            self.active -= 1

    async def _model_infer(self, raw: bytes, context) -> bytes:
        metadata = tuple((k.lower(), v) for k, v in context.invocation_metadata() if isinstance(v, str))
        try:
            return await self.answer(raw, metadata, self.on_miss)
        except grpc.aio.AioRpcError as err:  # the router's answer to a miss, as it came
            await context.abort(err.code(), err.details() or "", trailing_metadata=tuple(err.trailing_metadata() or ()))
        except Exception as exc:
            await abort(context, exc)
        raise AssertionError("unreachable: abort raises")

    async def answer(self, raw: bytes, metadata: Metadata, miss: MissFn | None, body_size: int | None = None) -> bytes:
        """ModelInfer from the request's bytes to the response's, whatever carried them (this
        endpoint, or HTTP/1.1 from the front door: ``workers/grpc_http1.py``). Raises a FleetError,
        or the router's AioRpcError for a miss it passed on (``miss``: how to reach the router)."""
        headers = dict(metadata)
        self.options.policy.admit(headers, body_size)  # the token first: on another host this endpoint is on the network
        try:
            message = pb.ModelInferRequest.FromString(raw)
        except Exception:  # noqa: BLE001 (protobuf's DecodeError: the client's bytes)
            raise InvalidInput("the request is not a valid ModelInferRequest") from None
        model, version = message.model_name, message.model_version or None
        if ROUTED_HEADER in headers:
            miss = None  # the router sent it: a miss goes back to it as an error
        if not model:
            raise InvalidInput("ModelInferRequest needs a model_name")
        if miss is not None and (self.runner.out_of_service or self.runner.engine_key(model, version) is None):
            return await miss(raw, metadata)  # not here (or this GPU failed): the router routes it

        def decode() -> InferRequest:
            return read_grpc_request(message, limit=self.options.policy.max_request_bytes)

        def encode(served: Served, request: InferRequest) -> bytes:
            return grpc_response(model, served.version, served.outputs, request, served.parameters).SerializeToString()

        try:
            return await run_infer(model, version, headers, decode, encode, policy=self.options.policy,
                                   serve=self._serve, stats=self.stats)
        except (EngineNotHere, DeviceFailed):
            if miss is None:
                raise
            return await miss(raw, metadata)  # evicted between the look and the run, or the GPU failed

    async def relay_miss(self, raw: bytes, metadata: Metadata) -> bytes:
        """``on_miss`` from another event loop (the HTTP endpoint's): the router's channel lives on this one."""
        assert self.on_miss is not None and self._loop.loop is not None
        future = asyncio.run_coroutine_threadsafe(self.on_miss(raw, metadata), self._loop.loop)
        return await asyncio.wrap_future(future)

    async def _serve(self, model: str, version: str | None, request: InferRequest) -> Served:
        result = await self.runner.submit_async(request, model, version)
        manifest = result.manifest
        return Served(manifest.version, result.outputs,
                      served_by(self.runner.worker_id, self.runner.device, manifest.target.key()))
