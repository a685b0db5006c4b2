import json

import pytest

from cluster.buildfarm import build_locally, local_target
from cluster.repository import Repository, validate_model_ref
from workers.build import BuildRequest, build_artifact
from workers.errors import ArtifactCorrupt, InvalidInput, ModelNotFound
from workers.manifest import MANIFEST_NAME, Manifest, sha256_file, verify_artifact


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo")


def test_manifest_records_everything_and_round_trips(tmp_path, demo_models):
    manifest = build_artifact(BuildRequest(str(demo_models["digits-mlp"]), "digits-mlp", local_target(), max_batch=256), tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    for field in ("schema_version", "model", "version", "source_sha256", "artifact_sha256", "precision", "target",
                  "inputs", "outputs", "footprint_bytes", "build_time", "build_host"):
        assert field in data, field
    assert data["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in data["outputs"]] == ["label", "probabilities"]
    assert data["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert data["target"]["backend"] == "onnxruntime" and data["target"]["compute_capability"] == "any"
    assert data["source_sha256"] == sha256_file(demo_models["digits-mlp"])
    assert Manifest.from_dict(data) == manifest
    assert data["footprint_bytes"] > 0


def test_manifest_rejects_unknown_schema(tmp_path, demo_models):
    manifest = build_artifact(BuildRequest(str(demo_models["digits-mlp"]), "m", local_target()), tmp_path)
    data = manifest.to_dict() | {"schema_version": 99}
    with pytest.raises(ValueError, match="schema_version 99"):
        Manifest.from_dict(data)


def test_publish_is_atomic_and_listed(repo, demo_models):
    request = BuildRequest(str(demo_models["cnn-small"]), "cnn-small", local_target())
    outcome = build_locally(repo, request, sha256_file(demo_models["cnn-small"]))
    assert outcome.ok and not outcome.cached
    assert outcome.artifact.key == "cnn-small/1/float32/onnxruntime-cpu/model.onnx"
    assert (repo.root / "cnn-small" / "1" / "float32" / "onnxruntime-cpu" / "manifest.json").is_file()
    assert repo.models() == {"cnn-small": ["1"]}
    assert not any((repo.root / ".staging").iterdir())  # nothing left half-written
    again = build_locally(repo, request, sha256_file(demo_models["cnn-small"]))
    assert again.cached


def test_every_build_keeps_its_source_once_by_sha256(repo, demo_models):
    source = demo_models["cnn-small"]
    sha = sha256_file(source)
    assert not repo.has_source(sha)
    build_locally(repo, BuildRequest(str(source), "cnn-small", local_target()), sha)
    assert repo.has_source(sha) and repo.read_source(sha) == source.read_bytes()
    assert (repo.root / "_sources" / f"{sha}.onnx").is_file()
    build_locally(repo, BuildRequest(str(source), "cnn-small", local_target(), version="2"), sha)
    assert [p.name for p in (repo.root / "_sources").iterdir()] == [f"{sha}.onnx"]  # one copy per distinct source
    assert repo.models() == {"cnn-small": ["1", "2"]}  # not taken for a model
    with pytest.raises(ArtifactCorrupt, match="run `fleet build` of that model again"):
        repo.read_source("0" * 64)


def test_remove_artifact_deletes_one_leaf(repo, demo_models):
    source = demo_models["cnn-small"]
    art = build_locally(repo, BuildRequest(str(source), "cnn-small", local_target()), sha256_file(source)).artifact
    build_locally(repo, BuildRequest(str(source), "cnn-small", local_target(), version="2"), sha256_file(source))
    repo.remove_artifact(art.manifest)
    assert repo.models() == {"cnn-small": ["2"]}


def test_staging_is_never_visible(repo, demo_models):
    staging = repo.root / ".staging" / "x"
    build_artifact(BuildRequest(str(demo_models["cnn-small"]), "half", local_target()), staging)
    assert repo.models() == {}  # not published yet


def test_sha256_mismatch_is_refused(repo, demo_models):
    request = BuildRequest(str(demo_models["digits-mlp"]), "digits-mlp", local_target())
    art = build_locally(repo, request, sha256_file(demo_models["digits-mlp"])).artifact
    with open(repo.root / art.key, "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt\x00")
    with pytest.raises(ArtifactCorrupt, match="sha256 .* does not match"):
        verify_artifact((repo.root / art.key).parent, art.manifest)
    assert repo.check() and "corrupt" in repo.check()[0]


def test_versions_and_names(repo, demo_models):
    for version in ("1", "2", "10"):
        build_locally(repo, BuildRequest(str(demo_models["digits-mlp"]), "digits-mlp", local_target(), version=version), sha256_file(demo_models["digits-mlp"]))
    assert repo.models()["digits-mlp"] == ["1", "2", "10"]
    assert repo.resolve_version("digits-mlp", None) == "10"
    with pytest.raises(ModelNotFound, match="no version '3'"):
        repo.resolve_version("digits-mlp", "3")
    for bad in ("../../etc/passwd", "..", "a/b", ".hidden", ""):
        with pytest.raises(InvalidInput):
            validate_model_ref(bad)
