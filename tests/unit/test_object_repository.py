"""The repository on an object store (a real S3 endpoint: moto's server over HTTP), and its config."""

import dataclasses

import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.config import load_config
from cluster.deploy import check_repository
from cluster.repository import Repository
from tests.moto_server import moto_s3
from workers.build import BuildRequest, build_artifact
from workers.errors import InvalidConfig, RepositoryUnavailable
from workers.manifest import sha256_file
from workers.precision import CalibrationResult, calibration_key

BUCKET = "fleet-unit"


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as server:
        yield server


def objects(s3, prefix):
    import pyarrow.fs as pafs

    infos = s3.fs().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pafs.FileType.File)


def built(tmp_path, demo_models, name="digits-mlp", source="digits-mlp", **kw):
    manifest = build_artifact(BuildRequest(str(demo_models[source]), name, local_target(), **kw), tmp_path)
    return manifest, (tmp_path / manifest.artifact_file).read_bytes()


def test_publish_puts_the_artifact_under_its_sha256_then_the_manifest(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/publish"))
    manifest, data = built(tmp_path, demo_models)
    stored = repo.publish(manifest, data)
    leaf = "digits-mlp/1/float32/onnxruntime-cpu"
    assert objects(s3, "publish") == [f"{leaf}/{manifest.artifact_sha256}/model.onnx", f"{leaf}/manifest.json"]
    assert stored.location == f"s3://{BUCKET}/publish/{leaf}/{manifest.artifact_sha256}"
    (listed,) = repo.artifacts()
    assert listed.manifest == manifest and repo.read_artifact(manifest) == data
    assert repo.models() == {"digits-mlp": ["1"]} and repo.check() == []


def test_a_manifest_is_trusted_only_with_its_artifact_all_there(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/halfway"))
    manifest, data = built(tmp_path, demo_models)
    repo.store.write_bytes(repo.artifact_key(manifest), data)  # a publish stopped after the artifact
    assert repo.artifacts() == []
    repo.store.delete(repo.artifact_key(manifest))
    repo.store.write_bytes("digits-mlp/1/float32/onnxruntime-cpu/manifest.json", manifest.to_json().encode())
    assert repo.artifacts() == []  # a manifest whose artifact is not there is never listed


def test_a_new_build_replaces_the_old_and_its_artifact(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/replace"))
    old, old_data = built(tmp_path / "a", demo_models)
    new, new_data = built(tmp_path / "b", demo_models, source="cnn-small", max_batch=8)  # same leaf, other bytes
    repo.publish(old, old_data)
    repo.publish(new, new_data)
    (listed,) = repo.artifacts()
    assert listed.manifest.max_batch == 8 and old.artifact_sha256 != new.artifact_sha256
    assert [k for k in objects(s3, "replace") if k.endswith("model.onnx")] == [repo.artifact_key(new)]


def test_bytes_that_do_not_match_their_manifest_are_never_published(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/refused"))
    manifest, data = built(tmp_path, demo_models)
    with pytest.raises(Exception, match="arrived corrupt"):
        repo.publish(manifest, data[:-5])
    assert objects(s3, "refused") == []


def test_check_finds_a_corrupted_object(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/check"))
    manifest, data = built(tmp_path, demo_models)
    repo.publish(manifest, data)
    repo.store.write_bytes(repo.artifact_key(manifest), data[:100] + b"bitrot" + data[106:])
    (problem,) = repo.check()
    assert "is corrupt: sha256" in problem and f"s3://{BUCKET}/check/digits-mlp" in problem


def test_build_locally_and_calibrations_on_the_object_store(s3, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/local"))
    path = demo_models["cnn-small"]
    outcome = build_locally(repo, BuildRequest(str(path), "cnn-small", local_target()), sha256_file(path))
    assert outcome.ok and build_locally(repo, BuildRequest(str(path), "cnn-small", local_target()), sha256_file(path)).cached
    assert repo.read_source(sha256_file(path)) == path.read_bytes()  # kept for a rebuild, one object
    result = CalibrationResult({"x": 1.5}, b"qdq-model-bytes", "minmax")
    key = calibration_key(sha256_file(path), "1" * 64, "minmax")
    assert repo.store_calibration(key, result) == f"s3://{BUCKET}/local/_calibration/{key}"
    assert repo.find_calibration(sha256_file(path), "minmax") == result
    assert repo.find_calibration(sha256_file(path), "entropy") is None
    assert repo.models() == {"cnn-small": ["1"]}  # calibrations are not models


def test_prepare_names_a_missing_bucket_and_an_unreachable_endpoint(s3):
    with pytest.raises(RepositoryUnavailable, match="bucket 'no-such-bucket' .* does not exist"):
        Repository(s3.spec("no-such-bucket/r")).prepare()
    down = dataclasses.replace(s3.spec(f"{BUCKET}/r"), endpoint_override="127.0.0.1:9")
    with pytest.raises(RepositoryUnavailable, match=r"s3://fleet-unit/r \(endpoint 127\.0\.0\.1:9\).*Could not connect"):
        Repository(down).prepare()
    Repository(s3.spec(f"{BUCKET}/fine")).prepare()


def test_missing_credentials_are_named_at_fleet_up(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(repository="s3://bucket/repo?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    with pytest.raises(RepositoryUnavailable, match="cannot be used: .*127.0.0.1:9.*no S3 credentials were found: set "
                                                    "storage.access_key and storage.secret_key"):
        check_repository(config)


def test_the_config_takes_a_uri_and_checks_it(tmp_path):
    config = load_config(repository="s3://bucket/prefix", storage={"endpoint_override": "h:1", "scheme": "http",
                                                                     "access_key": "a", "secret_key": "s3cr3t-value"})
    spec = config.store_spec()
    assert (spec.uri, spec.endpoint_override, spec.access_key) == ("s3://bucket/prefix", "h:1", "a")
    assert "s3cr3t" not in repr(spec) and "s3cr3t" not in spec.describe() and "s3cr3t" not in repr(config)
    assert load_config(repository="rel/dir").repository.startswith("/")  # a path is made absolute
    with pytest.raises(InvalidConfig, match="scheme 'ftp' is not one pyarrow.fs opens"):
        load_config(repository="ftp://host/x")
    with pytest.raises(InvalidConfig, match="apply to an s3:// repository"):
        load_config(repository=str(tmp_path), storage={"endpoint_override": "h:1"})
    with pytest.raises(InvalidConfig, match="go together"):
        load_config(repository="s3://b/p", storage={"access_key": "a"})
    with pytest.raises(InvalidConfig, match="unknown URI option"):
        Repository("s3://b/p?secret_key=x").artifacts()


def test_a_listing_reads_only_the_manifests_that_changed(s3, tmp_path, demo_models):
    repo = Repository(s3.spec(f"{BUCKET}/reads"))
    for name in ("one", "two"):
        repo.publish(*built(tmp_path / name, demo_models, name=name))
    reads: list[str] = []
    real = repo.store.read_bytes
    repo.store.read_bytes = lambda key: reads.append(key) or real(key)  # type: ignore[method-assign]
    assert len(repo.artifacts()) == 2 and len(reads) == 2
    assert len(repo.artifacts()) == 2 and len(reads) == 2  # nothing changed: one LIST, no GET
    new, data = built(tmp_path / "new", demo_models, name="two", source="cnn-small")
    repo.publish(new, data)  # maybe within the same second and the same size: still seen
    listed = {a.manifest.model: a.manifest for a in repo.artifacts()}
    assert listed["two"].artifact_sha256 == new.artifact_sha256 and reads[2:] == ["two/1/float32/onnxruntime-cpu/manifest.json"]
