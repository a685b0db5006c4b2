"""Passing a request a worker cannot serve on to the Serve ingress (HTTP) or the gRPC router.

A request the front door sent to a worker whose engine was evicted a moment ago (or
that names another host's shared memory region) is a miss: the ingress loads the
model where a budget allows, or routes it to the worker that has the region. The
worker's HTTP endpoint gets ``IngressForwarder`` as its ``on_miss``, its gRPC endpoint
``GrpcMissForwarder``; the worker layer itself never learns where they go.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc

from workers.errors import NotReady
from workers.grpc_server import MODEL_INFER, Metadata, channel_options
from workers.httpwire import RawHttpRequest
from workers.kserve.codec import HEADER_LENGTH
from workers.kserve.handler import ERROR_TYPE_HEADER, HttpAnswer, error_answer

from cluster.frontdoor.routes import GRPC_MISS_HEADER

# Headers passed on with the request, and back with the answer.
_FORWARD_REQUEST = ("content-type", "content-encoding", HEADER_LENGTH, "authorization")
_FORWARD_RESPONSE = ("content-type", HEADER_LENGTH, ERROR_TYPE_HEADER)


class IngressForwarder:
    def __init__(self, ingress_url: str) -> None:
        self.url = ingress_url.rstrip("/")
        # one session per event loop of the worker's endpoint (a session belongs to its loop), made on first use
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    async def __call__(self, request: RawHttpRequest) -> HttpAnswer:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None:
            session = self._sessions[loop] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        forward = {k: v for k, v in request.headers.items() if k in _FORWARD_REQUEST}
        try:
            async with session.post(self.url + request.target, data=request.body, headers=forward,
                                          skip_auto_headers=("Content-Type",)) as resp:
                content = await resp.read()
                headers = [(k.lower(), v) for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE]
                return HttpAnswer(resp.status, headers, content)
        except aiohttp.ClientError as exc:
            return error_answer(NotReady(f"could not reach the ingress at {self.url}: {exc}"))

    async def aclose(self) -> None:
        """Close the calling loop's session."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()


class GrpcMissForwarder:
    """A worker's gRPC miss: the request's bytes, with its metadata, to the fleet's gRPC port, marked so
    that the front door gives it to the gRPC router (which loads the model and routes it)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._call = None  # a channel of the worker's gRPC event loop, made on first use

    async def __call__(self, raw: bytes, metadata: Metadata) -> bytes:
        if self._call is None:
            channel = grpc.aio.insecure_channel(self.target, options=channel_options(-1))
            self._call = channel.unary_unary(MODEL_INFER)
        return await self._call(raw, metadata=(*metadata, (GRPC_MISS_HEADER, "1")), timeout=300)
