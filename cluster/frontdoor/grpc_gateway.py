"""The gRPC calls that are not inference, answered by the Serve ingress over HTTP.

Health, metadata, model configuration, statistics, the repository and shared memory
each have one implementation: the ingress's HTTP route (``cluster/serve_app.py``). Here
each RPC of ``inference.GRPCInferenceService`` becomes that HTTP call, its JSON answer
the RPC's message (``json_format``: Triton's JSON and its protobuf messages share field
names), and an HTTP error the same exception (``x-fleet-error``), then its gRPC status
through the one table. The ``authorization`` metadata travels as the HTTP header, so the
token rule is the ingress's own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp
import grpc
from google.protobuf import json_format

from workers.errors import NotReady, error_from_wire
from workers.grpc_server import abort
from workers.kserve.handler import ERROR_TYPE_HEADER
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.manifest import validate_model_ref

Headers = dict[str, str]
TIMEOUT_S = 300


def _region_path(kind: str, name: str, action: str) -> str:
    """``/v2/{kind}/region/{name}/{action}``, or ``/v2/{kind}/{action}`` for every region (no name)."""
    return f"/v2/{kind}/region/{quote(name, safe='')}/{action}" if name else f"/v2/{kind}/{action}"


def _model_path(name: str, version: str, tail: str = "") -> str:
    validate_model_ref(name, version or None)
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + tail


class IngressGateway:
    def __init__(self, ingress_url: str) -> None:
        self.url = ingress_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None  # made on the server's loop, on first use

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _http(self, method: str, path: str, headers: Headers, body: dict | None = None,
                    answers: tuple[int, ...] = ()) -> tuple[int, object]:
        """(status, JSON) of one call to the ingress; an error status not in ``answers`` raises its FleetError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        try:
            async with self._session.request(method, self.url + path, headers=headers,
                                             data=None if body is None else json.dumps(body)) as resp:
                content = await resp.read()
                if resp.status >= 400 and resp.status not in answers:
                    try:
                        message = json.loads(content).get("error") or content.decode(errors="replace")
                    except (ValueError, AttributeError):
                        message = content.decode(errors="replace")[:500]
                    raise error_from_wire(resp.status, message, resp.headers.get(ERROR_TYPE_HEADER))
                return resp.status, json.loads(content) if content.strip() else {}
        except aiohttp.ClientError as exc:
            raise NotReady(f"could not reach the fleet's ingress at {self.url}: {exc}") from None

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Every RPC this gateway answers, by method name."""
        calls: dict[str, tuple[type, type, Callable]] = {
            "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse, self.load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse, self.unload),
            "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, pb.SystemSharedMemoryStatusResponse,
                                         self.shm_status),
            "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest, pb.SystemSharedMemoryRegisterResponse,
                                           self.shm_register),
            "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest,
                                             pb.SystemSharedMemoryUnregisterResponse, self.shm_unregister),
            "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, pb.CudaSharedMemoryStatusResponse,
                                       self.cuda_status),
            "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest, pb.CudaSharedMemoryRegisterResponse,
                                         self.cuda_register),
            "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest, pb.CudaSharedMemoryUnregisterResponse,
                                           self.cuda_unregister),
        }
        return {name: grpc.unary_unary_rpc_method_handler(_answering(fn, response), request_deserializer=request.FromString,
                                                          response_serializer=response.SerializeToString)
                for name, (request, response, fn) in calls.items()}

    # ---- health and metadata ---------------------------------------------------
    async def server_live(self, request, headers: Headers) -> dict:
        return {"live": (await self._http("GET", "/v2/health/live", headers))[0] == 200}

    async def server_ready(self, request, headers: Headers) -> dict:
        return {"ready": (await self._http("GET", "/v2/health/ready", headers, answers=(503,)))[0] == 200}

    async def model_ready(self, request, headers: Headers) -> dict:
        status, _ = await self._http("GET", _model_path(request.name, request.version, "/ready"), headers,
                                     answers=(400, 404))
        return {"ready": status == 200}

    async def server_metadata(self, request, headers: Headers) -> object:
        return (await self._http("GET", "/v2", headers))[1]

    async def model_metadata(self, request, headers: Headers) -> object:
        return (await self._http("GET", _model_path(request.name, request.version), headers))[1]

    async def model_config(self, request, headers: Headers) -> dict:
        return {"config": (await self._http("GET", _model_path(request.name, request.version, "/config"), headers))[1]}

    async def model_statistics(self, request, headers: Headers) -> object:
        path = _model_path(request.name, request.version, "/stats") if request.name else "/v2/models/stats"
        return (await self._http("GET", path, headers))[1]

    # ---- repository ----------------------------------------------------------------
    async def repository_index(self, request, headers: Headers) -> dict:
        return {"models": (await self._http("POST", "/v2/repository/index", headers, {"ready": request.ready}))[1]}

    async def load(self, request, headers: Headers) -> dict:
        parameters: dict = {}
        for key, value in request.parameters.items():
            which = value.WhichOneof("parameter_choice")
            raw = getattr(value, which) if which else None
            parameters[key] = base64.b64encode(raw).decode() if isinstance(raw, bytes) else raw
        validate_model_ref(request.model_name)
        await self._http("POST", f"/v2/repository/models/{request.model_name}/load", headers, {"parameters": parameters})
        return {}

    async def unload(self, request, headers: Headers) -> dict:
        validate_model_ref(request.model_name)
        await self._http("POST", f"/v2/repository/models/{request.model_name}/unload", headers, {})
        return {}

    # ---- shared memory (system: "systemsharedmemory", CUDA: "cudasharedmemory") ----------
    async def _regions(self, kind: str, request, headers: Headers) -> dict:
        listed = (await self._http("GET", _region_path(kind, request.name, "status"), headers))[1]
        return {"regions": {r["name"]: r for r in listed}}  # type: ignore[union-attr]

    async def _unregister(self, kind: str, request, headers: Headers) -> dict:
        await self._http("POST", _region_path(kind, request.name, "unregister"), headers, {})
        return {}

    async def shm_status(self, request, headers: Headers) -> dict:
        return await self._regions("systemsharedmemory", request, headers)

    async def shm_register(self, request, headers: Headers) -> dict:
        body = {"key": request.key, "offset": request.offset, "byte_size": request.byte_size}
        await self._http("POST", _region_path("systemsharedmemory", request.name, "register"), headers, body)
        return {}

    async def shm_unregister(self, request, headers: Headers) -> dict:
        return await self._unregister("systemsharedmemory", request, headers)

    async def cuda_status(self, request, headers: Headers) -> dict:
        return await self._regions("cudasharedmemory", request, headers)

    async def cuda_register(self, request, headers: Headers) -> dict:
        body = {"device_id": request.device_id, "byte_size": request.byte_size}
        await self._http("POST", _region_path("cudasharedmemory", request.name, "register"), headers, body)
        return {}

    async def cuda_unregister(self, request, headers: Headers) -> dict:
        return await self._unregister("cudasharedmemory", request, headers)


def http_headers(context: grpc.aio.ServicerContext) -> Headers:
    """The metadata the ingress reads: the token."""
    return {k: v for k, v in context.invocation_metadata() if k.lower() == "authorization" and isinstance(v, str)}


def _answering(fn: Callable[..., Awaitable[object]], response: type) -> Callable:
    """An RPC behaviour: the gateway's call, its JSON as ``response``, errors as gRPC statuses."""

    async def behaviour(request, context: grpc.aio.ServicerContext):
        try:
            data = await fn(request, http_headers(context))
            return json_format.ParseDict(data, response(), ignore_unknown_fields=True)
        except Exception as exc:  # FleetError: its status; a bug: INTERNAL, and keep serving
            await abort(context, exc)

    return behaviour
