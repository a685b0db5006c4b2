"""The controller's loader without Ray: where a model goes, eviction, waiting for a replacement."""

import asyncio
import time

import pytest

from cluster.config import FleetConfig
from cluster.controller.events import EventLog
from cluster.controller.loading import Loader
from cluster.router import Router, WorkerState
from tests.unit.fleet_doubles import FakeWorker, manifest
from workers.artifacts import RayObject
from workers.errors import NoCapacity, NoCompatibleWorker, NotReady, RepositoryUnavailable


class FakePool:
    """The worker pool as the loader uses it: handles, and health read back into the router."""

    def __init__(self, workers: list[FakeWorker], router: Router, manifests) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.router, self.manifests = router, manifests
        self.returning: set[str] = set()
        self.sync()

    def sync(self) -> None:
        self.router.set_inventory([WorkerState.of(w.record()) for w in self.workers.values()], self.manifests)

    def handle(self, worker_id):
        return self.workers[worker_id]

    async def refresh(self, worker_id):
        self.sync()

    async def check(self, worker_id):
        self.sync()

    def coming_back(self, worker_id):
        return worker_id in self.returning


class Sources:
    """The controller's ``_source`` as the loader sees it: records each read of an artifact."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.failure: Exception | None = None

    async def __call__(self, manifest):
        self.reads.append(manifest.engine_key)
        if self.failure is not None:
            raise self.failure
        return RayObject(ref=b"bytes", where=manifest.engine_key)


def loader_for(workers, manifests, sources=None, **config):
    router = Router()
    pool = FakePool(workers, router, manifests)
    loader = Loader(FleetConfig(discover_nodes=True, **config), pool, router, EventLog(), sources or Sources(), lambda: 7)
    return loader, pool


def evicting(worker: FakeWorker) -> FakeWorker:
    """A worker whose ledger evicts everything idle to make room (what the real ledger does, roughly)."""
    load = worker.load.fn

    def with_eviction(m, source, options):
        used = sum(x.footprint_bytes for x in worker.loaded.values())
        if used + m.footprint_bytes > worker.budget:
            worker.loaded.clear()
        return load(m, source, options)

    worker.load.fn = with_eviction
    return worker


def test_loads_on_every_compatible_worker_with_room_one_engine_each():
    a, b, p4 = FakeWorker("t4-a"), FakeWorker("t4-b"), FakeWorker("p4", "6.1")
    loader, _ = loader_for([a, b, p4], [manifest("m", "7.5"), manifest("m", "6.1")])
    placement = asyncio.run(loader.ensure_loaded("m", "1"))
    assert placement.workers == ["p4", "t4-a", "t4-b"] and placement.epoch == 7
    assert all(len(w.loaded) == 1 for w in (a, b, p4))
    again = asyncio.run(loader.ensure_loaded("m", "1"))
    assert again.engines == placement.engines and len(a.load.calls) == 1  # nothing loaded twice


def test_no_room_anywhere_evicts_on_one_worker_only_or_refuses_without_eviction():
    a, b = evicting(FakeWorker("t4-a", budget=50)), evicting(FakeWorker("t4-b", budget=50))
    for w in (a, b):
        w.loaded[manifest("old").engine_key] = manifest("old", footprint=45)
    loader, _ = loader_for([a, b], [manifest("old", footprint=45), manifest("new", footprint=40)])
    with pytest.raises(NoCapacity, match="no capacity for model 'new'.*t4-a.*free of"):
        asyncio.run(loader.ensure_loaded("new", "1", allow_eviction=False))
    placement = asyncio.run(loader.ensure_loaded("new", "1"))
    assert len(placement.workers) == 1  # one eviction is enough to serve it
    assert sum(manifest("old").engine_key in w.loaded for w in (a, b)) == 1


def test_waits_for_a_worker_being_replaced_then_loads_there():
    p4 = FakeWorker("p4", "6.1")
    p4.dead = True
    loader, pool = loader_for([p4, FakeWorker("t4")], [manifest("m", "6.1")], worker_wait_s=10)
    pool.returning.add("p4")

    async def run():
        async def replaced():
            await asyncio.sleep(0.3)
            p4.dead = False
            pool.returning.discard("p4")
            pool.sync()

        started = time.monotonic()
        asyncio.get_running_loop().create_task(replaced())
        placement = await loader.ensure_loaded("m", "1")
        return placement, time.monotonic() - started

    placement, waited = asyncio.run(run())
    assert placement.workers == ["p4"] and 0.25 <= waited < 5
    assert any(e["event"] == "waiting-for-worker" for e in loader.events.recent())


def test_no_wait_when_nothing_is_coming_back_and_a_bounded_wait_when_it_never_does():
    p4 = FakeWorker("p4", "6.1")
    p4.dead = True
    loader, pool = loader_for([p4, FakeWorker("t4")], [manifest("m", "6.1")], worker_wait_s=0.5)
    started = time.monotonic()
    with pytest.raises(NoCompatibleWorker, match="built targets: 6.1"):
        asyncio.run(loader.ensure_loaded("m", "1"))
    assert time.monotonic() - started < 0.2  # its host is gone: nothing to wait for
    pool.returning.add("p4")  # being replaced, but never comes
    started = time.monotonic()
    with pytest.raises(NoCompatibleWorker):
        asyncio.run(loader.ensure_loaded("m", "1"))
    assert 0.5 <= time.monotonic() - started < 3


def test_an_unloaded_model_loads_again_only_when_asked_explicitly():
    a = FakeWorker("t4-a")
    loader, _ = loader_for([a], [manifest("m")])
    asyncio.run(loader.ensure_loaded("m", "1"))
    asyncio.run(loader.unload("m", None, [manifest("m")]))
    with pytest.raises(NotReady, match="was unloaded; load it with POST /v2/repository/models/m/load"):
        asyncio.run(loader.ensure_loaded("m", "1"))
    assert asyncio.run(loader.ensure_loaded("m", "1", explicit=True)).workers == ["t4-a"]


def test_each_artifact_is_read_once_per_load_and_workers_get_a_source_not_a_path():
    a, b, p4 = FakeWorker("t4-a"), FakeWorker("t4-b"), FakeWorker("p4", "6.1")
    sources = Sources()
    loader, _ = loader_for([a, b, p4], [manifest("m", "7.5"), manifest("m", "6.1")], sources)
    asyncio.run(loader.ensure_loaded("m", "1"))
    assert sorted(sources.reads) == sorted({m.engine_key for m in (manifest("m", "7.5"), manifest("m", "6.1"))})
    (call_args, _), = a.load.calls
    assert isinstance(call_args[1], RayObject)  # what crossed to the worker: a source, never a path


def test_an_unreachable_repository_is_a_503_that_says_so():
    a = FakeWorker("t4-a")
    sources = Sources()
    sources.failure = RepositoryUnavailable("could not read s3://b/r/m/...: Could not connect to server")
    loader, _ = loader_for([a], [manifest("m", "7.5")], sources)
    with pytest.raises(RepositoryUnavailable, match="could not be loaded: t4-a: could not read s3://b/r/m/.*connect") as info:
        asyncio.run(loader.ensure_loaded("m", "1"))
    assert info.value.http_status == 503 and not a.loaded
