"""gRPC ``ModelInfer`` carried over HTTP/1.1: how the front door reaches a worker over gRPC.

HAProxy speaks HTTP/2 to gRPC clients and HTTP/1.1 to the worker's own HTTP endpoint
(``workers/http.py``), converting between the two, trailers included. So a ``ModelInfer``
arrives here as ``POST /inference.GRPCInferenceService/ModelInfer`` with the gRPC
length-prefixed message as its body, and leaves as a chunked answer whose trailers carry
``grpc-status`` and ``grpc-message``. This spares the worker Python's gRPC server, which
limited gRPC to about 0.4x the fleet's HTTP throughput (docs/performance.md); the gRPC
endpoint (``workers/grpc_server.py``) does the same work from the same ``answer``, and
still serves what reaches it directly (the gRPC router's calls).
"""

from __future__ import annotations

import grpc

from workers.errors import FleetError, InvalidInput
from workers.grpc_server import Metadata, WorkerGrpcServer, grpc_error
from workers.httpwire import RawHttpRequest
from workers.kserve.handler import HttpAnswer

# HTTP/1.1 and HTTP/2 headers that are not gRPC metadata (they must not travel on with a miss)
_NOT_METADATA = frozenset({"host", "content-type", "content-length", "te", "transfer-encoding", "connection",
                           "user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "keep-alive"})


class GrpcUnimplemented(FleetError):
    """A gRPC feature this path does not implement (compressed messages)."""

    http_status = 400
    grpc_status = "UNIMPLEMENTED"


def grpc_message_value(text: str) -> str:
    """``grpc-message`` as gRPC wants it: percent-encoded outside printable ASCII (and '%' itself)."""
    return "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def unframe(body: bytes) -> bytes:
    """The one message of a unary call: a 5-byte prefix (compressed flag, big-endian length), then the
    message. HAProxy reads the model's name only out of uncompressed messages, so a compressed one
    goes to the gRPC router (grpcio) and never here."""
    if len(body) < 5:
        raise InvalidInput("the gRPC request has no message")
    length = int.from_bytes(body[1:5], "big")
    if length != len(body) - 5:
        raise InvalidInput(f"the gRPC request holds {len(body) - 5} bytes after its prefix, which announces {length}")
    if body[0] != 0:
        raise GrpcUnimplemented("compressed gRPC messages are not accepted on this path; send them to the fleet's gRPC port")
    return body[5:]


STATUS_CODES = {code.name: code.value[0] for code in grpc.StatusCode}  # "NOT_FOUND" -> 5


def grpc_answer(message: bytes | None = None, status: str = "OK", details: str = "",
                trailing: tuple[tuple[str, str], ...] = ()) -> HttpAnswer:
    """A unary gRPC response as HTTP/1.1: the framed message (if any), then the status in trailers."""
    body = b"" if message is None else b"\x00" + len(message).to_bytes(4, "big") + message
    trailers = [("grpc-status", str(STATUS_CODES[status])), ("grpc-message", grpc_message_value(details)), *trailing]
    return HttpAnswer(200, [("content-type", "application/grpc")], body, trailers)


def error_grpc_answer(exc: BaseException) -> HttpAnswer:
    code, details, trailing = grpc_error(exc)
    return grpc_answer(status=code.name, details=details, trailing=trailing)


class GrpcOverHttp1:
    """Answers ``ModelInfer`` requests that came over HTTP/1.1 with the gRPC endpoint's ``answer``."""

    def __init__(self, grpc_server: WorkerGrpcServer) -> None:
        self.server = grpc_server

    async def __call__(self, request: RawHttpRequest) -> HttpAnswer:
        metadata: Metadata = tuple((k, v) for k, v in request.headers.items()
                                   if k not in _NOT_METADATA and not k.endswith("-bin"))
        miss = self.server.relay_miss if self.server.on_miss is not None else None
        try:
            raw = unframe(request.body) if not request.too_large else b""  # too large: admit refuses it
            return grpc_answer(await self.server.answer(raw, metadata, miss, request.size))
        except grpc.aio.AioRpcError as err:  # the router's answer to a miss, as it came
            code = err.code().name if err.code() is not None else "UNKNOWN"
            trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if isinstance(v, str))
            return grpc_answer(status=code, details=err.details() or "", trailing=trailing)
        except Exception as exc:  # noqa: BLE001 (every error is an answer, as grpc.aio's abort makes it)
            return error_grpc_answer(exc)
