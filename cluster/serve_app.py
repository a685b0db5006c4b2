"""The HTTP entry point behind the front door: KServe v2 routes on a Ray Serve ingress deployment.

Routes are thin: they read bytes and headers and call the data plane or the
controller. Inference runs the same ``handle_infer`` as a worker's own endpoint;
every error body comes from ``error_answer`` (one table: ``workers.errors``).
"""


import asyncio
import json
import logging
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from workers.errors import FleetError, InvalidInput, PayloadTooLarge, SharedMemoryError
from workers.httpwire import DRAIN_BYTES
from workers.kserve.handler import (
    HttpAnswer,
    InferPolicy,
    check_bearer,
    error_answer,
    handle_infer,
    internal_error_answer,
    json_answer,
)
from workers.stats import RequestStats

from cluster.calls import call
from cluster.config import FleetConfig
from cluster.dataplane import DataPlane
from cluster.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cluster.metrics import render_metrics
from cluster.names import CONTROLLER_NAME, HEAD_NODE_RESOURCE, NAMESPACE
from cluster.status_page import render_status_page

log = logging.getLogger("forward-fleet.http")
SERVER_NAME = "forward-fleet"
SERVER_VERSION = "0.1.0"
STATS_REPORT_PERIOD_S = 1.0

app = FastAPI(title="forward-fleet", version=SERVER_VERSION, description="KServe v2 inference on a heterogeneous GPU fleet")


def respond(answer: HttpAnswer) -> Response:
    return Response(content=answer.content(), status_code=answer.status, headers=dict(answer.headers))


@app.exception_handler(FleetError)
async def _fleet_error(_: Request, exc: FleetError) -> Response:
    return respond(error_answer(exc))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return respond(error_answer(InvalidInput(f"invalid request: {exc.errors()}")))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = exc.detail if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
    return respond(json_answer(exc.status_code, {"error": str(message)}))


@app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> Response:
    log.exception("internal error")
    return respond(internal_error_answer(exc))


async def _drop_body(request: Request) -> None:
    """Read and drop a refused body, up to DRAIN_BYTES: clients that do not wait for "100 Continue"
    (urllib, requests, tritonclient) then read the answer instead of a connection reset."""
    dropped = 0
    async for chunk in request.stream():
        dropped += len(chunk)
        if dropped > DRAIN_BYTES:
            return


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


# The KServe v2 inference request, declared for /openapi.json (the handler parses raw bytes
# itself, so that binary bodies and exact error messages are under our control).
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                                 "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
                    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                           "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
                },
            }},
        },
    },
}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE_RESOURCE})
@serve.ingress(app)
class FleetIngress:
    def __init__(self, config_json: str) -> None:
        self.config = FleetConfig.model_validate_json(config_json)
        self.controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        self.plane = DataPlane(self.controller)
        self.stats = RequestStats()
        self.policy = InferPolicy(self.config.max_request_bytes, self.config.auth_token, self.config.auth_inference)
        self._page = render_status_page()
        self._replica = uuid.uuid4().hex[:8]
        self._reporter: asyncio.Task | None = None

    async def _report_stats(self) -> None:
        # Every replica sends its numbers to the controller, which adds them up, so that
        # /metrics and the status page show the whole fleet whichever replica answers.
        while True:
            try:
                await call(self.controller.report_request_stats.remote(self._replica, self.stats.report()))
            except Exception:  # the controller restarting must not stop the reporting
                log.warning("could not report request stats", exc_info=True)
            await asyncio.sleep(STATS_REPORT_PERIOD_S)

    def _start_reporting(self) -> None:
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_stats())

    async def _fleet_stats(self) -> dict:
        await call(self.controller.report_request_stats.remote(self._replica, self.stats.report()))
        return await call(self.controller.request_stats.remote())

    def _authorize(self, request: Request, admin: bool) -> None:
        """Bearer token check: admin calls always (when a token is set), the rest if auth_inference."""
        token = self.config.auth_token
        if not token or not (admin or self.config.auth_inference):
            return
        check_bearer(request.headers.get("authorization"), token)

    # ---- health and metadata ---------------------------------------------------
    @app.get("/v2/health/live")
    async def live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ok = await self.plane.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata(self) -> dict:
        extensions = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
        if self.config.allow_client_shm:
            extensions.append("system_shared_memory")
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": extensions}

    # ---- Triton's model configuration and statistics extensions --------------------
    @app.get("/v2/models/stats")
    async def all_statistics(self, request: Request) -> dict:
        self._authorize(request, admin=False)
        return await call(self.controller.model_statistics.remote())

    @app.get("/v2/models/{model}/stats")
    async def model_statistics(self, model: str, request: Request) -> dict:
        return await self._model_view("model_statistics", request, model, None)

    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_version_statistics(self, model: str, version: str, request: Request) -> dict:
        return await self._model_view("model_statistics", request, model, version)

    @app.get("/v2/models/{model}/config")
    async def model_config(self, model: str, request: Request) -> dict:
        return await self._model_view("model_config", request, model, None)

    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_version_config(self, model: str, version: str, request: Request) -> dict:
        return await self._model_view("model_config", request, model, version)

    async def _model_view(self, what: str, request: Request, model: str, version: "str | None") -> dict:
        """The controller's ``model_statistics`` or ``model_config`` of a model (version) that exists."""
        self._authorize(request, admin=False)
        await self.plane.resolve(model, version)
        return await call(getattr(self.controller, what).remote(model, version))

    @app.get("/v2/models/{model}")
    async def model_metadata(self, model: str, request: Request) -> dict:
        self._authorize(request, admin=False)
        return await self.plane.metadata(model, None)

    @app.get("/v2/models/{model}/versions/{version}")
    async def model_version_metadata(self, model: str, version: str, request: Request) -> dict:
        self._authorize(request, admin=False)
        return await self.plane.metadata(model, version)

    @app.get("/v2/models/{model}/ready")
    async def model_ready(self, model: str, request: Request) -> Response:
        self._authorize(request, admin=False)
        return await self._ready(model, None)

    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_version_ready(self, model: str, version: str, request: Request) -> Response:
        self._authorize(request, admin=False)
        return await self._ready(model, version)

    async def _ready(self, model: str, version: "str | None") -> Response:
        ok = await self.plane.model_ready(model, version)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 400)

    # ---- inference -------------------------------------------------------------
    @app.post("/v2/models/{model}/infer", openapi_extra=INFER_OPENAPI)
    async def infer(self, model: str, request: Request) -> Response:
        return await self._infer(model, None, request)

    @app.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=INFER_OPENAPI)
    async def infer_version(self, model: str, version: str, request: Request) -> Response:
        return await self._infer(model, version, request)

    # Model names with encoded slashes ("..%2F..%2Fetc") land here: refuse them by name.
    @app.post("/v2/models/{model:path}/infer", include_in_schema=False)
    async def infer_bad_name(self, model: str, request: Request) -> Response:
        return await self._infer(model, None, request)

    async def _infer(self, model: str, version: "str | None", request: Request) -> Response:
        self._start_reporting()
        try:
            self.policy.admit(request.headers)  # 413 and 401 before the body is read
        except PayloadTooLarge:
            await _drop_body(request)  # the client may still be sending it: read the 413, not a reset
            raise
        answer = await handle_infer(model, version, await request.body(), request.headers, policy=self.policy,
                                    serve=self.plane.serve, stats=self.stats)
        return respond(answer)

    # ---- system shared memory (Triton's extension) --------------------------------
    @app.get("/v2/systemsharedmemory/status")
    async def shm_status(self, request: Request) -> list:
        self._authorize(request, admin=False)
        return await call(self.controller.shm_status.remote())

    @app.get("/v2/systemsharedmemory/region/{name}/status")
    async def shm_region_status(self, name: str, request: Request) -> list:
        self._authorize(request, admin=False)
        return await call(self.controller.shm_status.remote(name))

    @app.post("/v2/systemsharedmemory/region/{name}/register")
    async def shm_register(self, name: str, request: Request) -> dict:
        self._authorize(request, admin=True)
        body = await _json_body(request)
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str):
            raise SharedMemoryError("register needs 'key': the name of the POSIX shared memory object, e.g. '/my_input'")
        for field, value in (("offset", offset), ("byte_size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SharedMemoryError(f"register needs '{field}' as a non-negative integer, got {value!r}")
        await call(self.controller.register_shm.remote(name, key, offset, size))
        await self.plane.refresh(force=True)
        return {}

    @app.post("/v2/systemsharedmemory/region/{name}/unregister")
    async def shm_unregister(self, name: str, request: Request) -> dict:
        return await self._unregister_shm(request, name)

    @app.post("/v2/systemsharedmemory/unregister")
    async def shm_unregister_all(self, request: Request) -> dict:
        return await self._unregister_shm(request, None)

    async def _unregister_shm(self, request: Request, name: "str | None") -> dict:
        self._authorize(request, admin=True)
        await call(self.controller.unregister_shm.remote(name))
        await self.plane.refresh(force=True)
        return {}

    # ---- CUDA shared memory (Triton's extension): answered, not served ----------------
    @app.get("/v2/cudasharedmemory/status")
    async def cuda_shm_status(self, request: Request) -> list:
        self._authorize(request, admin=False)
        return []

    @app.get("/v2/cudasharedmemory/region/{name}/status")
    async def cuda_shm_region_status(self, name: str, request: Request) -> list:
        self._authorize(request, admin=False)
        raise SharedMemoryError(f"Unable to find cuda shared memory region: '{name}' (none is registered here)")

    @app.post("/v2/cudasharedmemory/region/{name}/register")
    async def cuda_shm_register(self, name: str, request: Request) -> dict:
        self._authorize(request, admin=True)
        await call(self.controller.cuda_shm_register.remote(name))
        return {}

    @app.post("/v2/cudasharedmemory/region/{name}/unregister")
    async def cuda_shm_unregister(self, name: str, request: Request) -> dict:
        self._authorize(request, admin=True)
        return {}

    @app.post("/v2/cudasharedmemory/unregister")
    async def cuda_shm_unregister_all(self, request: Request) -> dict:
        self._authorize(request, admin=True)
        return {}

    # ---- fleet and repository ----------------------------------------------------
    @app.get("/v2/fleet/status")
    async def fleet_status(self, request: Request) -> dict:
        self._authorize(request, admin=False)
        return await call(self.controller.status.remote())

    @app.post("/v2/repository/index")
    async def repository_index(self, request: Request) -> list:
        self._authorize(request, admin=True)
        body = await _json_body(request)
        index = await call(self.controller.repository_index.remote())
        if body.get("ready"):
            index = [m for m in index if m["state"] == "READY"]
        return index

    @app.post("/v2/repository/models/{model}/load")
    async def repository_load(self, model: str, request: Request) -> dict:
        self._authorize(request, admin=True)
        params = (await _json_body(request)).get("parameters") or {}
        try:
            if not isinstance(params, dict):
                raise InvalidInput("'parameters' must be an object")
            config = params.get("config")
            if config is not None and not isinstance(config, str):
                raise InvalidInput("parameters.config must be a string: the model configuration as JSON")
            if any(key.startswith("file:") for key in params):
                # Triton's answer and status (500 / INTERNAL), which its model control example checks
                raise FleetError("failed to poll from model repository: model files in a load request are not "
                                 "supported; publish the model to the fleet's repository (`fleet build`)")
            await self.plane.resolve(model, None)
            await call(self.controller.load.remote(model, config))
        except FleetError as exc:  # Triton's wording, which clients match on
            message = exc.message if exc.message.startswith("failed to load") else f"failed to load '{model}': {exc.message}"
            raise type(exc)(message) from None
        await self.plane.refresh(force=True)
        return {}

    @app.post("/v2/repository/models/{model}/unload")
    async def repository_unload(self, model: str, request: Request) -> dict:
        self._authorize(request, admin=True)
        await self.plane.resolve(model, None)
        await call(self.controller.unload.remote(model, None))
        await self.plane.refresh(force=True)
        return {}

    # ---- observability -----------------------------------------------------------
    @app.get("/v2/fleet/stats")
    async def fleet_stats(self, request: Request) -> dict:
        self._authorize(request, admin=False)
        return await self._fleet_stats()

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._authorize(request, admin=False)
        status = await call(self.controller.status.remote())
        return Response(content=render_metrics(status, await self._fleet_stats()), media_type=METRICS_CONTENT_TYPE)

    @app.get("/")
    async def status_page(self) -> HTMLResponse:
        return HTMLResponse(self._page)


def build_app(config: FleetConfig):
    return FleetIngress.options(
        max_ongoing_requests=config.max_ongoing_requests, num_replicas=config.ingress_replica_count()
    ).bind(config.model_dump_json())


__all__ = ["FleetIngress", "build_app"]
