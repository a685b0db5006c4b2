"""Passing a request a worker cannot serve on to the Serve ingress.

A request the front door sent to a worker whose engine was evicted a moment ago (or
that names another host's shared memory region) is a miss: the ingress loads the
model where a budget allows, or routes it to the worker that has the region. The
worker's HTTP endpoint gets this forwarder as its ``on_miss``; the worker layer
itself never learns where the ingress is.
"""

from __future__ import annotations

import aiohttp

from workers.errors import NotReady
from workers.httpwire import RawHttpRequest
from workers.kserve.codec import HEADER_LENGTH
from workers.kserve.handler import ERROR_TYPE_HEADER, HttpAnswer, error_answer

# Headers passed on with the request, and back with the answer.
_FORWARD_REQUEST = ("content-type", "content-encoding", HEADER_LENGTH, "authorization")
_FORWARD_RESPONSE = ("content-type", HEADER_LENGTH, ERROR_TYPE_HEADER)


class IngressForwarder:
    def __init__(self, ingress_url: str) -> None:
        self.url = ingress_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None  # made on the server's loop, on first use

    async def __call__(self, request: RawHttpRequest) -> HttpAnswer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        forward = {k: v for k, v in request.headers.items() if k in _FORWARD_REQUEST}
        try:
            async with self._session.post(self.url + request.target, data=request.body, headers=forward,
                                          skip_auto_headers=("Content-Type",)) as resp:
                content = await resp.read()
                headers = [(k.lower(), v) for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE]
                return HttpAnswer(resp.status, headers, content)
        except aiohttp.ClientError as exc:
            return error_answer(NotReady(f"could not reach the ingress at {self.url}: {exc}"))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
