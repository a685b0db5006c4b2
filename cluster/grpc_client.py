"""The Python client's gRPC transport: KServe v2 / Triton gRPC (``inference.GRPCInferenceService``).

``FleetClient(url, protocol="grpc")`` sends its calls through this class instead of HTTP:
the same tensors (``workers/kserve/grpc_codec.py``), the same shared memory regions, the
same exception types (the gRPC status code and the ``x-fleet-error`` trailing metadata).
Generic calls on the fleet's own messages: no generated stubs, no tritonclient.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from workers.errors import FleetError, error_from_grpc
from workers.grpc_server import SERVICE, channel_options
from workers.kserve.codec import ShmInput, ShmWritten
from workers.kserve.grpc_codec import grpc_request, read_grpc_response
from workers.kserve.handler import ERROR_TYPE_HEADER
from workers.kserve.model_config import config_json
from workers.kserve.proto import grpc_service_pb2 as pb
from workers.shm import ShmRef

from cluster.client_tls import ClientTls

_RESPONSES = {
    "ModelInfer": pb.ModelInferResponse, "ModelMetadata": pb.ModelMetadataResponse,
    "ServerReady": pb.ServerReadyResponse, "RepositoryIndex": pb.RepositoryIndexResponse,
    "RepositoryModelLoad": pb.RepositoryModelLoadResponse, "RepositoryModelUnload": pb.RepositoryModelUnloadResponse,
    "SystemSharedMemoryRegister": pb.SystemSharedMemoryRegisterResponse,
    "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterResponse,
    "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusResponse,
}


def grpc_target(url: str) -> str:
    """'grpc://host:8001', 'http://host:8001' or 'host:8001' -> 'host:8001'."""
    return url.split("://", 1)[-1].rstrip("/")


class GrpcTransport:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 60.0, tls: ClientTls | None = None) -> None:
        self.target = grpc_target(url)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls is None and url.startswith(("https://", "grpcs://")):
            tls = ClientTls()
        if tls is not None:
            self._channel = grpc.secure_channel(self.target, tls.grpc_credentials(), options=channel_options(-1))
        else:
            self._channel = grpc.insecure_channel(self.target, options=channel_options(-1))
        self._calls: dict[str, Callable] = {}

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request):
        """One unary call; a failed one raises the server's exception type."""
        stub = self._calls.get(method)
        if stub is None:
            stub = self._calls[method] = self._channel.unary_unary(
                f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                response_deserializer=_RESPONSES[method].FromString)
        try:
            return stub(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.UNAVAILABLE and not _error_type(err):
                raise FleetError(f"cannot reach the fleet's gRPC port at {self.target}: is it up (`fleet up`)? "
                                 f"({err.details() if hasattr(err, 'details') else err})") from None
            raise error_from_grpc(code.name, err.details() or "", _error_type(err)) from None

    # ---- inference ---------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
              outputs: list[str] | None = None, shm_inputs: dict[str, ShmInput] | None = None,
              shm_outputs: dict[str, ShmRef] | None = None) -> tuple[dict, dict[str, np.ndarray], dict[str, ShmWritten]]:
        """(the answer's parameters, outputs in the answer, outputs written into shared memory)."""
        request = grpc_request(model, inputs, version=version, outputs=outputs, shm_inputs=shm_inputs,
                               shm_outputs=shm_outputs)
        return read_grpc_response(self.call("ModelInfer", request))

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        return config_json(self.call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version or "")))

    # ---- repository and health ---------------------------------------------------------
    def ready(self) -> bool:
        try:
            return self.call("ServerReady", pb.ServerReadyRequest()).ready
        except FleetError:
            return False

    def models(self) -> list[dict]:
        return config_json(self.call("RepositoryIndex", pb.RepositoryIndexRequest()))["models"]

    def load(self, model: str) -> dict:
        self.call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model))
        return {}

    def unload(self, model: str) -> dict:
        self.call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model))
        return {}

    # ---- system shared memory ------------------------------------------------------
    def register_system_shared_memory(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        self.call("SystemSharedMemoryRegister",
                  pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size))

    def unregister_system_shared_memory(self, name: str | None = None) -> None:
        self.call("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=name or ""))

    def get_system_shared_memory_status(self, name: str | None = None) -> list[dict]:
        status = self.call("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name or ""))
        return [config_json(r) for _, r in sorted(status.regions.items())]


def _error_type(err: grpc.RpcError) -> str | None:
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return dict(metadata or ()).get(ERROR_TYPE_HEADER)
