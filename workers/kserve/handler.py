"""The one KServe v2 infer handler and the one error answer, for every entry point.

``run_infer`` runs checks, decoding, the call that serves the request, encoding and the
request statistics the same way whatever the protocol; ``handle_infer`` is it over HTTP
for the worker's own endpoint (``workers/http.py``) and the Serve ingress
(``cluster/serve_app.py``), and ``workers/grpc.py`` runs it over gRPC. They differ only
in how they decode and encode, and in the ``serve`` coroutine they pass (the worker's
runner, or the data plane's router). ``error_answer`` is the only place an error body
is made, the front door's HAProxy error files included.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from workers.devices import Device
from workers.errors import (
    DeviceFailed,
    EngineNotHere,
    FleetError,
    ModelNotFound,
    PayloadTooLarge,
    Unauthorized,
)
from workers.kserve.codec import HEADER_LENGTH, InferRequest, ShmWritten, encode_response_parts, read_infer_request
from workers.manifest import validate_model_ref
from workers.stats import RequestStats

log = logging.getLogger("forward-fleet.kserve")

ERROR_TYPE_HEADER = "x-fleet-error"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: list[tuple[str, str]]  # lower-case names
    body: bytes
    trailers: list[tuple[str, str]] | None = None  # sent chunked, with these trailers (gRPC's status)
    # Binary tensors that follow ``body``, as views of the outputs: the worker's endpoint writes
    # them to the socket as they are; ``content`` joins them for servers that take one body.
    blobs: "tuple[bytes | memoryview, ...]" = ()

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(b) for b in self.blobs)

    def content(self) -> bytes:
        return b"".join([self.body, *self.blobs]) if self.blobs else self.body


def json_answer(status: int, body: object, headers: "list[tuple[str, str]] | None" = None) -> HttpAnswer:
    return HttpAnswer(status, [("content-type", "application/json"), *(headers or [])], json.dumps(body).encode())


def error_answer(exc: FleetError) -> HttpAnswer:
    """``{"error": ...}`` with the status the exception's class declares and its type in a header
    (the Python client raises the same class again); ``Retry-After`` where the class says when."""
    headers = [(ERROR_TYPE_HEADER, type(exc).__name__)]
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers.append(("retry-after", str(retry_after)))
    return json_answer(exc.http_status, {"error": exc.message}, headers)


def internal_error_answer(exc: BaseException) -> HttpAnswer:
    """A bug, not the client's fault: say so, and keep serving."""
    return json_answer(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})


def check_bearer(authorization: str | None, token: str) -> None:
    """401 unless ``authorization`` is ``Bearer <token>`` (constant-time compare)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("this call needs 'Authorization: Bearer <token>' with the fleet's auth token")


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading a body whose declared length is over the limit."""
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"request body of {content_length} bytes is over the limit of {limit} bytes")


@dataclass(frozen=True)
class InferPolicy:
    """What every infer entry point checks before decoding; decided from the fleet config."""

    max_request_bytes: int = 64 << 20
    auth_token: str | None = None
    auth_inference: bool = False

    def admit(self, headers: Mapping[str, str], body_size: int | None = None) -> None:
        """413 / 401 before the body is decoded (``body_size``: bytes received, when known)."""
        check_declared_length(headers.get("content-length"), self.max_request_bytes)
        if body_size is not None and body_size > self.max_request_bytes:
            check_declared_length(str(body_size), self.max_request_bytes)
        if self.auth_token and self.auth_inference:
            check_bearer(headers.get("authorization"), self.auth_token)


@dataclass
class Served:
    """What serving one request produced, and who produced it (the answer's parameters)."""

    version: str
    outputs: "dict[str, np.ndarray | ShmWritten]"
    parameters: dict = field(default_factory=dict)


ServeFn = Callable[[str, "str | None", InferRequest], Awaitable[Served]]


def served_by(worker_id: str, device: Device, target_key: str) -> dict:
    """The answer's parameters that say which worker and device served it."""
    return {
        "fleet_worker": worker_id,
        "fleet_device": device.name,
        "compute_capability": device.compute_capability or "cpu",
        "simulated": device.simulated,
        "fleet_target": target_key,
    }


R = TypeVar("R")


async def run_infer(
    model: str,
    version: str | None,
    headers: Mapping[str, str],
    decode: Callable[[], InferRequest],
    encode: Callable[[Served, InferRequest], R],
    *,
    policy: InferPolicy,
    serve: ServeFn,
    stats: RequestStats,
    body_size: int | None = None,
) -> R:
    """One inference, whatever the protocol: checks, ``decode``, ``serve``, ``encode``, statistics.

    Raises what went wrong for the protocol's wrapper to answer: a FleetError (EngineNotHere
    is not counted: another worker or the ingress serves the request), or a bug (logged).
    Requests for names that are not models (typos, probes) are not counted."""
    validate_model_ref(model, version)
    started = time.perf_counter()
    served_version = version
    try:
        policy.admit(headers, body_size)
        request = decode()
        served = await serve(model, version, request)
        served_version = served.version
        result = encode(served, request)
    except (EngineNotHere, DeviceFailed):
        raise  # not counted here: another worker serves it (or the caller answers the 503)
    except FleetError as exc:
        if not isinstance(exc, ModelNotFound):
            stats.record(model, served_version, time.perf_counter() - started, type(exc).__name__)
        raise
    except Exception as exc:
        log.exception("internal error serving %s", model)
        stats.record(model, served_version, time.perf_counter() - started, type(exc).__name__)
        raise
    stats.record(model, served.version, time.perf_counter() - started)
    return result


async def handle_infer(
    model: str,
    version: str | None,
    body: bytes,
    headers: Mapping[str, str],
    *,
    policy: InferPolicy,
    serve: ServeFn,
    stats: RequestStats,
    body_size: int | None = None,
    on_miss: "Callable[[], Awaitable[HttpAnswer]] | None" = None,
) -> HttpAnswer:
    """One ``POST /v2/models/{model}[/versions/{version}]/infer``, start to end (``run_infer`` over HTTP).

    ``headers`` have lower-case names. ``on_miss``: what to answer instead when ``serve``
    finds no engine of the model here (``EngineNotHere``) or this worker's GPU failed under
    the request (``DeviceFailed``: another worker can serve it); without it, a 503."""

    def decode() -> InferRequest:
        return read_infer_request(body, headers.get("content-encoding"), headers.get(HEADER_LENGTH),
                                  limit=policy.max_request_bytes)

    def encode(served: Served, request: InferRequest) -> HttpAnswer:
        header, blobs, out_headers = encode_response_parts(model, served.version, served.outputs, request,
                                                           served.parameters)
        return HttpAnswer(200, list(out_headers.items()), header, blobs=tuple(blobs))

    try:
        return await run_infer(model, version, headers, decode, encode, policy=policy, serve=serve, stats=stats,
                               body_size=body_size)
    except (EngineNotHere, DeviceFailed) as exc:
        if on_miss is not None:
            return await on_miss()
        return error_answer(exc)
    except FleetError as exc:
        return error_answer(exc)
    except Exception as exc:
        return internal_error_answer(exc)
