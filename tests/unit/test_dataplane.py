"""The ingress's data plane without Ray: routing, the miss path, retries (tests/unit/fleet_doubles.py)."""

import asyncio

import numpy as np
import pytest

from cluster.dataplane import DataPlane
from tests.unit.fleet_doubles import FakeController, FakeWorker, manifest
from workers.errors import InvalidInput, ModelNotFound, SharedMemoryError, WorkerLost
from workers.kserve.codec import InferRequest, RequestedOutput
from workers.shm import ShmRef

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def plane_with(*workers: FakeWorker, manifests=None):
    controller = FakeController(list(workers), manifests or [manifest("m75", "7.5"), manifest("m61", "6.1")])
    return controller, DataPlane(controller)


def two_holders_of_m75() -> tuple[FakeWorker, FakeWorker]:
    a, b = FakeWorker("t4-a"), FakeWorker("t4-b")
    for w in (a, b):
        w.loaded[manifest("m75").engine_key] = manifest("m75")
    return a, b


def serve(plane, model, request=None, version=None):
    return asyncio.run(plane.serve(model, version, request or InferRequest({"input": X})))


def test_a_hit_goes_to_a_holder_and_says_who_served_it():
    t4 = FakeWorker("t4")
    t4.loaded[manifest("m75").engine_key] = manifest("m75")
    controller, plane = plane_with(t4, FakeWorker("p4", "6.1"))
    served = serve(plane, "m75")
    np.testing.assert_array_equal(served.outputs["input"], X * 2)
    assert served.version == "1" and served.parameters["fleet_worker"] == "t4"
    assert served.parameters["compute_capability"] == "7.5" and served.parameters["simulated"] is True
    assert controller.ensure_loaded.calls == []


def test_a_miss_loads_once_and_routes_by_the_placement_it_gets_back():
    controller, plane = plane_with(FakeWorker("t4"), FakeWorker("p4", "6.1"))
    asyncio.run(plane.refresh())
    controller.inventory.calls.clear()
    served = serve(plane, "m61")
    assert served.parameters["fleet_worker"] == "p4"
    assert len(controller.ensure_loaded.calls) == 1
    # the placement was taken as it came: no second look at the whole inventory for it
    assert controller.inventory.calls == []
    serve(plane, "m61")
    assert len(controller.ensure_loaded.calls) == 1  # now a hit


def test_bad_input_is_refused_before_anything_loads_for_it():
    controller, plane = plane_with(FakeWorker("t4"))
    with pytest.raises(InvalidInput, match="dimension 1 is 3, expected 4"):
        serve(plane, "m75", InferRequest({"input": np.zeros((1, 3), np.float32)}))
    assert controller.ensure_loaded.calls == []
    with pytest.raises(ModelNotFound):
        serve(plane, "nope")


def test_an_engine_evicted_under_the_call_is_reported_and_tried_again():
    a, b = two_holders_of_m75()
    a.evicted_under_caller = b.evicted_under_caller = True
    controller, plane = plane_with(a, b)
    assert serve(plane, "m75").parameters["fleet_worker"] in {"t4-a", "t4-b"}
    assert controller.reported and set(controller.reported) <= {"t4-a", "t4-b"}


def test_a_worker_that_died_is_routed_around_and_reported():
    a, b = two_holders_of_m75()
    controller, plane = plane_with(a, b)
    asyncio.run(plane.refresh(force=True))
    a.dead = True
    plane.router.workers["t4-b"].outstanding = 5  # the least loaded choice is the dead one
    assert serve(plane, "m75").parameters["fleet_worker"] == "t4-b"
    assert "t4-a" in controller.reported


def test_a_worker_replaced_under_the_same_id_is_found_through_its_new_handle():
    """Another ingress replica may see the replacement first: this one last saw the worker dead,
    and the placement names the same id; it must fetch the new handle, not route to none."""
    old = FakeWorker("p4", "6.1")
    controller, plane = plane_with(old)
    asyncio.run(plane.refresh(force=True))
    old.dead = True
    controller.changed()
    asyncio.run(plane.refresh(force=True))
    assert not plane.router.workers["p4"].alive
    controller.workers["p4"] = FakeWorker("p4", "6.1")  # the replacement: same id, a new actor
    controller.changed()
    served = serve(plane, "m61")  # within REFRESH_PERIOD_S: only the placement tells it
    assert served.parameters["fleet_worker"] == "p4"
    assert plane.handles["p4"] is controller.workers["p4"]


def test_every_holder_dead_ends_in_a_clear_worker_lost():
    a = FakeWorker("t4-a")
    a.loaded[manifest("m75").engine_key] = manifest("m75")
    controller, plane = plane_with(a)
    asyncio.run(plane.refresh(force=True))
    a.dead = True
    controller.workers.clear()  # the controller cannot place it anywhere either
    with pytest.raises(WorkerLost, match="died while serving 'm75'"):
        serve(plane, "m75")


def test_shared_memory_requests_go_only_to_workers_that_mapped_the_region():
    a, b = two_holders_of_m75()
    controller, plane = plane_with(a, b)
    request = InferRequest({"input": X}, outputs=[RequestedOutput("input", False, ShmRef("r1", 32))])
    with pytest.raises(SharedMemoryError, match="'r1' is not registered"):
        serve(plane, "m75", request)
    controller.shm = {"r1": frozenset({"t4-b"})}
    controller.changed()
    for _ in range(4):
        assert serve(plane, "m75", request).parameters["fleet_worker"] == "t4-b"


def test_a_region_this_process_registered_routes_without_reading_the_inventory_again():
    a, b = two_holders_of_m75()
    controller, plane = plane_with(a, b)
    asyncio.run(plane.refresh(force=True))
    controller.inventory.calls.clear()
    plane.region_mapped("r1", ["t4-a"])  # what the controller answered the registration
    request = InferRequest({"input": X}, outputs=[RequestedOutput("input", False, ShmRef("r1", 32))])
    assert serve(plane, "m75", request).parameters["fleet_worker"] == "t4-a"
    assert controller.inventory.calls == []  # a job's first parts each forced one (a batch job: 7 of its first 10)
    plane.region_gone("r1")
    with pytest.raises(SharedMemoryError, match="'r1' is not registered"):
        serve(plane, "m75", request)
