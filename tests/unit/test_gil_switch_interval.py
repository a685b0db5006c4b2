"""``gil_switch_interval_ms``: from the fleet's config, validated, to every worker's spec, and applied
in the worker's process (``sys.setswitchinterval``): an engine thread back from a GPU run waits up to
this long for a busy Python thread to let go of the GIL (``benchmarks.batcher_gil`` measures it)."""

import sys

import pytest
from pydantic import ValidationError

from cluster.config import FleetConfig
from cluster.controller.plan import plan_node
from workers.actor import FleetWorker, WorkerSpec


def _node() -> dict:
    return {"NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7", "Alive": True,
            "Labels": {"fleet.gpu": "T4", "fleet.cc": "7.5"}, "Resources": {"GPU": 2, "CPU": 8}}


def test_the_config_reaches_every_workers_spec_and_is_validated():
    specs = plan_node(FleetConfig(gil_switch_interval_ms=0.5), _node())
    assert len(specs) == 2 and {spec.gil_switch_interval_ms for spec, _ in specs} == {0.5}
    assert {spec.gil_switch_interval_ms for spec, _ in plan_node(FleetConfig(), _node())} == {None}  # Python's own
    for bad in (0, -1, 1000):
        with pytest.raises(ValidationError, match="gil_switch_interval_ms"):
            FleetConfig(gil_switch_interval_ms=bad)


def test_a_worker_applies_it_to_its_process():
    before = sys.getswitchinterval()
    try:
        FleetWorker(WorkerSpec("w-gil", gil_switch_interval_ms=0.5))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        FleetWorker(WorkerSpec("w-default"))  # None leaves the process's setting alone
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_client_shm_pinning_reaches_every_workers_spec_and_is_validated():
    assert {spec.shm_pinning for spec, _ in plan_node(FleetConfig(), _node())} == {"background"}
    assert {spec.shm_pinning for spec, _ in plan_node(FleetConfig(client_shm_pinning="off"), _node())} == {"off"}
    with pytest.raises(ValidationError, match="client_shm_pinning"):
        FleetConfig(client_shm_pinning="later")
