"""The controller's view of the head's GCS (cluster/controller/head.py) and its config."""

import asyncio
import socket

import pytest

from cluster.config import GcsFaultTolerance, InvalidConfig, load_config
from cluster.controller.head import GcsWatch
from workers.errors import HeadUnavailable


def test_a_listening_port_is_up_and_a_closed_one_is_down():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert asyncio.run(GcsWatch(f"127.0.0.1:{port}").probe())
    assert not asyncio.run(GcsWatch(f"127.0.0.1:{port}").probe())  # closed now: refused at once


def test_outages_are_timed_and_calls_that_need_the_gcs_are_refused_meanwhile():
    now = [1000.0]
    watch = GcsWatch("10.0.0.1:6379", clock=lambda: now[0])
    watch.require("loading x")  # up: nothing happens
    assert watch.observe(True) is None
    assert watch.observe(False) == "down" and watch.observe(False) is None
    now[0] += 12
    with pytest.raises(HeadUnavailable) as refused:
        watch.require("loading digits-mlp")
    message = str(refused.value)
    assert "loading digits-mlp needs the head's GCS (10.0.0.1:6379)" in message and "(12 s)" in message
    assert "models already loaded keep serving" in message
    assert refused.value.http_status == 503 and refused.value.retry_after_s == 5
    now[0] += 3
    assert watch.observe(True) == "back"
    assert watch.to_dict() == {"address": "10.0.0.1:6379", "up": True, "down_since": None, "outages": 1,
                               "last_outage_s": 15.0}
    watch.require("loading x")


def test_gcs_fault_tolerance_config():
    assert not GcsFaultTolerance().enabled
    local = GcsFaultTolerance(redis="local", local_redis_port=7000)
    assert local.enabled and local.redis_address() == "127.0.0.1:7000"
    assert GcsFaultTolerance(redis="redis.internal:6379").redis_address() == "redis.internal:6379"
    for bad in ("redis.internal", "host:port", ":6379", "h:70000"):
        with pytest.raises(ValueError, match='host:port or "local"'):
            GcsFaultTolerance(redis=bad)


def test_an_unknown_field_of_gcs_fault_tolerance_is_refused(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text("gcs_fault_tolerance:\n  redis_url: redis://x\n")
    with pytest.raises(InvalidConfig, match="redis_url"):
        load_config(config)
