"""One exception hierarchy for the whole system.

The HTTP layer, the Python client and the batch job all speak these types. Each
class carries its HTTP status, so the mapping lives in exactly one place; the
client maps a status (plus the ``X-Fleet-Error`` header) back to the same type.
Every exception takes a single message argument so it pickles across Ray.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error forward-fleet raises on purpose."""

    http_status = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidInput(FleetError):
    """The request is malformed or does not match the model's inputs."""

    http_status = 400


class SharedMemoryError(InvalidInput):
    """A system shared memory region that cannot be registered or used as asked."""


class InvalidConfig(FleetError):
    """A config file, CLI option or build option is wrong."""

    http_status = 400


class Unauthorized(FleetError):
    http_status = 401


class ModelNotFound(FleetError):
    http_status = 404


class PayloadTooLarge(FleetError):
    http_status = 413


class NotReady(FleetError):
    """The fleet or a model is starting up, or no worker is alive."""

    http_status = 503


class EngineNotHere(NotReady):
    """This worker holds no engine of the model (evicted a moment ago, or never here):
    another worker or the ingress must serve the request."""


class Overloaded(NotReady):
    """The engine's queue is full (``max_queue_size``): answered at once, try again a moment later."""

    retry_after_s = 1


class RepositoryUnavailable(NotReady):
    """The engine repository (an object store, or the head's directory) cannot be reached now:
    builds and loads wait for it; what is loaded keeps serving."""


class NoCapacity(FleetError):
    """No compatible device has budget left for the engine."""

    http_status = 503


class NoCompatibleWorker(FleetError):
    """No worker in the fleet can run any artifact of the model."""

    http_status = 503


class IncompatibleArtifact(FleetError):
    """A worker refused an artifact that was built for another target."""

    http_status = 409


class ArtifactCorrupt(FleetError):
    """An artifact's bytes do not match the sha256 in its manifest."""

    http_status = 500


class BuildError(FleetError):
    """Building an artifact failed (parser error, accuracy check, ...)."""

    http_status = 500


class WorkerLost(FleetError):
    """The worker died while serving; the request may be retried elsewhere."""

    http_status = 503


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
        NoCapacity,
        NoCompatibleWorker,
        IncompatibleArtifact,
        ArtifactCorrupt,
        BuildError,
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


def error_from_wire(status: int, message: str, type_name: str | None = None) -> FleetError:
    """Rebuild the server's exception on the client side."""
    cls = ERROR_TYPES.get(type_name or "") or _BY_STATUS.get(status, FleetError)
    return cls(message)
