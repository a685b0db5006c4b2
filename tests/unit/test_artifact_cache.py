"""The host's artifact cache without Ray: real files, real processes, a real S3 endpoint that is down."""

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from tests.moto_server import MotoS3
from workers.artifacts import ArtifactCache, RayObject, RepositoryObject
from workers.errors import ArtifactCorrupt, NotReady, RepositoryUnavailable
from workers.manifest import Manifest
from workers.storage import StoreSpec
from workers.targets import Target
from workers.tensors import TensorSpec


def manifest_for(data: bytes, name: str = "m") -> Manifest:
    spec = (TensorSpec("x", "FP32", (-1, 4)),)
    return Manifest(name, "1", "float32", Target("onnxruntime", "1.20", provider="cpu"), "model.onnx",
                    hashlib.sha256(data).hexdigest(), "0" * 64, spec, spec, footprint_bytes=len(data))


class Objects:
    """Ray's object store as the cache sees it: refs are names, each read is counted."""

    def __init__(self, **blobs: bytes) -> None:
        self.blobs = dict(blobs)
        self.reads: list[str] = []

    def __call__(self, ref: str) -> bytes:
        self.reads.append(ref)
        blob = self.blobs[ref]
        return blob.pop(0) if isinstance(blob, list) else blob


def test_a_fetch_is_verified_kept_and_used_again(tmp_path):
    data = os.urandom(10_000)
    objects = Objects(a=data)
    cache = ArtifactCache(tmp_path / "cache", 1 << 20, objects)
    with cache.open(manifest_for(data), RayObject("a", "head:/repo/m")) as path:
        assert path.read_bytes() == data and path.parent.name == hashlib.sha256(data).hexdigest()
    with cache.open(manifest_for(data), RayObject("a", "head:/repo/m")) as again:
        assert again == path
    assert objects.reads == ["a"]  # the second load came from the cache
    assert cache.stats.fills == 1 and cache.stats.hits == 1 and cache.stats.fill_bytes == len(data)


def test_from_the_repository_itself(tmp_path):
    data = os.urandom(5_000)
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "model.onnx").write_bytes(data)
    cache = ArtifactCache(tmp_path / "cache", 1 << 20)
    with cache.open(manifest_for(data), RepositoryObject(StoreSpec(str(tmp_path / "repo")), "m/model.onnx")) as path:
        assert path.read_bytes() == data


def test_a_partial_download_is_retried_once_and_never_kept(tmp_path):
    data = os.urandom(10_000)
    objects = Objects(a=[data[:4000], data])  # cut off, then whole
    cache = ArtifactCache(tmp_path / "cache", 1 << 20, objects)
    with cache.open(manifest_for(data), RayObject("a", "x")) as path:
        assert path.read_bytes() == data
    assert objects.reads == ["a", "a"] and cache.stats.retries == 1


def test_corrupt_twice_is_a_clear_error_and_leaves_nothing(tmp_path):
    data = os.urandom(10_000)
    objects = Objects(a=b"\x00" + data[1:])
    cache = ArtifactCache(tmp_path / "cache", 1 << 20, objects)
    with pytest.raises(ArtifactCorrupt, match=r"artifact head:/r/m \(through Ray from the head\) is corrupt: sha256 "
                                              r".* does not match the manifest's .*fetched 2 times.*fleet build"):
        with cache.open(manifest_for(data), RayObject("a", "head:/r/m")):
            pass
    assert objects.reads == ["a", "a"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]  # no entry, no half-written fetch


def test_a_cached_file_corrupted_on_disk_is_fetched_again(tmp_path):
    data = os.urandom(10_000)
    objects = Objects(a=data)
    cache = ArtifactCache(tmp_path / "cache", 1 << 20, objects)
    with cache.open(manifest_for(data), RayObject("a", "x")) as path:
        pass
    path.write_bytes(b"bitrot" + data[6:])
    with cache.open(manifest_for(data), RayObject("a", "x")) as path:
        assert path.read_bytes() == data
    assert objects.reads == ["a", "a"]


def test_an_object_store_that_is_down_is_a_503_after_one_retry(tmp_path):
    data = os.urandom(100)
    down = MotoS3()  # a port nothing listens on
    cache = ArtifactCache(tmp_path / "cache", 1 << 20)
    t0 = time.monotonic()
    with pytest.raises(RepositoryUnavailable, match=r"could not fetch the artifact of m \(2 tries\): could not open "
                                                    r"s3://b/r/m/model.onnx: .*connect") as info:
        with cache.open(manifest_for(data), RepositoryObject(down.spec("b/r"), "m/model.onnx")):
            pass
    assert info.value.http_status == 503 and cache.stats.retries == 1
    assert time.monotonic() - t0 < 20


def test_missing_object_is_named(tmp_path):
    data = os.urandom(100)
    cache = ArtifactCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(ArtifactCorrupt, match="is missing from the repository"):
        with cache.open(manifest_for(data), RepositoryObject(StoreSpec(str(tmp_path)), "nothing/model.onnx")):
            pass


def test_outside_ray_a_ray_object_cannot_be_read(tmp_path):
    data = os.urandom(100)
    with pytest.raises(NotReady, match="outside Ray"):
        with ArtifactCache(tmp_path / "cache", 1 << 20).open(manifest_for(data), RayObject("a", "x")):
            pass


def test_least_recently_used_out_first_and_never_one_in_use(tmp_path):
    blobs = {name: os.urandom(4000) for name in "abcd"}
    cache = ArtifactCache(tmp_path / "cache", 9000, Objects(**blobs))
    entry = lambda name: tmp_path / "cache" / hashlib.sha256(blobs[name]).hexdigest()  # noqa: E731
    with cache.open(manifest_for(blobs["a"]), RayObject("a", "x")):
        with cache.open(manifest_for(blobs["b"]), RayObject("b", "x")):
            pass
        time.sleep(0.01)
        with cache.open(manifest_for(blobs["c"]), RayObject("c", "x")):
            pass  # 12000 > 9000: b is the oldest not in use (a is)
        assert entry("a").exists() and not entry("b").exists() and entry("c").exists()
    time.sleep(0.01)
    with cache.open(manifest_for(blobs["d"]), RayObject("d", "x")):
        pass
    assert not entry("a").exists() and entry("c").exists() and entry("d").exists()
    assert cache.stats.evictions == 2


def _fill_in_another_process(root: str, data: bytes, reads: str) -> str:
    def slow_read(ref):
        with open(reads, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return data

    with ArtifactCache(Path(root), 1 << 20, slow_read).open(manifest_for(data), RayObject("a", "x")) as path:
        return path.read_bytes().hex()


def test_workers_of_one_host_fetch_an_artifact_once(tmp_path):
    data = os.urandom(20_000)
    reads = tmp_path / "reads.txt"
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        results = pool.starmap(_fill_in_another_process, [(str(tmp_path / "cache"), data, str(reads))] * 3)
    assert results == [data.hex()] * 3
    assert len(reads.read_text().split()) == 1  # one process fetched; the other two waited and used it
