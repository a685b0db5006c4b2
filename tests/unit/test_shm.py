"""System shared memory: the worker's registry and the protocol's shared memory tensors,
against real POSIX shared memory objects (no Ray)."""

import json
import os
import threading
import time
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from workers.errors import InvalidInput, SharedMemoryError
from workers.kserve.client_codec import decode_response, encode_request
from workers.kserve.codec import ShmInput, ShmWritten, check_finite, decode_request, encode_response
from workers.kserve.shm_io import shm_feeds, shm_output_arrays, write_shm_outputs
from workers.shm import RegionNotHere, SharedMemoryRegistry, ShmRef
from workers.tensors import TensorSpec


@pytest.fixture
def shm_object():
    made = []

    def make(size: int) -> shared_memory.SharedMemory:
        shm = shared_memory.SharedMemory(name=f"fftest_{uuid.uuid4().hex[:10]}", create=True, size=size)
        made.append(shm)
        return shm

    yield make
    for shm in made:
        shm.close()
        shm.unlink()


@pytest.fixture
def registry():
    reg = SharedMemoryRegistry()
    yield reg
    reg.close()


def header_only(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_register_status_unregister(shm_object, registry):
    obj = shm_object(8192)
    info = registry.register("r1", "/" + obj.name, 4096, 1024)
    assert info.to_dict() == {"name": "r1", "key": "/" + obj.name, "offset": 4096, "byte_size": 1024}
    assert registry.status() == [dict(info.to_dict(), pinned=False)]
    assert registry.status("r1") == [dict(info.to_dict(), pinned=False)]
    with pytest.raises(SharedMemoryError, match="already registered"):
        registry.register("r1", "/" + obj.name, 0, 16)
    assert registry.unregister("r1") == ["r1"]
    assert registry.unregister("r1") == []  # unknown names are fine, as in Triton
    with pytest.raises(SharedMemoryError, match="not registered"):
        registry.status("r1")


def test_register_refuses_what_it_cannot_map(shm_object, registry):
    obj = shm_object(4096)
    with pytest.raises(RegionNotHere, match="does not exist on this host"):
        registry.register("gone", "/ff_no_such_object_" + uuid.uuid4().hex, 0, 16)
    with pytest.raises(SharedMemoryError, match="holds 4096 bytes"):
        registry.register("big", "/" + obj.name, 4000, 200)
    for bad_key in ("/../etc/passwd", "a/b", "", "/" + "x" * 300):
        with pytest.raises(SharedMemoryError, match="not a POSIX shared memory name"):
            registry.register("k", bad_key, 0, 16)
    with pytest.raises(SharedMemoryError, match="name"):
        registry.register("../r", "/" + obj.name, 0, 16)
    with pytest.raises(SharedMemoryError, match="more than 0"):
        registry.register("zero", "/" + obj.name, 0, 0)
    with pytest.raises(InvalidInput, match="non-negative"):
        registry.register("neg", "/" + obj.name, -1, 16)
    assert registry.names() == set()


def test_links_are_not_followed(tmp_path, registry):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 4096)
    link = f"fftest_link_{uuid.uuid4().hex[:8]}"
    os.symlink(target, f"/dev/shm/{link}")
    try:
        with pytest.raises(SharedMemoryError, match="cannot open"):
            registry.register("l", "/" + link, 0, 16)
    finally:
        os.unlink(f"/dev/shm/{link}")


def test_inputs_are_read_in_place_and_outputs_written(shm_object, registry):
    obj = shm_object(1 << 16)
    registry.register("io", "/" + obj.name, 0, 1 << 16)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=0)[:] = x
    request = decode_request(header_only({
        "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                    "parameters": {"shared_memory_region": "io", "shared_memory_byte_size": 48}}],
        "outputs": [{"name": "y", "parameters": {"shared_memory_region": "io", "shared_memory_byte_size": 1000,
                                                 "shared_memory_offset": 4096}},
                    {"name": "label", "parameters": {"binary_data": True}}],
    }))
    assert request.inputs == {} and request.regions() == {"io"}
    feeds = shm_feeds(request, registry)
    np.testing.assert_array_equal(feeds["x"], x)
    # in place: what the client writes now is what the worker sees
    np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=0)[0, 0] = 42
    assert feeds["x"][0, 0] == 42
    y = (feeds["x"] * 2).astype(np.float32)
    out = write_shm_outputs(request, {"y": y, "label": np.array([1, 2, 3])}, registry)
    assert out["y"] == ShmWritten(ShmRef("io", 48, 4096), "FP32", (3, 4))
    np.testing.assert_array_equal(np.ndarray((3, 4), np.float32, buffer=obj.buf, offset=4096), y)
    body, headers = encode_response("m", "1", out, request)
    header, arrays = decode_response(body, headers.get("inference-header-content-length"))
    y_entry = next(o for o in header["outputs"] if o["name"] == "y")
    # Triton's answer for an output in shared memory: no data, no parameters (its C++ client, perf_analyzer's,
    # reads any output's parameters as binary data and fails without binary_data_size)
    assert y_entry == {"name": "y", "datatype": "FP32", "shape": [3, 4]}
    assert set(arrays) == {"label"}  # y stays in shared memory
    del feeds


def test_bytes_tensors_in_shared_memory(shm_object, registry):
    obj = shm_object(4096)
    registry.register("s", "/" + obj.name, 0, 4096)
    from workers.kserve.codec import encode_bytes_tensor

    raw = encode_bytes_tensor(np.array([b"ab", b"", b"xyz"], dtype=object))
    obj.buf[:len(raw)] = raw
    request = decode_request(header_only({
        "inputs": [{"name": "t", "shape": [3], "datatype": "BYTES",
                    "parameters": {"shared_memory_region": "s", "shared_memory_byte_size": len(raw)}}],
        "outputs": [{"name": "t", "parameters": {"shared_memory_region": "s", "shared_memory_byte_size": 100,
                                                 "shared_memory_offset": 1024}}],
    }))
    feeds = shm_feeds(request, registry)
    assert list(feeds["t"]) == [b"ab", b"", b"xyz"]
    out = write_shm_outputs(request, {"t": feeds["t"]}, registry)
    assert out["t"].ref.byte_size == len(raw)
    assert bytes(obj.buf[1024:1024 + len(raw)]) == raw


@pytest.mark.parametrize("params, message", [
    ({"shared_memory_region": "io"}, "go together"),
    ({"shared_memory_byte_size": 48}, "go together"),
    ({"shared_memory_offset": 8}, "needs shared_memory_region"),
    ({"shared_memory_region": "io", "shared_memory_byte_size": -1}, "non-negative"),
    ({"shared_memory_region": "io", "shared_memory_byte_size": 47}, "does not match shape"),
    ({"shared_memory_region": 7, "shared_memory_byte_size": 48}, "region name"),
    ({"shared_memory_region": "io", "shared_memory_byte_size": 48, "binary_data_size": 48}, "also carries data"),
])
def test_bad_shared_memory_inputs_are_400s(params, message):
    with pytest.raises(InvalidInput, match=message):
        decode_request(header_only({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                                "parameters": params}]}))


def test_region_errors_name_the_problem(shm_object, registry):
    obj = shm_object(4096)
    registry.register("small", "/" + obj.name, 0, 64)
    past_end = decode_request(header_only({"inputs": [{"name": "x", "shape": [32], "datatype": "FP32", "parameters": {
        "shared_memory_region": "small", "shared_memory_byte_size": 128}}]}))
    with pytest.raises(SharedMemoryError, match="run past the end of shared memory region 'small'"):
        shm_feeds(past_end, registry)
    unknown = decode_request(header_only({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {
        "shared_memory_region": "nope", "shared_memory_byte_size": 16}}]}))
    with pytest.raises(SharedMemoryError, match="'nope' is not registered"):
        shm_feeds(unknown, registry)
    request = decode_request(header_only({
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
        "outputs": [{"name": "y", "parameters": {"shared_memory_region": "small", "shared_memory_byte_size": 8}}]}))
    with pytest.raises(SharedMemoryError, match="output 'y' needs 40 bytes"):
        write_shm_outputs(request, {"y": np.zeros(10, np.float32)}, registry)
    nan = decode_request(header_only({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {
        "shared_memory_region": "small", "shared_memory_byte_size": 16}}]}))
    np.ndarray((4,), np.float32, buffer=obj.buf)[:] = [1, np.nan, 2, 3]
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        check_finite(shm_feeds(nan, registry))  # what the runner does for models that reject non-finite input


def test_unregister_while_an_array_points_into_the_region(shm_object, registry):
    obj = shm_object(4096)
    registry.register("busy", "/" + obj.name, 0, 4096)
    view = np.frombuffer(registry.buffer(ShmRef("busy", 16, 0), "x"), np.float32)
    registry.unregister("busy")  # no BufferError: unmapped once the array goes
    assert view.shape == (4,)
    del view


def test_client_request_round_trip():
    body, headers = encode_request(
        {"b": np.ones((2, 2), np.float32)}, outputs=["y", "z"],
        shm_inputs={"a": ShmInput(ShmRef("r", 32, 64), "FP32", (2, 4))},
        shm_outputs={"y": ShmRef("r", 32, 128)})
    request = decode_request(body, headers.get("inference-header-content-length"))
    assert request.shm_inputs == {"a": ShmInput(ShmRef("r", 32, 64), "FP32", (2, 4))}
    assert set(request.inputs) == {"b"}
    assert [(o.name, o.shm, o.binary) for o in request.outputs] == [("y", ShmRef("r", 32, 128), False), ("z", None, True)]
    with pytest.raises(ValueError, match="needs the list of outputs"):
        encode_request({}, shm_outputs={"y": ShmRef("r", 32, 0)})


class RecordingPinner:
    """Stands in for cudaHostRegister (no GPU here); checks it is handed the whole live mapping."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.pinned: dict[int, int] = {}
        self.calls: list[tuple] = []

    def pin(self, address: int, size: int) -> bool:
        import ctypes

        ctypes.memset(address, 0, 1)  # the address must be mapped and writable: this would crash otherwise
        self.calls.append(("pin", address, size))
        if self.refuse:
            return False
        self.pinned[address] = size
        return True

    def unpin(self, address: int) -> None:
        self.calls.append(("unpin", address))
        del self.pinned[address]


def test_regions_are_pinned_for_the_device_and_unpinned_before_unmapping(shm_object):
    obj = shm_object(3 * 4096)
    pinner = RecordingPinner()
    registry = SharedMemoryRegistry(pinner=pinner)
    registry.register("p", "/" + obj.name, 4096 + 100, 2000)
    ((kind, address, size),) = pinner.calls
    assert kind == "pin" and size == 100 + 2000  # from the page boundary below the offset
    assert registry.status("p")[0]["pinned"] is True
    # the pinned address is where the region's bytes are: write through it, read in the object
    import ctypes

    ctypes.memmove(address + 100, b"pinned", 6)
    assert bytes(obj.buf[4096 + 100:4096 + 106]) == b"pinned"
    registry.unregister("p")
    assert pinner.calls[-1] == ("unpin", address) and not pinner.pinned
    refusing = SharedMemoryRegistry(pinner=RecordingPinner(refuse=True))
    refusing.register("q", "/" + obj.name, 0, 64)
    assert refusing.status("q")[0]["pinned"] is False  # still usable, copies staged
    refusing.close()


class SlowPinner(RecordingPinner):
    """cudaHostRegister of a large region takes tens of ms: this one waits until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.pinning, self.go_on = threading.Event(), threading.Event()

    def pin(self, address: int, size: int) -> bool:
        self.pinning.set()
        assert self.go_on.wait(10)
        return super().pin(address, size)


def test_a_region_being_pinned_holds_up_neither_requests_nor_other_registrations(shm_object):
    pinner = SlowPinner()
    registry = SharedMemoryRegistry(pinner=pinner)
    first, second = shm_object(4096), shm_object(4096)
    pinner.go_on.set()
    registry.register("in-use", "/" + first.name, 0, 4096)
    pinner.go_on.clear()
    pinner.pinning.clear()
    slow = threading.Thread(target=registry.register, args=("new", "/" + second.name, 0, 4096))
    slow.start()
    try:
        assert pinner.pinning.wait(10)
        release = registry.hold({"in-use"})  # a request using another region goes on meanwhile
        release()
        assert [r["name"] for r in registry.status()] == ["in-use"]
        with pytest.raises(SharedMemoryError, match="already registered"):
            registry.register("in-use", "/" + first.name, 0, 4096)
    finally:
        pinner.go_on.set()
        slow.join(10)
    assert [r["name"] for r in registry.status()] == ["in-use", "new"]
    registry.close()


def test_pinned_in_the_background_a_region_serves_at_once_and_is_unpinned_on_unregister(shm_object):
    """client_shm_pinning: background. Registration returns once the region is mapped; requests use it
    unpinned meanwhile; one thread pins regions in order; unregistering waits for a pin under way and
    undoes it, and a region unregistered before its turn is never pinned."""
    pinner = SlowPinner()
    registry = SharedMemoryRegistry(pinner=pinner, pin_in_background=True)
    first, second = shm_object(4096), shm_object(4096)
    try:
        registry.register("a", "/" + first.name, 0, 4096)  # returns while the pin waits for go_on
        assert pinner.pinning.wait(10) and registry.status("a")[0]["pinned"] is False
        with registry.using({"a"}):
            registry.buffer(ShmRef("a", 4, 8), "x")[:] = b"used"  # usable before it is pinned
        registry.register("b", "/" + second.name, 0, 4096)  # queued behind a's pin
        registry.unregister("b")  # before its turn: never pinned
        closing = threading.Thread(target=registry.unregister, args=("a",))
        closing.start()
        closing.join(0.2)
        assert closing.is_alive()  # waits for a's pin to end...
        pinner.go_on.set()
        closing.join(10)
        assert not closing.is_alive()
        assert [c[0] for c in pinner.calls] == ["pin", "unpin"] and not pinner.pinned  # ...and undoes it
        assert bytes(first.buf[8:12]) == b"used"
        registry.register("c", "/" + second.name, 0, 4096)
        for _ in range(100):
            if registry.status("c")[0]["pinned"]:
                break
            threading.Event().wait(0.05)
        assert registry.status("c")[0]["pinned"] is True
    finally:
        pinner.go_on.set()
        registry.close()
    assert not pinner.pinned


def test_a_registration_can_wait_for_its_pin_in_the_background_for_a_while(shm_object):
    """A batch job registers its regions before its first part, and waits for each pin (the device is
    idle then: CUDA's page-locking waits for the work in flight), but not for ever."""
    pinner = SlowPinner()
    registry = SharedMemoryRegistry(pinner=pinner, pin_in_background=True)
    first, second = shm_object(4096), shm_object(4096)
    try:
        waiting = threading.Thread(target=registry.register, args=("a", "/" + first.name, 0, 4096, 10.0))
        waiting.start()
        assert pinner.pinning.wait(10)
        waiting.join(0.2)
        assert waiting.is_alive()  # waits for its pin...
        pinner.go_on.set()
        waiting.join(10)
        assert not waiting.is_alive() and registry.status("a")[0]["pinned"] is True  # ...which is done
        pinner.go_on.clear()
        started = time.monotonic()
        registry.register("b", "/" + second.name, 0, 4096, 0.3)  # a pin that does not end: given up on
        assert 0.3 <= time.monotonic() - started < 5 and registry.status("b")[0]["pinned"] is False
    finally:
        pinner.go_on.set()
        registry.close()


class MeetingPinner(RecordingPinner):
    """Each pin waits until ``n`` pins are under way at once (so ``n`` threads must be pinning)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.meeting = threading.Barrier(n, timeout=10)

    def pin(self, address: int, size: int) -> bool:
        self.meeting.wait()
        return super().pin(address, size)


def test_regions_are_pinned_in_the_background_on_as_many_threads_as_asked(shm_object):
    """client_shm_pin_threads: a batch job registers a region per part in flight at once; with 4 threads
    4 of them are page-locked together (with one thread, the barrier would break: BrokenBarrierError)."""
    pinner = MeetingPinner(4)
    registry = SharedMemoryRegistry(pinner=pinner, pin_in_background=True, pin_threads=4)
    objects = [shm_object(4096) for _ in range(4)]
    try:
        waiting = [threading.Thread(target=registry.register, args=(f"r{i}", "/" + o.name, 0, 4096, 10.0))
                   for i, o in enumerate(objects)]
        for thread in waiting:
            thread.start()
        for thread in waiting:
            thread.join(20)
        assert [r["pinned"] for r in registry.status()] == [True] * 4 and len(pinner.pinned) == 4
    finally:
        registry.close()
    assert not pinner.pinned


def test_client_arena_makes_a_regions_pages_before_registering_it():
    """The pages are allocated (and zeroed) by the client, not by the GPU worker's page-locking, which
    would make them on its pinning thread, one region after another."""
    from cluster.shm_arena import ShmArena

    allocated: dict[str, int] = {}

    def register(name: str, key: str, size: int) -> None:
        allocated[name] = os.stat(f"/dev/shm/{name}").st_blocks * 512

    arena = ShmArena(register, lambda name: None)
    try:
        name = arena.ensure(3 << 20)
        assert allocated == {name: 3 << 20}
    finally:
        arena.release()


def test_a_host_without_room_for_a_region_says_so_before_registering_it(monkeypatch):
    """/dev/shm full: the object's pages cannot be made. Without allocating them up front the client
    would get a SIGBUS at its first write; now a SharedMemoryError that says what to do, nothing is
    registered, and no object is left behind. (A full /dev/shm is not made here: the kernel's answer is.)"""
    import errno

    from cluster.shm_arena import ShmArena

    def no_room(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = set(os.listdir("/dev/shm"))
    registered: list[str] = []
    arena = ShmArena(lambda name, key, size: registered.append(name), lambda name: None)
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(SharedMemoryError, match=r"/dev/shm has no room for a shared memory region of 2 MiB .*--shm-size"):
        arena.ensure(2 << 20)
    assert registered == [] and set(os.listdir("/dev/shm")) <= before


def test_engine_writes_outputs_straight_into_shared_memory(shm_object, registry, demo_models):
    from workers.engines.onnxruntime import OnnxRuntimeEngine

    obj = shm_object(1 << 16)
    registry.register("out", "/" + obj.name, 0, 1 << 16)
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    request = decode_request(header_only({
        "inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32", "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"shared_memory_region": "out",
                                                             "shared_memory_byte_size": 200, "shared_memory_offset": 64}},
                    {"name": "label", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 8}}],
    }))
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        expected = engine.infer({"input": x})
        targets = shm_output_arrays(request, registry, engine.outputs, 5)
        # label needs 40 bytes but was given 8: left to write_shm_outputs, which says so
        assert set(targets) == {"probabilities"}
        got = engine.infer({"input": x}, out=targets)
    assert got["probabilities"] is targets["probabilities"]
    np.testing.assert_array_equal(np.ndarray((5, 10), np.float32, buffer=obj.buf, offset=64), expected["probabilities"])
    np.testing.assert_array_equal(got["label"], expected["label"])
    with pytest.raises(SharedMemoryError, match="output 'label' needs 40 bytes"):
        write_shm_outputs(request, got, registry)
    del targets, got


def test_engine_out_must_match_the_output():
    from workers.engines.base import Engine

    class Doubler(Engine):
        inputs = (TensorSpec("x", "FP32", (-1,)),)
        outputs = (TensorSpec("y", "FP32", (-1,)),)
        footprint_bytes = 0

        def _activate(self): pass

        def _deactivate(self): pass

        def _infer(self, feeds):
            return {"y": feeds["x"] * 2}

    with Doubler() as engine:
        out = np.zeros(3, np.float32)
        assert engine.infer({"x": np.ones(3, np.float32)}, out={"y": out})["y"] is out
        assert out.tolist() == [2, 2, 2]
        with pytest.raises(ValueError, match="writable C-contiguous float32"):
            engine.infer({"x": np.ones(3, np.float32)}, out={"y": np.zeros(3, np.float64)})


def test_unregister_waits_for_the_request_using_the_region(shm_object):
    obj = shm_object(4096)
    pinner = RecordingPinner()
    registry = SharedMemoryRegistry(pinner=pinner)
    registry.register("busy", "/" + obj.name, 0, 4096)
    with registry.using({"busy", "not-registered"}):
        target = np.frombuffer(registry.buffer(ShmRef("busy", 16, 0), "y"), np.float32)
        registry.unregister("busy")  # the client gave up on it mid-request
        assert registry.names() == set() and pinner.pinned  # gone for new requests, still pinned for this one
        target[:] = 7  # the engine's write still lands in mapped, pinned memory
        with pytest.raises(SharedMemoryError, match="not registered"):
            registry.buffer(ShmRef("busy", 16, 0), "y")
    assert not pinner.pinned and pinner.calls[-1][0] == "unpin"
    assert np.frombuffer(bytes(obj.buf[:16]), np.float32).tolist() == [7, 7, 7, 7]
    del target


def test_client_arena_unlinks_its_old_region_when_it_grows():
    """FleetClient(shared_memory=True)'s arena: a request that needs more gets a new region, and the
    old one is unregistered from the fleet and its object removed from /dev/shm at once."""
    from cluster.shm_arena import MIN_BYTES, ShmArena

    registered: dict[str, int] = {}
    arena = ShmArena(lambda name, key, size: registered.__setitem__(name, size),
                     lambda name: registered.pop(name))
    try:
        first = arena.ensure(1000)
        assert os.path.exists(f"/dev/shm/{first}") and registered == {first: MIN_BYTES}
        assert arena.ensure(MIN_BYTES) == first  # still fits: the same region
        second = arena.ensure(3 * MIN_BYTES)
        assert second != first and registered == {second: 3 * MIN_BYTES}
        assert not os.path.exists(f"/dev/shm/{first}") and os.path.exists(f"/dev/shm/{second}")
        # what each object cost before it served: set up (created, registered), and its first fill only
        assert [s.byte_size for s in arena.setups] == [MIN_BYTES, 3 * MIN_BYTES]
        assert all(s.setup_s > 0 and s.first_fill_s is None for s in arena.setups)
        arena.place({"x": np.ones(1000, np.float32)}, [], 1000)
        first_fill = arena.setups[-1].first_fill_s
        arena.place({"x": np.ones(1000, np.float32)}, [], 1000)
        assert first_fill is not None and arena.setups[-1].first_fill_s == first_fill
        assert arena.setups[0].first_fill_s is None  # never filled: replaced before
    finally:
        arena.release()
    assert registered == {} and not os.path.exists(f"/dev/shm/{second}")
