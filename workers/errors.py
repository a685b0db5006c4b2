"""One exception hierarchy for the whole system.

The HTTP and gRPC layers, the Python client and the batch job all speak these types.
Each class carries its HTTP status and its gRPC status code (by name: no grpc import
here), so each mapping lives in exactly one place; the client maps a status (plus the
``X-Fleet-Error`` header, or the same key in gRPC trailing metadata) back to the same
type. Every exception takes a single message argument so it pickles across Ray.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error forward-fleet raises on purpose."""

    http_status = 500
    grpc_status = "INTERNAL"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidInput(FleetError):
    """The request is malformed or does not match the model's inputs."""

    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class SharedMemoryError(InvalidInput):
    """A system shared memory region that cannot be registered or used as asked."""


class InvalidConfig(FleetError):
    """A config file, CLI option or build option is wrong."""

    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class Unauthorized(FleetError):
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class ModelNotFound(FleetError):
    http_status = 404
    grpc_status = "NOT_FOUND"


class PayloadTooLarge(FleetError):
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class NotReady(FleetError):
    """The fleet or a model is starting up, or no worker is alive."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class EngineNotHere(NotReady):
    """This worker holds no engine of the model (evicted a moment ago, or never here):
    another worker or the ingress must serve the request."""


class Overloaded(NotReady):
    """The engine's queue is full (``max_queue_size``): answered at once, try again a moment later."""

    retry_after_s = 1


class RepositoryUnavailable(NotReady):
    """The engine repository (an object store, or the head's directory) cannot be reached now:
    builds and loads wait for it; what is loaded keeps serving."""


class HeadUnavailable(NotReady):
    """The head's GCS does not answer (it died and is coming back, with GCS fault tolerance):
    loads and builds wait for it; engines already loaded keep serving."""

    retry_after_s = 5


class NoCapacity(FleetError):
    """No compatible device has budget left for the engine."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class NoCompatibleWorker(FleetError):
    """No worker in the fleet can run any artifact of the model."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class IncompatibleArtifact(FleetError):
    """A worker refused an artifact that was built for another target."""

    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


class ArtifactCorrupt(FleetError):
    """An artifact's bytes do not match the sha256 in its manifest."""

    http_status = 500
    grpc_status = "DATA_LOSS"


class BuildError(FleetError):
    """Building an artifact failed (parser error, accuracy check, ...)."""

    http_status = 500
    grpc_status = "INTERNAL"


class WarmupFailed(FleetError):
    """A model's warm-up request (Triton's ``model_warmup``) failed: the engine is not put in service."""

    http_status = 500
    grpc_status = "INTERNAL"


class ImportRefused(InvalidConfig):
    """A model of a Triton model repository that the fleet cannot serve as its configuration says
    (fields it does not serve, inputs or outputs that do not match the model's own, missing files)."""


class UnknownNode(FleetError):
    """A command names a node (host) the fleet does not have."""

    http_status = 404
    grpc_status = "NOT_FOUND"


class UpgradeRefused(InvalidInput):
    """A runtime upgrade that cannot be done as asked (the version it has already, one its GPUs
    cannot run, a worker not up): nothing was changed."""


class SourceNotKept(UpgradeRefused):
    """A rebuild needs a model's source ONNX and the repository does not keep it (built before
    builds kept their sources): build it again with `fleet build`."""


class WorkerLost(FleetError):
    """The worker died while serving; the request may be retried elsewhere."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class DeviceFailed(WorkerLost):
    """The worker's GPU context is broken (an illegal memory access and the like are sticky: every
    later CUDA call fails); the fleet restarts the worker, and the request may go elsewhere."""


ERROR_TYPES: dict[str, type[FleetError]] = {
    cls.__name__: cls
    for cls in (
        FleetError,
        InvalidInput,
        SharedMemoryError,
        InvalidConfig,
        Unauthorized,
        ModelNotFound,
        PayloadTooLarge,
        NotReady,
        EngineNotHere,
        Overloaded,
        RepositoryUnavailable,
        HeadUnavailable,
        NoCapacity,
        NoCompatibleWorker,
        IncompatibleArtifact,
        ArtifactCorrupt,
        BuildError,
        WarmupFailed,
        ImportRefused,
        UnknownNode,
        UpgradeRefused,
        SourceNotKept,
        WorkerLost,
        DeviceFailed,
    )
}

_BY_STATUS: dict[int, type[FleetError]] = {
    400: InvalidInput,
    401: Unauthorized,
    404: ModelNotFound,
    409: IncompatibleArtifact,
    413: PayloadTooLarge,
    503: NotReady,
}


_BY_GRPC_STATUS: dict[str, type[FleetError]] = {
    "INVALID_ARGUMENT": InvalidInput,
    "UNAUTHENTICATED": Unauthorized,
    "NOT_FOUND": ModelNotFound,
    "FAILED_PRECONDITION": IncompatibleArtifact,
    "RESOURCE_EXHAUSTED": PayloadTooLarge,
    "UNAVAILABLE": NotReady,
}


def error_from_wire(status: int, message: str, type_name: str | None = None) -> FleetError:
    """Rebuild the server's exception on the client side."""
    cls = ERROR_TYPES.get(type_name or "") or _BY_STATUS.get(status, FleetError)
    return cls(message)


def error_from_grpc(code_name: str, message: str, type_name: str | None = None) -> FleetError:
    """Rebuild the server's exception from a gRPC status (``StatusCode.X.name``) and trailing metadata."""
    cls = ERROR_TYPES.get(type_name or "") or _BY_GRPC_STATUS.get(code_name, FleetError)
    return cls(message)
