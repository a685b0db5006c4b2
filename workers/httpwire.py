"""HTTP/1.1 for the worker's own endpoint: a small protocol on httptools (the parser uvicorn uses).

Keep-alive, pipelining in order, chunked or sized bodies, ``Expect: 100-continue``, and
an early 413 for a declared body over the limit. A body is kept whole in memory up to
the limit: no flow-control round trip per 64 KiB, as ASGI servers make (6.6k -> 9.4k
req/s straight at a worker, docs/performance.md). Each request goes to one handler
coroutine that answers with a ``workers.kserve.handler.HttpAnswer``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from workers.errors import PayloadTooLarge
from workers.kserve.handler import HttpAnswer, error_answer, internal_error_answer, json_answer
from workers.shm import buffer_address

log = logging.getLogger("forward-fleet.worker-http")


@dataclass
class RawHttpRequest:
    method: str
    target: str  # path and query, as sent
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool
    size: int  # body bytes received (more than body when too_large)
    too_large: bool


Handler = Callable[[RawHttpRequest], Awaitable[HttpAnswer]]
# A body over the limit is read and dropped, up to this much more, before the connection closes:
# clients that send the body without waiting (urllib, requests, tritonclient) then read the 413
# instead of a broken pipe. Beyond it the connection closes at once.
DRAIN_BYTES = 256 << 20
READ_BYTES = 256 << 10  # what one read takes for the parser (asyncio's own read size)
DIRECT_BYTES = 64 << 10  # bodies from this size are read into one buffer of their own
ALIGN = 64  # where a binary body's tensors start in that buffer

_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 413: b"Payload Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class HttpConnection(asyncio.BufferedProtocol):
    """HTTP/1.1 on one connection (httptools parser): keep-alive, pipelining in order,
    chunked or sized bodies, ``Expect: 100-continue``. A body is kept whole in memory up to
    the request limit (no flow-control round trips per 64 KiB, as ASGI servers make).

    A large body with a Content-Length is read by the kernel straight into one buffer of its
    size (``get_buffer``), not in pieces that are copied again to be joined: each copy of a 4 MB
    body cost the event loop about a millisecond, on the thread that serves every request."""

    def __init__(self, handler: Handler, limit: int) -> None:
        import httptools

        self.handler = handler
        self.limit = limit
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: list[RawHttpRequest] = []
        self.busy = False
        self.draining = 0  # bytes of a refused body still to drop (answered already)
        self.scratch = bytearray(READ_BYTES)  # what the parser reads
        self.direct: bytearray | None = None  # a body the kernel writes into (see get_buffer)
        self.filled = 0
        self.spare: bytearray | None = None  # the last such body, answered and no longer viewed
        self.fd: int | None = None  # the socket's, for large answers (_sent_directly)
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0

    # asyncio.BufferedProtocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Large answers are written to the socket itself (_sent_directly); never under TLS, whose
            # transport must encrypt them (the worker's endpoints speak plain HTTP: docs/multihost.md).
            self.fd = sock.fileno() if transport.get_extra_info("sslcontext") is None else None

    def connection_lost(self, exc) -> None:
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.direct is not None:  # exactly the rest of the body: what follows it goes to the parser
            return memoryview(self.direct)[self.filled:]
        return memoryview(self.scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.direct is None:
            self.data_received(memoryview(self.scratch)[:nbytes])
            return
        self.filled += nbytes
        self.size += nbytes
        if self.filled == len(self.direct):
            import httptools

            self.parts, self.direct, self.filled = [self.direct], None, 0
            self.on_message_complete()
            # That parser saw only the head and the first piece: a new one takes the next request.
            self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data) -> None:
        import httptools

        if self.transport is None:  # answered and closed: ignore the rest
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._write(json_answer(400, {"error": "protocol upgrades are not supported"}), keep_alive=False)
        except httptools.HttpParserError as exc:
            self._write(json_answer(400, {"error": f"malformed HTTP request: {exc}"}), keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        declared = dict(self.header_list).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:  # answer now; drop the body, then close
            self._refuse(f"request body of {int(declared)} bytes is over the limit of {self.limit} bytes")
            return
        if any(n == b"expect" and v.lower() == b"100-continue" for n, v in self.header_list):
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = any(n == b"transfer-encoding" for n, _ in self.header_list)
        if declared.isdigit() and int(declared) >= DIRECT_BYTES and not chunked:
            size = int(declared)  # on_body fills the start of the buffer, get_buffer the rest
            header = dict(self.header_list).get(b"inference-header-content-length", b"0")
            tensors_at = int(header) if header.isdigit() and int(header) <= size else 0
            spare, self.spare = self.spare, None
            # A client sends bodies of one size, mostly: the last one's buffer again is no new
            # memory to fault in (a fresh 4 MB buffer, zeroed, cost as much as reading into it).
            fits = spare is not None and len(spare) == size and (buffer_address(spare) + tensors_at) % ALIGN == 0
            self.direct = spare if fits else _aligned_buffer(size, tensors_at)

    def on_body(self, body: bytes) -> None:
        if self.direct is not None:  # the first piece came with the head; the kernel writes the rest
            self.direct[self.filled:self.filled + len(body)] = body
            self.filled += len(body)
            self.size += len(body)
            if self.filled == len(self.direct):  # all of it came with the head: the parser completes it
                self.parts, self.direct, self.filled = [self.direct], None, 0
            return
        if self.draining:
            self.draining -= len(body)
            if self.draining <= 0:
                self._close()
            return
        self.size += len(body)
        if self.size <= self.limit:
            self.parts.append(body)
        elif self.size > self.limit + DRAIN_BYTES:  # a chunked body with no end in sight
            self._refuse(f"request body is over the limit of {self.limit} bytes")

    def _refuse(self, message: str) -> None:
        """Answer 413 now (with "connection: close"), then read and drop what the client still sends
        of this body, bounded, and close once it is in: the client sees the answer, not a reset."""
        self._write(error_answer(PayloadTooLarge(message)), keep_alive=False, close=False)
        self.draining = DRAIN_BYTES

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def on_message_complete(self) -> None:
        if self.draining:  # the refused body is all in: now the connection may close without a reset
            self._close()
            return
        if self.transport is None:
            return
        target = self.url.decode("latin-1")
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.pending.append(RawHttpRequest(
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
                    answer = await self.handler(request)
                except Exception as exc:  # never leave a client without an answer
                    log.exception("internal error")
                    answer = internal_error_answer(exc)
                self._write(answer, request.keep_alive, head_only=request.method == "HEAD")
                if isinstance(request.body, bytearray) and _unviewed(request.body):
                    self.spare = request.body
        finally:
            self.busy = False

    def _write(self, answer: HttpAnswer, keep_alive: bool, head_only: bool = False, close: bool = True) -> None:
        """Send ``answer``; without ``keep_alive`` it says "connection: close" and (``close``) closes."""
        if self.transport is None:
            return
        body = [] if head_only else [answer.body, *answer.blobs]
        size = answer.size
        head = [b"HTTP/1.1 %d %s\r\n" % (answer.status, _REASONS.get(answer.status, b"Error"))]
        head += [b"%s: %s\r\n" % (k.encode("latin-1"), str(v).encode("latin-1")) for k, v in answer.headers]
        chunked = answer.trailers is not None  # one chunk with the body, then the trailers (gRPC's status)
        head.append(b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % size)
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        parts = [b"".join(head)]
        if chunked:
            if size and body:
                parts += [b"%x\r\n" % size, *body, b"\r\n"]
            parts.append(b"0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                                              for k, v in answer.trailers or ()) + b"\r\n")
        else:
            parts += body
        if size < 65536:
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(self._sent_directly(parts))  # the outputs' own bytes, not joined first
        if not keep_alive and close:
            self._close()

    def _sent_directly(self, parts: list) -> list:
        """What of ``parts`` is left after writing them to the socket with ``os.writev``, which releases
        the GIL while the kernel copies them. The event loop's own write holds it throughout: under
        4 MB answers, py-spy --gil on the CPU machine had the HTTP thread holding the GIL 48 % of the
        time, 37 % in that write (the engines' threads wait for it); with this, 12 %. Only with nothing
        queued in the transport, so that the order holds; what the socket did not take goes as before."""
        fd = self.fd
        if fd is None or self.transport is None or self.transport.get_write_buffer_size():
            return parts
        try:
            sent = os.writev(fd, parts)
        except (BlockingIOError, InterruptedError):
            return parts
        except OSError:
            return parts  # the transport's own write meets the same error, and closes the connection
        left = []
        for part in parts:
            view = memoryview(part).cast("B")
            if sent >= len(view):
                sent -= len(view)
                continue
            left.append(view[sent:] if sent else part)
            sent = 0
        return left


def _aligned_buffer(size: int, tensors_at: int) -> bytearray:
    """A body buffer of ``size`` bytes whose byte ``tensors_at`` (where a binary body's tensors begin,
    after its JSON header) is on a 64-byte boundary: the inputs decoded in place are then aligned as
    a fresh array is (ONNX Runtime on the CPU ran 2-3 % slower on tensors at an odd offset). Deleting
    from the front of a bytearray moves its start, without a copy."""
    buffer = bytearray(size + ALIGN)
    del buffer[:-(buffer_address(buffer) + tensors_at) % ALIGN]
    del buffer[size:]
    return buffer


def _unviewed(buffer: bytearray) -> bool:
    """No memoryview (so no numpy array) of ``buffer`` is alive: it may be written again. A
    bytearray cannot change size while it is viewed; popping and putting back one byte is a
    size change that never reallocates."""
    try:
        last = buffer.pop()
    except (BufferError, IndexError):
        return False
    buffer.append(last)
    return True
