"""Python client for a running fleet (KServe v2 over HTTP, binary by default, or over gRPC).

``protocol="grpc"`` sends the same calls as Triton's gRPC (``cluster/grpc_client.py``) to the
fleet's gRPC port (``grpc_port``, 8001 by default). On the fleet's own hosts, ``shared_memory=True`` keeps the tensors in a POSIX shared
memory region (Triton's system shared memory extension, ``cluster/shm_arena.py``):
only their descriptions travel over HTTP.

Raises the same exception types as the server (``workers.errors``).
"""

from __future__ import annotations

import asyncio
import http.client
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import aiohttp
import numpy as np
import requests

from workers.errors import FleetError, error_from_wire
from workers.kserve.client_codec import decode_response, encode_request
from workers.kserve.codec import HEADER_LENGTH
from workers.kserve.handler import ERROR_TYPE_HEADER
from workers.tensors import batch_rows

from cluster.client_tls import ClientTls
from cluster.grpc_client import GrpcTransport
from cluster.shm_arena import ShmArena, written_outputs

DEFAULT_URL = "http://127.0.0.1:8000"


def raise_for_answer(status: int, body: bytes, error_type: str | None) -> None:
    """Raise the typed error an answer of the fleet carries (its status, body and x-fleet-error)."""
    try:
        import json

        message = json.loads(body).get("error") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:500]
    raise error_from_wire(status, message, error_type)


def closed_without_answer(exc: requests.ConnectionError) -> bool:
    """The server closed the connection before any byte of an answer (not: refused, timed out)."""
    reason = exc.args[0] if exc.args else None
    return any(isinstance(a, (http.client.RemoteDisconnected, ConnectionResetError))
               for a in (reason, *getattr(reason, "args", ())))


class FleetClient:
    """Blocking client. ``infer`` returns ``{output name: numpy array}``.

    ``shared_memory=True`` (on a host of the fleet, which must allow it: ``allow_client_shm``)
    sends tensors through a shared memory region of this client instead of the request body.
    ``protocol="grpc"``: ``url`` is the fleet's gRPC address (``host:8001``); the calls, their
    results and their errors are the same. ``status()`` is HTTP's only.
    One client is for one thread at a time (``infer_many`` makes one per thread).
    ``tls``: whom to trust and, for mutual TLS, the client's certificate (``ClientTls``); HTTPS
    follows from an ``https://`` URL, gRPC uses TLS when ``tls`` is given or the URL starts with
    ``https://`` or ``grpcs://``."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 60.0, binary: bool = True,
                 shared_memory: bool = False, protocol: str = "http", tls: ClientTls | None = None):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.binary = binary
        self.shared_memory = shared_memory
        self.protocol = protocol
        self._token = token
        self.tls = tls
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        # per request, not on the session: requests lets REQUESTS_CA_BUNDLE override a session's verify
        self._tls_options = tls.requests_options() if tls is not None else {}
        self._grpc = GrpcTransport(url, token=token, timeout=timeout, tls=tls) if protocol == "grpc" else None
        self.last_parameters: dict = {}
        self._arena = ShmArena(self.register_system_shared_memory, self.unregister_system_shared_memory)
        self._output_specs: dict[tuple[str, str | None], list[dict]] = {}

    def close(self) -> None:
        self._arena.release()
        self._session.close()
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        for attempt in (1, 2):
            try:
                resp = self._session.request(method, self.url + path, timeout=self.timeout, **self._tls_options, **kwargs)
                break
            except requests.ConnectionError as exc:
                # A kept-alive connection that the server closed just as we reused it (the front
                # door closes idle connections when it reloads its routes): nothing was answered,
                # so send it again once, on a new connection. Every call of this API is idempotent
                # (RFC 9112 9.3.1 allows the retry then).
                if attempt == 1 and closed_without_answer(exc):
                    continue
                raise FleetError(f"cannot reach the fleet at {self.url}: is it up (`fleet up`)? ({exc})") from None
        if resp.status_code >= 400:
            raise_for_answer(resp.status_code, resp.content, resp.headers.get(ERROR_TYPE_HEADER))
        return resp

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        if self.shared_memory:
            return self._infer_shm(model, inputs, version, outputs)
        if self._grpc is not None:
            self.last_parameters, arrays, _ = self._grpc.infer(model, inputs, version=version, outputs=outputs)
            return arrays
        body, headers = encode_request(inputs, binary=self.binary, outputs=outputs)
        resp = self._request("POST", infer_path(model, version), data=body, headers=headers)
        header, arrays = decode_response(resp.content, resp.headers.get(HEADER_LENGTH))
        self.last_parameters = header.get("parameters", {})
        return arrays

    def _infer_shm(self, model: str, inputs: dict[str, np.ndarray], version: str | None,
                   outputs: list[str] | None) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        specs = self._output_specs.get((model, version))
        if specs is None:
            specs = self._output_specs[(model, version)] = self.model_metadata(model, version)["outputs"]
        wanted = outputs or [s["name"] for s in specs]
        plan = self._arena.place(arrays, [s for s in specs if s["name"] in wanted], batch_rows(arrays))
        rest = {n: a for n, a in arrays.items() if n not in plan.inputs}
        if self._grpc is not None:
            self.last_parameters, received, written = self._grpc.infer(
                model, rest, version=version, outputs=wanted, shm_inputs=plan.inputs, shm_outputs=plan.outputs)
            described = [(n, w.datatype, list(w.shape)) for n, w in written.items()]
        else:
            body, headers = encode_request(rest, binary=self.binary, outputs=wanted, shm_inputs=plan.inputs,
                                           shm_outputs=plan.outputs)
            resp = self._request("POST", infer_path(model, version), data=body, headers=headers)
            header, received = decode_response(resp.content, resp.headers.get(HEADER_LENGTH))
            self.last_parameters = header.get("parameters", {})
            described = written_outputs(header, received)
        result = dict(received)
        for name, datatype, shape in described:  # written into the region: copied out of it
            result[name] = self._arena.read(plan.outputs[name], datatype, shape)
        return {name: result[name] for name in wanted if name in result}

    # ---- system shared memory (Triton's extension; tritonclient's method names) -------
    def register_system_shared_memory(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        """Register ``byte_size`` bytes at ``offset`` of the POSIX shared memory object ``key``
        (on a host of the fleet) as region ``name``."""
        if self._grpc is not None:
            return self._grpc.register_system_shared_memory(name, key, byte_size, offset)
        self._request("POST", f"/v2/systemsharedmemory/region/{name}/register",
                      json={"key": key, "offset": offset, "byte_size": byte_size})

    def unregister_system_shared_memory(self, name: str | None = None) -> None:
        """Unregister one region (None: every region of the fleet)."""
        if self._grpc is not None:
            return self._grpc.unregister_system_shared_memory(name)
        path = f"/v2/systemsharedmemory/region/{name}/unregister" if name else "/v2/systemsharedmemory/unregister"
        self._request("POST", path)

    def get_system_shared_memory_status(self, name: str | None = None) -> list[dict]:
        if self._grpc is not None:
            return self._grpc.get_system_shared_memory_status(name)
        path = f"/v2/systemsharedmemory/region/{name}/status" if name else "/v2/systemsharedmemory/status"
        return self._request("GET", path).json()

    def infer_many(
        self,
        model: str,
        batches: Iterable[dict[str, np.ndarray]],
        *,
        concurrency: int = 8,
        version: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Pipeline many requests with at most ``concurrency`` in flight; results in order."""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            clients = [FleetClient(self.url, token=self._token, timeout=self.timeout, binary=self.binary,
                                   shared_memory=self.shared_memory, protocol=self.protocol, tls=self.tls)
                       for _ in range(concurrency)]
            try:
                futures = [
                    pool.submit(clients[i % concurrency].infer, model, feeds, version=version)
                    for i, feeds in enumerate(batches)
                ]
                return [f.result() for f in futures]
            finally:
                for c in clients:
                    c.close()

    def models(self) -> list[dict]:
        if self._grpc is not None:
            return self._grpc.models()
        return self._request("POST", "/v2/repository/index").json()

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        if self._grpc is not None:
            return self._grpc.model_metadata(model, version)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        return self._request("GET", path).json()

    def status(self) -> dict:
        if self._grpc is not None:
            raise FleetError("the fleet's status is served over HTTP: use FleetClient(http_url).status()")
        return self._request("GET", "/v2/fleet/status").json()

    def ready(self) -> bool:
        if self._grpc is not None:
            return self._grpc.ready()
        try:
            return self._session.get(self.url + "/v2/health/ready", timeout=self.timeout, **self._tls_options).status_code == 200
        except requests.ConnectionError:
            return False

    def load(self, model: str) -> dict:
        if self._grpc is not None:
            return self._grpc.load(model)
        return self._request("POST", f"/v2/repository/models/{model}/load").json()

    def unload(self, model: str) -> dict:
        if self._grpc is not None:
            return self._grpc.unload(model)
        return self._request("POST", f"/v2/repository/models/{model}/unload").json()


def infer_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


class AsyncFleetClient:
    """asyncio variant of FleetClient (aiohttp)."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 60.0, binary: bool = True,
                 tls: ClientTls | None = None):
        self.url = url.rstrip("/")
        self._ssl = tls.ssl_context() if tls is not None else None
        self.binary = binary
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "AsyncFleetClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout, connector=connector)
        return self._session

    async def _request(self, method: str, path: str, **kwargs) -> tuple[bytes, dict]:
        try:
            async with self._sess().request(method, self.url + path, **kwargs) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise_for_answer(resp.status, body, resp.headers.get(ERROR_TYPE_HEADER))
                return body, {k.lower(): v for k, v in resp.headers.items()}
        except aiohttp.ClientConnectionError as exc:
            raise FleetError(f"cannot reach the fleet at {self.url}: {exc}") from None

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None) -> dict[str, np.ndarray]:
        body, headers = encode_request(inputs, binary=self.binary)
        content, resp_headers = await self._request("POST", infer_path(model, version), data=body, headers=headers)
        return decode_response(content, resp_headers.get(HEADER_LENGTH))[1]

    async def infer_many(self, model: str, batches: Iterable[dict[str, np.ndarray]], *, concurrency: int = 8) -> list[dict[str, np.ndarray]]:
        gate = asyncio.Semaphore(concurrency)

        async def one(feeds):
            async with gate:
                return await self.infer(model, feeds)

        return await asyncio.gather(*(one(f) for f in batches))

    async def status(self) -> dict:
        import json

        return json.loads((await self._request("GET", "/v2/fleet/status"))[0])
