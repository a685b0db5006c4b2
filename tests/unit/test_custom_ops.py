"""Models with custom operators: their libraries recorded, stored, trusted, loaded, and kept in
float32 through every precision. Real ONNX Runtime with onnxruntime-extensions' library."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from cluster.buildfarm import build_locally, local_target, prepare_build
from cluster.cli import main as fleet
from cluster.repository import Repository
from tests.custom_ops_model import calibration_data, direct, extensions_library, extensions_sha256, within_precision
from tests.models import custom_op_rows, make_custom_op_mlp
from workers.actor import FleetWorker, WorkerSpec
from workers.build import BuildRequest
from workers.custom_ops import describe_library
from workers.errors import BuildError, IncompatibleArtifact
from workers.kserve.codec import InferRequest
from workers.manifest import Manifest, sha256_file
from workers.messages import LoadOptions
from workers.onnx_source import UnsupportedOperators, check_source

ROOT = Path(__file__).resolve().parents[2]
PRECISIONS = ("float32", "float16", "int8_calib", "int8")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The custom-op model built in every precision into one repository, as `fleet build` does."""
    work = tmp_path_factory.mktemp("custom-ops")
    library = extensions_library()
    source = make_custom_op_mlp(work / "custom.onnx")
    calib = calibration_data(work / "calib.npz")
    repo = Repository(work / "repo")
    for precision in PRECISIONS:
        prepared = prepare_build(repo, source, precision, calib_data=str(calib) if precision == "int8_calib" else None,
                                 calib_method="minmax", custom_ops=(library,))
        request = BuildRequest(str(source), f"custom-{precision.replace('_', '-')}", local_target(prepared.precision),
                               options=prepared.options, custom_ops=(library,))
        outcome = build_locally(repo, request, sha256_file(source), prepared=prepared)
        assert outcome.ok, outcome.error
    return {"repo": repo, "source": source, "library": library, "work": work}


def _worker(repo, name, trust=True):
    worker = FleetWorker(WorkerSpec(f"w-{name}", budget_bytes=1 << 30))
    (art,) = repo.artifacts(name)
    libraries = {lib.sha256: repo.library_source(lib) for lib in art.manifest.custom_ops}
    worker.load(art.manifest, repo.object_source(art.manifest), LoadOptions(trusted_sha256=(extensions_sha256(),) if trust else ()), libraries)
    return worker, art.manifest


def _infer(worker, name, rows):
    reply = worker.infer(name, InferRequest({"input": rows}))
    return reply.outputs["logits"]


def test_a_library_is_described_by_the_symbols_it_exports(tmp_path):
    ort_library = describe_library(extensions_library())
    assert ort_library.kinds == ("onnxruntime",) and len(ort_library.sha256) == 64
    assert describe_library("/lib/x86_64-linux-gnu/libm.so.6").kinds == ("tensorrt",)  # no ORT entry point
    (tmp_path / "not.so").write_text("hello")
    with pytest.raises(BuildError, match="not a 64-bit little-endian ELF"):
        describe_library(tmp_path / "not.so")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_answers_as_onnx_runtime_with_the_library(built, precision):
    name = f"custom-{precision.replace('_', '-')}"
    worker, manifest = _worker(built["repo"], name)
    try:
        rows = custom_op_rows(64, seed=7)
        numbers = within_precision(precision, direct(built["source"], rows, built["library"]), _infer(worker, name, rows))
        print(f"{precision}: {numbers}")
        assert [lib.file_name for lib in manifest.custom_ops] == [Path(built["library"]).name]
        assert manifest.accuracy["check"]["passed"]
    finally:
        worker.shutdown()


def test_float16_and_int8_keep_the_custom_op_in_float32(built):
    repo = built["repo"]
    for name in ("custom-float16", "custom-int8"):
        (art,) = repo.artifacts(name)
        graph = onnx.load(str(repo.root / art.key)).graph
        producers = {out: node for node in graph.node for out in node.output}
        consumers = {inp: node for node in graph.node for inp in node.input}
        (custom,) = [n for n in graph.node if n.domain == "ai.onnx.contrib"]
        # float16: a Cast to float32 before it and after each output; int8: a DequantizeLinear before it
        assert producers[custom.input[0]].op_type == ("Cast" if name == "custom-float16" else "DequantizeLinear")
        if name == "custom-float16":
            assert all(consumers[out].op_type == "Cast" for out in custom.output)
        else:
            assert any(n.op_type == "QuantizeLinear" for n in graph.node)
            assert all(consumers[out].op_type != "DequantizeLinear" for out in custom.output)


def test_the_manifest_records_the_libraries_and_the_repository_keeps_them_by_sha256(built):
    repo = built["repo"]
    manifests = [a.manifest for a in repo.artifacts()]
    shas = {lib.sha256 for m in manifests for lib in m.custom_ops}
    assert len(shas) == 1 and len(manifests) == len(PRECISIONS)
    (library,) = manifests[0].custom_ops
    assert repo.read_library(library) == Path(built["library"]).read_bytes()
    assert Manifest.from_dict(manifests[0].to_dict()).custom_ops == manifests[0].custom_ops


def test_an_untrusted_model_is_refused_naming_the_config_field_before_any_fetch(built, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_ARTIFACT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(IncompatibleArtifact, match=r"models\.custom-float32\.trusted_sha256") as refused:
        _worker(built["repo"], "custom-float32", trust=False)
    assert "native code" in str(refused.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("[0-9a-f]*"))


def test_a_library_swapped_in_the_repository_is_refused_by_its_pin(built, tmp_path, monkeypatch):
    """Pinned by content: a manifest naming other library bytes than the pinned ones is refused."""
    monkeypatch.setenv("FLEET_ARTIFACT_CACHE", str(tmp_path / "cache"))
    (art,) = built["repo"].artifacts("custom-float32")
    (library,) = art.manifest.custom_ops
    forged = dataclasses.replace(art.manifest, custom_ops=(dataclasses.replace(library, sha256="0" * 64),))
    worker = FleetWorker(WorkerSpec("w-swapped", budget_bytes=1 << 30))
    with pytest.raises(IncompatibleArtifact, match=r"sha256 0{64} is not pinned in models\.custom-float32\.trusted_sha256"):
        worker.load(forged, built["repo"].object_source(forged), LoadOptions(trusted_sha256=(extensions_sha256(),)), {})
    assert worker.health().loaded == frozenset()


def test_operators_no_runtime_has_are_named_with_the_option(built, tmp_path, capsys):
    with pytest.raises(UnsupportedOperators, match="ai.onnx.contrib::NegPos") as refused:
        check_source(built["source"])
    assert "--custom-ops" in str(refused.value)
    # the CLI: exit 2 with the message, no traceback; with a library that does not provide them, too
    for extra in ([], ["--custom-ops", "/lib/x86_64-linux-gnu/libm.so.6"]):
        code = fleet(["build", str(built["source"]), "--name", "x", "--repository", str(tmp_path / "repo"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "NegPos" in err and "--custom-ops" in err and "Traceback" not in err, err


EXIT = """
import sys
from pathlib import Path
from cluster.repository import Repository
from tests.models import custom_op_rows
from workers.actor import FleetWorker, WorkerSpec
from workers.kserve.codec import InferRequest
from workers.messages import LoadOptions

repo = Repository(sys.argv[1])
worker = FleetWorker(WorkerSpec("exit-test", budget_bytes=1 << 30))
for name in ("custom-float32", "custom-int8"):
    (art,) = repo.artifacts(name)
    worker.load(art.manifest, repo.object_source(art.manifest), LoadOptions(trusted_sha256=(sys.argv[3],)),
                {lib.sha256: repo.library_source(lib) for lib in art.manifest.custom_ops})
    rows = custom_op_rows(8)
    worker.infer(name, InferRequest({"input": rows}))
print("served", flush=True)
if sys.argv[2] == "shutdown":
    worker.shutdown()  # engines and sessions, then the libraries their options held
    print("shut down", flush=True)
"""


@pytest.mark.parametrize("how", ["shutdown", "exit"])
def test_a_worker_with_the_library_loaded_exits_cleanly(built, how, tmp_path):
    """A subprocess, because a regression here is a crash at exit (a library unloaded under a live
    session, a plugin's destructor), which no exception shows."""
    done = subprocess.run([sys.executable, "-c", EXIT, str(built["repo"].root), how, extensions_sha256()], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**__import__("os").environ, "FLEET_ARTIFACT_CACHE": str(tmp_path)})
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-3000:])
    assert "served" in done.stdout and ("shut down" in done.stdout or how == "exit")
    for bad in ("Segmentation", "Traceback", "terminate called", "Aborted", "double free", "ERROR"):
        assert bad not in done.stderr, done.stderr[-3000:]
