"""The front door's routes and HAProxy configuration: pure, no processes, no Ray.

``POST /v2/models/{m}[/versions/{v}]/infer`` goes straight to the HTTP endpoint of a
worker that holds an engine of that model (``workers/http.py``), least connections
first. Everything else, and a model that no worker holds right now, goes to the Ray
Serve ingress. The backends list only workers the router found compatible
(``can_run``) and holding the engine, so the routing rules stay where they are.

With gRPC on, a second frontend on the gRPC port (HTTP/2) does the same for
``ModelInfer``: HAProxy reads the model's name and version out of the buffered protobuf
body (its ``ungrpc`` converter: fields 1 and 2 of ``ModelInferRequest``) and sends the
request over HTTP/1.1 to a holder's HTTP endpoint, which answers gRPC there
(``workers/grpc_http1.py``). Everything else
(a miss, a body larger than HAProxy's buffer, streams, every other call) goes to the
fleet's gRPC router (``grpc_router.py``), as the rest of HTTP goes to the ingress.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import NotReady, WorkerLost
from workers.kserve.handler import error_answer

from cluster.router import Router


@dataclass(frozen=True)
class Server:
    name: str  # the worker id
    host: str
    port: int
    grpc_port: int | None = None  # the worker's own gRPC endpoint (the gRPC router's route); set: it answers gRPC


@dataclass(frozen=True)
class Route:
    model: str
    version: str  # "": the unversioned path only (workers serving different default versions)
    latest: bool  # also serves the unversioned path
    servers: tuple[Server, ...]


def routes_from(router: Router, http_addresses: dict[str, tuple[str, int]],
                grpc_ports: dict[str, int] | None = None) -> list[Route]:
    """One route per (model, version) that some live worker with an HTTP endpoint holds. The
    unversioned path goes to the workers holding their own default version (cluster.rollout): the
    route of that version when all of them serve the same one, else a route of its own (a worker
    answers an unversioned request with its default, which the controller told it). A holder out
    of reach for now (its host's link) stays a server: HAProxy's own checks mark it down (and end
    what it had in flight) and up again, with no reload."""
    routes = []
    grpc_ports = grpc_ports or {}

    def servers_of(workers) -> tuple[Server, ...]:
        return tuple(Server(w, *http_addresses[w], grpc_ports.get(w)) for w in sorted(workers) if w in http_addresses)

    for model, versions in router.models().items():
        # the unversioned path too keeps a holder out of reach: its checks bring it back in seconds,
        # not the controller's health call, which waits on the TCP connection the cut stalled
        default_of = {c.worker_id: router.defaults(model)[c.worker_id] for c in router.unpinned_holders(model)}
        default_of.update(router.standby_defaults(model))
        unpinned = servers_of(default_of)
        defaults = {default_of[s.name] for s in unpinned}
        shared = next(iter(defaults)) if len(defaults) == 1 else None
        for version in versions:
            servers = servers_of({*router.holders(model, version), *router.standby_holders(model, version)})
            if servers:
                routes.append(Route(model, version, version == shared and servers == unpinned, servers))
        if unpinned and not any(r.latest for r in routes if r.model == model):
            routes.append(Route(model, "", True, unpinned))
    return routes


# HAProxy's own errors, as the fleet answers errors (the same ``error_answer``): JSON with a
# type the client maps back to an exception. 502 (a worker died mid-request, retries spent)
# and 504 become 503s: try again. HAProxy closes the client's connection after such an
# answer, so it says so (a client that reused the connection would otherwise see it closed
# under its next request).
ERRORS = {
    502: WorkerLost("the worker serving this model went away before answering; try again"),
    503: NotReady("no worker can take this request right now; try again"),
    504: WorkerLost("the worker serving this model did not answer in time; try again"),
}


def error_response(code: int) -> bytes:
    """The raw HTTP response HAProxy sends for its own error ``code`` (an errorfile)."""
    answer = error_answer(ERRORS[code])
    head = [f"HTTP/1.1 {answer.status} Service Unavailable"]
    head += [f"{k}: {v}" for k, v in answer.headers]
    head += ["cache-control: no-cache", f"content-length: {answer.size}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + answer.content()


GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
GRPC_MISS_HEADER = "x-fleet-miss"  # a worker passes on a request it cannot serve: to the gRPC router


@dataclass(frozen=True)
class TlsFiles:
    """Where HAProxy finds the certificate chain and key (one PEM), and the client CA for mutual TLS."""

    crt: str
    client_ca: str | None = None

    def bind_options(self, alpn: str) -> str:
        verify = f" ca-file {self.client_ca} verify required" if self.client_ca else ""
        return f" ssl crt {self.crt} alpn {alpn}{verify}"


@dataclass(frozen=True)
class GrpcFrontend:
    bind: tuple[str, int]  # the fleet's gRPC port
    router: tuple[str, int]  # the gRPC router, beside HAProxy


def _grpc_config(routes: list[Route], grpc: GrpcFrontend, tls: TlsFiles | None,
                 worker_token: str | None = None) -> list[str]:
    """The gRPC frontend: ModelInfer of a held model straight to a holder (its HTTP endpoint), the rest to the router."""
    lines = [
        "frontend fleet_grpc",
        f"    bind {grpc.bind[0]}:{grpc.bind[1]}{tls.bind_options('h2') if tls else ''} proto h2",
        f"    acl grpc_infer path {GRPC_INFER_PATH}",
        f"    acl grpc_miss req.hdr({GRPC_MISS_HEADER}) -m found",
        # the body of a unary ModelInfer only (a stream's body never ends): up to the buffer's size
        "    http-request wait-for-body time 1s if grpc_infer !grpc_miss",
        "    http-request set-var(txn.model) req.body,ungrpc(1) if grpc_infer !grpc_miss",
        "    http-request set-var(txn.version) req.body,ungrpc(2) if grpc_infer !grpc_miss",
        "    acl grpc_versioned var(txn.version) -m found",
    ]
    for i, route in enumerate(routes):
        servers = [s for s in route.servers if s.grpc_port]
        if not servers:
            continue
        model = f"{{ var(txn.model) -m str {route.model} }}"
        up = f"{{ nbsrv(grpc_model_{i}) gt 0 }}"
        if route.version:
            lines.append(f"    use_backend grpc_model_{i} if grpc_infer !grpc_miss {model} "
                         f"{{ var(txn.version) -m str {route.version} }} {up}")
        if route.latest:
            lines.append(f"    use_backend grpc_model_{i} if grpc_infer !grpc_miss {model} !grpc_versioned {up}")
    lines += ["    default_backend grpc_router", ""]
    for i, route in enumerate(routes):
        servers = [s for s in route.servers if s.grpc_port]
        if not servers:
            continue
        lines += [f"backend grpc_model_{i}", f"    # {route.model} version {route.version or '(each worker its default)'}",
                  "    balance leastconn", "    option httpchk GET /v2/health/live"]
        if worker_token:
            lines.append(f'    http-request set-header authorization "Bearer {worker_token}"')
        # to the worker's HTTP endpoint over HTTP/1.1 (workers/grpc_http1.py): HAProxy converts
        # HTTP/2 and its trailers, and the worker is spared Python's gRPC server
        lines += [f"    server {s.name} {s.host}:{s.port} proto h1 check inter 2s fall 2 rise 1 observe layer4 "
                  f"error-limit 1 on-error mark-down tcp-ut 3s" for s in servers]
        lines += [f"    server router {grpc.router[0]}:{grpc.router[1]} proto h2 backup", ""]
    lines += ["backend grpc_router", f"    server router {grpc.router[0]}:{grpc.router[1]} proto h2", ""]
    return lines


def render_config(routes: list[Route], *, bind: tuple[str, int], ingress: tuple[str, int], admin_socket: str,
                  threads: int = 1, maxconn: int = 4096, errors_dir: str | None = None,
                  grpc: GrpcFrontend | None = None, tls: TlsFiles | None = None,
                  worker_token: str | None = None) -> str:
    """The HAProxy configuration for these routes (model names are already validated: [A-Za-z0-9_.-]).
    With ``tls``, both frontends speak TLS only.

    ``worker_token``: the fleet's token, which workers' endpoints require (they are on the network)
    while the fleet's own port lets inference in without one: HAProxy presents it for the client."""
    lines = [
        "global",
        f"    maxconn {maxconn}",
        f"    nbthread {threads}",
        f"    stats socket {admin_socket} mode 600 level admin",
        "    tune.bufsize 65536",
        "    hard-stop-after 60s",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        # On reload, an idle keep-alive connection is closed only after its next response (with
        # "Connection: close"), never under a request the client is sending right then.
        "    option idle-close-on-response",
        "    http-reuse always",
        "    timeout connect 5s",
        # A worker whose host is cut off answers no check: down after two (inter 2s). What it had in
        # flight fails within ~3 s, as a 503 (HAProxy's 502 errorfile), not after timeout server: TCP
        # keep-alive probes find a silent peer under a request that waits for its answer, and the
        # TCP user timeout (tcp-ut) one under a request whose bytes go unacknowledged. A live host
        # acknowledges both, however long its inference takes.
        "    timeout check 2s",
        "    option srvtcpka",
        "    srvtcpka-idle 1s",
        "    srvtcpka-intvl 1s",
        "    srvtcpka-cnt 2",
        "    timeout client 300s",
        "    timeout server 300s",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        # A worker that refuses the connection (it died): try another holder. Connection-level
        # retries only: HAProxy's layer-7 retries (retry-on) closed the client's connection
        # without an answer when the last holder was gone; this way it answers 503 JSON.
        "    retries 2",
        # A worker's host cut off under a request: the TCP timers below end its connection, and the
        # request (inference is idempotent; up to tune.bufsize) is sent to another holder. HAProxy
        # would otherwise close a keep-alive client's connection without an answer.
        "    retry-on conn-failure empty-response",
        "    option redispatch 1",
        *([f"    errorfile {code} {errors_dir}/e{code}.http" for code in ERRORS] if errors_dir else []),
        "",
        "frontend fleet",
        f"    bind {bind[0]}:{bind[1]}{tls.bind_options('http/1.1') if tls else ''}",
    ]
    for i, route in enumerate(routes):
        paths = [f"/v2/models/{route.model}/versions/{route.version}/infer"] if route.version else []
        if route.latest:
            paths.insert(0, f"/v2/models/{route.model}/infer")
        lines.append(f"    acl infer_{i} path {' '.join(paths)}")
        lines.append(f"    use_backend model_{i} if METH_POST infer_{i} {{ nbsrv(model_{i}) gt 0 }}")
    lines += ["    default_backend ingress", ""]
    for i, route in enumerate(routes):
        lines += [
            f"backend model_{i}",
            f"    # {route.model} version {route.version or '(each worker its default)'}",
            "    balance leastconn",
            "    option httpchk GET /v2/health/live",
            *([f'    http-request set-header authorization "Bearer {worker_token}"'] if worker_token else []),
        ]
        # A refused connection marks a worker down at once: leastconn would otherwise pick the
        # dead worker (it has the fewest connections) for every retry until its check fails.
        lines += [f"    server {s.name} {s.host}:{s.port} check inter 2s fall 2 rise 1 observe layer4 error-limit 1 "
                  f"on-error mark-down tcp-ut 3s" for s in route.servers]
        # When every holder is down (a worker died and the routes do not know yet), the retry goes to
        # the ingress, which routes around the dead worker, instead of answering 503.
        lines.append(f"    server ingress {ingress[0]}:{ingress[1]} backup")
        lines.append("")
    lines += ["backend ingress", f"    server serve {ingress[0]}:{ingress[1]}", ""]
    if grpc is not None:
        lines += _grpc_config(routes, grpc, tls, worker_token)
    return "\n".join(lines)


