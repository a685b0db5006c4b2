"""The fake TensorRT calls, sets and numbers things as the real binding wheels do.

Its table (tests/data/trt_signatures/, made by scripts/extract_trt_signatures.py from
each real binding wheel) is checked against the two real sources installed here: the
``tensorrt_lean`` 11.4 module (exactly) and tensorrt-stubs 10.13 (for the 10.x
table). Then the fake itself must refuse what pybind11 refuses.
"""

import ast
import importlib.util
import pathlib
import re
import sys
from pathlib import Path

import pytest

from tests.needs import skip_unless
from tests.unit.fake_signatures import SIGNATURES_DIR, MissingRecord, load_signatures
from tests.unit.fake_tensorrt import LEAN_LABELS, VERSION_LABELS, FakeTensorRT, version_of
from workers.engines.tensorrt.compat import TrtApi
from workers.engines.tensorrt.names import NAMES_USED

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(sys.prefix) / "trt-stubs" / "tensorrt_bindings" / "tensorrt.pyi"
LABELS = VERSION_LABELS + LEAN_LABELS


def _extractor():
    spec = importlib.util.spec_from_file_location("extract_trt_signatures", ROOT / "scripts" / "extract_trt_signatures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(label: str) -> list[str]:
    return [line for line in (SIGNATURES_DIR / f"{label}.txt").read_text().splitlines() if line and not line.startswith("#")]


# --------------------------------------------------------------------------- the data


@pytest.mark.parametrize("label", LABELS)
def test_data_file_says_how_it_was_made(label):
    header = [line for line in (SIGNATURES_DIR / f"{label}.txt").read_text().splitlines() if line.startswith("#")]
    assert header[0].endswith(version_of(label))
    assert any("pip download --no-deps" in line for line in header)
    assert any("scripts/extract_trt_signatures.py" in line for line in header)


@pytest.mark.parametrize("label", LABELS)
def test_every_declared_name_has_a_record(label):
    """Without one the fake cannot judge a call: it raises MissingRecord instead."""
    table = load_signatures(label)
    major, lean = int(version_of(label).split(".")[0]), label.startswith("lean-")
    unrecorded = set()
    for name in NAMES_USED[(major, lean)] - {"__version__"}:
        owner, _, member = name.rpartition(".")
        if not (name in table.methods or name in table.properties or f"{name}.__init__" in table.methods
                or name in table.enums or member in table.enums.get(owner, {})):
            unrecorded.add(name)
    assert not unrecorded, f"run scripts/extract_trt_signatures.py --only {label}"


def test_records_match_the_real_lean_module():
    """The one real module installed here, walked as the wheels were: the same lines."""
    try:
        import tensorrt_lean
    except Exception as exc:  # ImportError, or OSError from its libraries
        skip_unless(False, f"tensorrt_lean does not import here: {exc}")
        raise
    label = f"lean-{tensorrt_lean.__version__}"
    if not (SIGNATURES_DIR / f"{label}.txt").exists():
        skip_unless(False, f"no signature records for {label}: run scripts/extract_trt_signatures.py")
    extractor = _extractor()
    version, records = extractor.walk([], "", "tensorrt_lean", extractor.declared_names(label))
    assert version == tensorrt_lean.__version__
    assert records == _records(label)


def _stub_classes(text: str) -> dict[str, dict]:
    """{Class: methods (name -> parameter-name tuples), read-only and settable properties, enum values} of a .pyi."""
    classes: dict[str, dict] = {}

    def walk(body, prefix):
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            info = classes.setdefault(prefix + node.name, {"methods": {}, "read-only": set(), "settable": set(), "enum": {}})
            for item in node.body:
                decorators = [ast.unparse(d) for d in getattr(item, "decorator_list", [])]
                if isinstance(item, ast.FunctionDef) and "property" in decorators:
                    info["read-only"].add(item.name)
                elif isinstance(item, ast.FunctionDef) and any(d.endswith(".setter") for d in decorators):
                    info["settable"].add(item.name)
                    info["read-only"].discard(item.name)
                elif isinstance(item, ast.FunctionDef):
                    args = item.args
                    names = tuple(a.arg for a in args.posonlyargs + args.args + args.kwonlyargs)
                    info["methods"].setdefault(item.name, set()).add(names[1:] if names[:1] == ("self",) else names)
                elif isinstance(item, ast.AnnAssign) and "ClassVar" not in ast.unparse(item.annotation):
                    info["settable"].add(item.target.id)  # stubgen writes read-write properties as attributes
            walk(node.body, prefix + node.name + ".")

    walk(ast.parse(text).body, "")
    path: list[str] = []
    for line in text.splitlines():  # enum values live in comments: "FP16: typing.ClassVar[BuilderFlag]  # value = <BuilderFlag.FP16: 0>"
        if match := re.match(r"^(\s*)class (\w+)", line):
            path = path[: len(match.group(1)) // 4] + [match.group(2)]
        elif match := re.match(r"^\s+(\w+): typing\.ClassVar\[[\w.]+\]  # value = <[\w.]+: (-?\d+)>", line):
            classes[".".join(path)]["enum"][match.group(1)] = int(match.group(2))
    return classes


def test_10x_records_agree_with_tensorrt_stubs():
    """tensorrt-stubs 10.13 (pybind11-stubgen of that wheel) against the 10.16 records.

    10.16 may add overloads (build_serialized_network's kernel_text did); every one the
    stubs know must be recorded, and properties and enum values must agree.
    """
    if not STUBS.is_file():
        skip_unless(False, f"tensorrt-stubs not installed in {STUBS.parent.parent}: run scripts/install_trt_stubs.py")
    classes = _stub_classes(STUBS.read_text())
    table = load_signatures("10.16.1.11")
    for name, overloads in table.methods.items():
        owner, _, method = name.rpartition(".")
        if owner:  # nptype is a Python function of the package, not in the bindings' stub
            recorded = {tuple(p.name for p in s.params) for s in overloads}
            assert classes[owner]["methods"][method] <= recorded, name
    for name, settable in table.properties.items():
        owner, _, attr = name.rpartition(".")
        assert attr in classes[owner]["settable" if settable else "read-only"], name
    for owner, members in table.enums.items():
        known = classes[owner]["enum"]
        assert {m: v for m, v in members.items() if m in known} == {m: known[m] for m in members if m in known}, owner
        assert len(set(members) & set(known)) >= len(members) - 2, owner  # a member or two newer than 10.13 at most


def test_enum_values_are_the_real_ones():
    """TensorRT 11 renumbered enums (EXPLICIT_BATCH, FP16, INT8, CUBLAS* removed): the fake has the real numbers."""
    v10, v11 = FakeTensorRT("10.16.1.11"), FakeTensorRT("11.4.0.106")
    assert (int(v10.BuilderFlag.VERSION_COMPATIBLE), int(v11.BuilderFlag.VERSION_COMPATIBLE)) == (13, 12)
    assert (int(v10.NetworkDefinitionCreationFlag.STRONGLY_TYPED), int(v11.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) == (1, 0)
    assert (int(v10.TacticSource.JIT_CONVOLUTIONS), int(v11.TacticSource.JIT_CONVOLUTIONS)) == (4, 1)
    assert int(FakeTensorRT("8.6.1").NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
    assert [int(FakeTensorRT(label).TensorIOMode.INPUT) for label in LABELS] == [1] * len(LABELS)


# --------------------------------------------------------------------------- the fake refuses what pybind11 refuses


@pytest.mark.parametrize("label", LABELS)
def test_wrong_calls_raise_type_error(label):
    fake = FakeTensorRT(label)
    api = TrtApi(fake)
    runtime = fake.Runtime(api.new_logger())
    with pytest.raises(TypeError, match=r"deserialize_cuda_engine\(\): incompatible function arguments"):
        runtime.deserialize_cuda_engine()  # too few
    with pytest.raises(TypeError, match="incompatible function arguments"):
        runtime.deserialize_cuda_engine(b"{}", b"{}")  # too many
    with pytest.raises(TypeError, match="incompatible function arguments"):
        runtime.deserialize_cuda_engine(plan=b"{}")  # no such keyword
    assert runtime.deserialize_cuda_engine(serialized_engine=b"{}") is None  # the real keyword: called (and refused as no plan)
    with pytest.raises(TypeError, match=r"__init__\(\): incompatible constructor arguments"):
        fake.Runtime()
    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        fake.Runtime(object())  # not an ILogger
    context = fake.new("IExecutionContext", engine=None, shapes={}, addresses={})
    with pytest.raises(TypeError, match="incompatible function arguments"):
        context.set_tensor_address("input", 1.5)  # an address is an int
    with pytest.raises(TypeError, match="incompatible function arguments"):
        context.execute_async_v3(stream=0)  # the keyword is stream_handle


@pytest.mark.parametrize("label", VERSION_LABELS)
def test_wrong_builder_calls_raise_type_error(label):
    fake = FakeTensorRT(label)
    config = fake.new("IBuilderConfig", tactic_mask=0)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_flag(13)  # an int is no BuilderFlag
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_timing_cache(fake.new("ITimingCache", data=b""))  # ignore_mismatch is required
    parser = fake.new("OnnxParser", network=None, logger=None)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        parser.parse_from_file(pathlib.Path("model.onnx"))  # pybind11 takes a str, not a Path


@pytest.mark.parametrize("label", LABELS)
def test_wrong_assignments_raise_attribute_error(label):
    fake = FakeTensorRT(label)
    runtime = fake.Runtime(TrtApi(fake).new_logger())
    engine = fake.new("ICudaEngine", plan={"io": []})
    with pytest.raises(AttributeError, match="property 'num_io_tensors' of 'ICudaEngine' object has no setter"):
        engine.num_io_tensors = 3
    with pytest.raises(AttributeError, match="'deserialize_cuda_engine' is read-only"):
        runtime.deserialize_cuda_engine = None
    with pytest.raises(AttributeError, match="has no attribute 'engine_host_code_alowed'"):
        runtime.engine_host_code_alowed = True  # a typo is no new attribute on a pybind11 object
    assert fake.assignments == []


def test_a_name_without_a_record_cannot_be_used():
    """The lean runtime path declares no engine_host_code_allowed: the fake will not guess how it behaves."""
    fake = FakeTensorRT("lean-11.4.0.106")
    runtime = fake.Runtime(TrtApi(fake).new_logger())
    with pytest.raises(MissingRecord, match="Runtime.engine_host_code_allowed.*extract_trt_signatures"):
        runtime.engine_host_code_allowed = True


def test_the_fake_and_the_real_lean_module_refuse_the_same_calls():
    """ILogger.log is the one method the real module runs without a GPU: the same calls must fail on both."""
    try:
        import tensorrt_lean
    except Exception as exc:  # ImportError, or OSError from its libraries
        skip_unless(False, f"tensorrt_lean does not import here: {exc}")
        raise
    fake = FakeTensorRT(f"lean-{tensorrt_lean.__version__}")
    calls = {
        "positional": lambda s: ((s, "message"), {}),
        "keywords": lambda s: ((), {"severity": s, "msg": "message"}),
        "unknown keyword": lambda s: ((s,), {"message": "message"}),
        "too few": lambda s: ((s,), {}),
        "too many": lambda s: ((s, "message", 1), {}),
        "an int for the enum": lambda s: ((1, "message"), {}),
        "a Path for the str": lambda s: ((s, pathlib.Path("message")), {}),
    }

    def refused(module, call):
        args, kwargs = call(module.ILogger.Severity.WARNING)
        try:
            module.ILogger().log(*args, **kwargs)
        except TypeError:
            return True
        except (RuntimeError, NotImplementedError):  # the real base class is pure virtual; the fake has no behaviour
            return False
        return False

    real = {what: refused(tensorrt_lean, call) for what, call in calls.items()}
    assert real == {what: refused(fake, call) for what, call in calls.items()}
    assert list(real.values()) == [False, False, True, True, True, True, True]
