import os

# The test process holds gRPC channels while it starts processes (ray start, HAProxy, perf_analyzer,
# wrk): gRPC's fork handlers then race its own threads, and one CI run died in grpcio with "Fatal
# Python error: Aborted". It only ever fork-execs, for which gRPC's documented setting is this
# (grpc/doc/fork_support.md). Before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from pathlib import Path

import atexit
import shutil
import tempfile

import pytest

from cluster.env import apply_ray_env
from cluster.net import free_port

# Serve's HAProxy keeps its config, socket and state under one directory and listens on
# fixed stats/metrics ports; give this test session its own, so that it never meets
# another Serve on the same machine. Short path: HAProxy allows 97 characters for its
# socket, and Ray adds a 56-character node id below this directory.
_haproxy = tempfile.mkdtemp(prefix="ffh", dir="/tmp")



os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", f"{_haproxy}/haproxy.cfg")
os.environ.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", f"{_haproxy}/admin.sock")
os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", _haproxy)
os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", f"{_haproxy}/server-state")

# Workers keep fetched artifacts in a per-host cache (workers/artifacts.py); this session's
# workers (and those of the Ray nodes it starts, which inherit it) use one of their own.
_artifact_cache = tempfile.mkdtemp(prefix="ffcache", dir="/tmp")
os.environ.setdefault("FLEET_ARTIFACT_CACHE", _artifact_cache)
atexit.register(shutil.rmtree, _artifact_cache, True)

# Ray reads RAY_AUTH_MODE at import: every Ray in the tests runs with token
# authentication on, as `fleet up` does, so child drivers and CLI calls match it.
apply_ray_env()


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict[str, Path]:
    """The real demo ONNX models, built once per test session."""
    from cluster.demo import make_demo_models

    return make_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def digits_test():
    from cluster.demo import digits_split

    _, X_test, _, y_test = digits_split()
    return X_test, y_test
