"""Every TensorRT name the backend uses exists in the TensorRT version whose path uses it.

Three sources of "used names", so that the check cannot drift from the code:

1. ``names.NAMES_USED`` (workers/engines/tensorrt/names.py): what each version path declares it touches; checked
   against the names the real binding wheel of that version exports
   (tests/data/trt_names/, made by scripts/extract_trt_names.py).
2. What the code really touches: the backend is run through every option on fake
   modules generated from those lists, which record each name touched (and raise
   AttributeError for names the version lacks). Touched names must be declared, and
   every declared name must be touched by some path (no dead declarations).
3. The source itself: every literal handed to ``require()`` / ``has()`` and every
   ``trt.X`` type named in an annotation.
"""

import ast
import ctypes.util
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.needs import skip_unless
from tests.unit.fake_cuda import FakeCuda
from tests.unit.fake_tensorrt import LEAN_LABELS, NAMES_DIR, VERSION_LABELS, FakeTensorRT, load_names, version_of
from workers import precision
from workers.engines import tensorrt as backend
from workers.engines.onnxruntime import describe_model
from workers.engines.tensorrt import OnnxParserFailed, TensorRTEngine, TrtBuildOptions, build_plan
from workers.engines.tensorrt import compat
from workers.engines.tensorrt.compat import TrtApi
from workers.engines.tensorrt.names import NAMES_USED
from workers.errors import BuildError, IncompatibleArtifact, InvalidConfig, NotReady

ROOT = Path(__file__).resolve().parents[2]
# Any shared library stands for a plugin library: on the 8.6 path it is loaded with ctypes for real.
PLUGIN = ctypes.util.find_library("m") or "libm.so.6"
# Every module of the backend package: a name touched in a new module is scanned too.
BACKEND_SOURCES = sorted(Path(backend.__file__).parent.glob("*.py"))
PATHS = [(label, int(version_of(label).split(".")[0]), label.startswith("lean-")) for label in VERSION_LABELS + LEAN_LABELS]
# Declared because the backend overrides them in its subclasses (so they must exist), never called by it.
OVERRIDDEN = {
    "ILogger.log",
    "IInt8EntropyCalibrator2.get_batch_size",
    "IInt8EntropyCalibrator2.get_batch",
    "IInt8EntropyCalibrator2.read_calibration_cache",
    "IInt8EntropyCalibrator2.write_calibration_cache",
    "__version__",  # read as a plain module attribute
}


def missing_names(used: frozenset[str] | set[str], exported: frozenset[str]) -> set[str]:
    return set(used) - exported


def with_prefixes(names: frozenset[str]) -> set[str]:
    """'A.B.C' also allows 'A' and 'A.B': reaching a member goes through its class."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


# --------------------------------------------------------------------------- the data files


@pytest.mark.parametrize("label", VERSION_LABELS + LEAN_LABELS)
def test_data_file_says_how_it_was_made(label):
    header = [line for line in (NAMES_DIR / f"{label}.txt").read_text().splitlines() if line.startswith("#")]
    assert header[0].endswith(version_of(label)) and version_of(label) in label
    assert any("pip download --no-deps" in line for line in header)
    assert any("scripts/extract_trt_names.py" in line for line in header)
    assert len(load_names(label)) > 300


def test_the_lists_show_the_forks_the_backend_handles():
    v8, v10, v11 = (load_names(label) for label in VERSION_LABELS)
    assert "ICudaEngine.device_memory_size" in v8 and "ICudaEngine.device_memory_size_v2" not in v8
    assert "ICudaEngine.device_memory_size" not in v11 and "ICudaEngine.device_memory_size_v2" in v11
    assert "ParserError.node_name" not in v8 and "ParserError.node_name" in v10
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in v8 and "NetworkDefinitionCreationFlag.EXPLICIT_BATCH" not in v11
    assert {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2"} <= v10
    assert not {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2"} & v11
    assert "TacticSource.CUBLAS_LT" in v10 and "TacticSource.CUBLAS_LT" not in v11
    assert "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY" not in v8
    assert "Builder" not in load_names("lean-11.4.0.106") and "Runtime" in load_names("lean-11.4.0.106")


# --------------------------------------------------------------------------- 1. declarations


@pytest.mark.parametrize("label,major,lean", PATHS)
def test_declared_names_exist_in_that_version(label, major, lean):
    assert not missing_names(NAMES_USED[(major, lean)], load_names(label)), label


def test_the_check_fails_for_a_name_the_version_lacks():
    """Deliberately broken: the 10.x build path's names, used on TensorRT 11."""
    broken = NAMES_USED[(10, False)]
    assert missing_names(broken, load_names("11.4.0.106")) == {
        "BuilderFlag.INT8",
        "IInt8EntropyCalibrator2",
        "IInt8EntropyCalibrator2.get_batch_size",
        "IInt8EntropyCalibrator2.get_batch",
        "IInt8EntropyCalibrator2.read_calibration_cache",
        "IInt8EntropyCalibrator2.write_calibration_cache",
        "IBuilderConfig.int8_calibrator",
    }
    # And the fake refuses them as TensorRT 11 would.
    fake = FakeTensorRT("11.4.0.106")
    with pytest.raises(AttributeError):
        fake.IInt8EntropyCalibrator2
    with pytest.raises(AttributeError):
        fake.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        fake.ICudaEngine.device_memory_size
    # What it keeps, it numbers as TensorRT 11 does: 12 (13 on 10.16.1.11).
    assert int(fake.BuilderFlag.VERSION_COMPATIBLE) == 12


# --------------------------------------------------------------------------- 2. what the code touches


@pytest.fixture(scope="module")
def cnn(demo_models):
    return demo_models["cnn-small"], describe_model(demo_models["cnn-small"])[0]


@pytest.fixture(scope="module")
def calibration(cnn):
    x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    return precision.calibrate(cnn[0], [{"input": x}], "minmax")


def exercise(label, cnn, calibration, digits_model, tmp_path) -> set[str]:
    """Run every build option and the runtime on the fake of ``label``; the names touched."""
    fake = FakeTensorRT(label)
    api = TrtApi(fake)
    source, inputs = cnn
    major = api.major
    builds: list[dict] = []
    if not api.lean:
        tactic = "JIT_CONVOLUTIONS" if major >= 11 else "CUBLAS_LT"
        builds.append(dict(workspace_bytes=1 << 28, timing_cache_path=str(tmp_path / "tc"), tactic_sources={tactic: False},
                           hardware_compatibility="ampere_plus", version_compatible=True, exclude_lean_runtime=True))
        if major >= 10:
            builds.append(dict(hardware_compatibility="same_compute_capability"))
        builds.append(dict(precision="float16", plugin_libraries=(PLUGIN,)))
        builds.append(dict(precision="int8", int8_mode="qdq"))
        if major < 11:
            builds.append(dict(precision="int8", int8_mode="calibrator"))
        for i, options in enumerate(builds):
            build_plan(source, tmp_path / f"{i}.plan", TrtBuildOptions(inputs=inputs, max_batch=4, **options),
                       calibration=calibration, api=api)
        with pytest.raises(OnnxParserFailed):
            build_plan(digits_model, tmp_path / "x.plan", TrtBuildOptions(inputs=describe_model(digits_model)[0]), api=api)
        fake.world.build_error = "Error Code 2: out of memory"  # TensorRT logs, the build returns None
        with pytest.raises(BuildError, match="out of memory"):
            build_plan(source, tmp_path / "y.plan", TrtBuildOptions(inputs=inputs), api=api)
    # The runtime, on a plan the matching full TensorRT built.
    builder = TrtApi(FakeTensorRT(label.removeprefix("lean-")))
    info = build_plan(source, tmp_path / "run.plan", TrtBuildOptions(inputs=inputs, max_batch=2, version_compatible=True), api=builder)
    with TensorRTEngine(info.plan_path, slots=2, version_compatible=True, lean=api.lean, api=api, cuda_module=FakeCuda(),
                        plugin_libraries=(PLUGIN,)) as engine:
        engine.infer({"input": np.zeros((2, 3, 64, 64), np.float32)})
    fake.world.deserialize_error = "Error Code 1: Serialization (version tag mismatch)"
    with pytest.raises(IncompatibleArtifact, match="version tag"):
        TensorRTEngine(info.plan_path, lean=api.lean, api=api, cuda_module=FakeCuda()).activate()
    return fake.touched


@pytest.mark.parametrize("label,major,lean", PATHS)
def test_code_touches_only_declared_names_and_every_declared_name(label, major, lean, cnn, calibration, demo_models, tmp_path):
    touched = exercise(label, cnn, calibration, demo_models["digits-mlp"], tmp_path)
    declared = NAMES_USED[(major, lean)]
    # TacticSource members are named by the user's tactic_sources option, checked at run time.
    undeclared = {n for n in touched - with_prefixes(declared) if not n.startswith("TacticSource.")}
    assert not undeclared, f"{label}: the code touched names names.NAMES_USED does not declare"
    assert not missing_names(touched, load_names(label))
    unexercised = declared - touched - OVERRIDDEN
    assert not unexercised, f"{label}: declared but no path touched them (dead declaration or untested path)"


# --------------------------------------------------------------------------- 3. the source


def _source_names() -> tuple[set[str], set[str]]:
    """(literals given to require()/has(), trt.X types named in annotations) in the backend's source."""
    literals, types_named = set(), set()
    for path in BACKEND_SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("require", "has"):
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    literals.add(first.value)
                elif isinstance(first, ast.JoinedStr):  # f"BuilderFlag.{name}": its fixed prefix
                    prefix = first.values[0]
                    if isinstance(prefix, ast.Constant):
                        literals.add(str(prefix.value).rstrip("."))
            annotation = None
            if isinstance(node, (ast.arg, ast.AnnAssign)):
                annotation = node.annotation
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotation = node.returns
            text = ast.unparse(annotation) if annotation is not None else ""
            if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                text = annotation.value
            for chain in re.findall(r"\btrt\.([A-Za-z_][\w.]*)", text):
                types_named.add(chain)
    return literals, types_named


def test_the_scan_covers_every_module_of_the_package():
    assert {p.name for p in BACKEND_SOURCES} >= {"__init__.py", "builder.py", "compat.py", "cuda.py", "names.py", "runner.py"}


def test_every_required_literal_is_declared():
    literals, _ = _source_names()
    assert literals, "the scan found no require() calls: it is broken"
    declared = with_prefixes(frozenset().union(*NAMES_USED.values()))
    assert not literals - declared


def test_every_annotated_tensorrt_type_exists_in_every_version():
    _, named = _source_names()
    assert {"ICudaEngine", "IBuilderConfig", "Runtime"} <= named
    for label in VERSION_LABELS:
        assert not missing_names(named, load_names(label)), label


# --------------------------------------------------------------------------- the real lean runtime


def _real_lean():
    try:
        import tensorrt_lean
    except Exception as exc:  # ImportError, or OSError from its libraries
        skip_unless(False, f"tensorrt_lean does not import here: {exc}")
        raise
    return tensorrt_lean


def test_real_lean_module_matches_its_name_list():
    lean = _real_lean()
    label = f"lean-{lean.__version__}"
    if not (NAMES_DIR / f"{label}.txt").exists():
        skip_unless(False, f"no name list for {label}: run scripts/extract_trt_names.py")
    spec = importlib.util.spec_from_file_location("extract_trt_names", ROOT / "scripts" / "extract_trt_names.py")
    extractor = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = extractor  # its dataclasses look themselves up there
    try:
        spec.loader.exec_module(extractor)
    finally:
        del sys.modules[spec.name]
    site = str(Path(lean.__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", extractor._WALKER, json.dumps([[], site, "tensorrt_lean"])],
                            capture_output=True, text=True, check=True, timeout=120)
    real = set(json.loads(result.stdout.strip().splitlines()[-1])["names"])
    assert real == set(load_names(label))


def test_real_lean_module_takes_the_lean_path():
    lean = _real_lean()
    api = TrtApi(lean)
    assert api.lean and api.label == f"TensorRT lean {lean.__version__}"
    for name in api.names_used:
        assert api.has(name), name
    assert int(lean.ILogger.Severity.ERROR) == 1 and api.is_error(lean.ILogger.Severity.INTERNAL_ERROR)
    assert not api.is_error(lean.ILogger.Severity.WARNING)
    with pytest.raises(InvalidConfig, match=f"Builder is not available on TensorRT lean {lean.__version__}"):
        api.require("Builder")
    with pytest.raises(InvalidConfig, match="lean runtime only deserializes"):
        api.require_builder()


def test_real_lean_engine_without_a_gpu_is_refused_with_tensorrts_words(tmp_path):
    """Without a GPU, real TensorRT logs a CUDA error yet returns a Runtime that crashes when used or freed."""
    _real_lean()
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"never deserialized")
    code = (
        "import sys\n"
        "from tests.unit.fake_cuda import FakeCuda\n"
        "from workers.engines.tensorrt import TensorRTEngine\n"
        "from workers.errors import NotReady\n"
        "cuda = FakeCuda()  # cuda-python would stop at cudaSetDevice first; this reaches TensorRT\n"
        "engine = TensorRTEngine(sys.argv[1], lean=True, slots=2, cuda_module=cuda)\n"
        "try:\n"
        "    engine.activate()\n"
        "    print('ACTIVATED')\n"
        "except NotReady as exc:\n"
        "    print('REFUSED', exc)\n"
        "assert not engine.active and not cuda.device and not cuda.host and not cuda.streams\n"
    )
    # A subprocess, because a regression here is a segmentation fault, not an exception.
    done = subprocess.run([sys.executable, "-c", code, str(plan)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    if "ACTIVATED" in done.stdout or "deserialize" in done.stdout:
        pytest.skip("this machine has a usable GPU: TensorRT created the runtime")
    assert "TensorRT lean" in done.stdout and "could not create a runtime" in done.stdout and "CUDA" in done.stdout, done.stdout


def test_tensorrt_stubs_do_not_pass_for_tensorrt(monkeypatch):
    """A tensorrt/ folder of .pyi files imports as an empty namespace package: not TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(NotReady, match="type stubs only"):
        compat.load_tensorrt()
