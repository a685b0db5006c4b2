"""Custom-layer plugin libraries on the TensorRT backend: loaded before the parse or the
deserialization that needs them, released after the engine and the runtime, one load per
process (the plugin registry is the process's), on each version's path (8.6: ctypes and
init_libnvinfer_plugins; 10.x and 11.x: the plugin registry). The names each path touches
are checked against the real binding wheels in test_trt_names.py."""

import ctypes.util

import numpy as np
import pytest

from tests.unit.fake_cuda import FakeCuda
from tests.unit.fake_tensorrt import FakeTensorRT
from workers.engines.onnxruntime import describe_model
from workers.engines.tensorrt import TensorRTEngine, TrtBuildOptions, build_plan
from workers.engines.tensorrt.compat import TrtApi
from workers.errors import IncompatibleArtifact

PLUGIN = ctypes.util.find_library("m") or "libm.so.6"  # any shared library: 8.6 loads it with ctypes for real


@pytest.fixture(scope="module")
def cnn(demo_models):
    return demo_models["cnn-small"], describe_model(demo_models["cnn-small"])[0]


def _plan(label, cnn, tmp_path):
    source, inputs = cnn
    return build_plan(source, tmp_path / f"{label}.plan", TrtBuildOptions(inputs=inputs, max_batch=2),
                      api=TrtApi(FakeTensorRT(label))).plan_path


@pytest.mark.parametrize("label", ["10.16.1.11", "11.4.0.106", "lean-10.16.1.11", "lean-11.4.0.106"])
def test_registry_path_loads_before_and_deregisters_after_engine_and_runtime(label, cnn, tmp_path):
    plan = _plan(label.removeprefix("lean-"), cnn, tmp_path)
    fake = FakeTensorRT(label)
    engine = TensorRTEngine(plan, slots=2, api=TrtApi(fake), cuda_module=FakeCuda(events=fake.events), lean=fake.lean,
                            plugin_libraries=(PLUGIN,))
    with engine:
        engine.infer({"input": np.zeros((1, 3, 64, 64), np.float32)})
        assert fake.events[0] == f"load plugin library {PLUGIN}"  # before the runtime deserialized anything
        fake.events.clear()
    order = [e for e in fake.events if e.startswith(("destroy ICudaEngine", "destroy Runtime", "deregister plugin"))]
    assert order == ["destroy ICudaEngine", "destroy Runtime", f"deregister plugin library {PLUGIN}"]


def test_8_6_loads_with_ctypes_then_tensorrts_own_plugins_and_keeps_the_library(cnn, tmp_path):
    plan = _plan("8.6.1", cnn, tmp_path)
    fake = FakeTensorRT("8.6.1")
    with TensorRTEngine(plan, api=TrtApi(fake), cuda_module=FakeCuda(), plugin_libraries=(PLUGIN,)):
        assert "init_libnvinfer_plugins" in fake.events
    # creators that registered themselves cannot be taken back: never deregistered, never unloaded
    assert not any(e.startswith("deregister") for e in fake.events)
    assert "get_plugin_registry" not in fake.touched and "IPluginRegistry.load_library" not in fake.touched


def test_lean_8_6_has_no_plugins_of_its_own_to_initialise(cnn, tmp_path):
    plan = _plan("8.6.1", cnn, tmp_path)
    fake = FakeTensorRT("lean-8.6.1")  # init_libnvinfer_plugins is not in its name list: touching it would fail
    with TensorRTEngine(plan, api=TrtApi(fake), cuda_module=FakeCuda(), lean=True, plugin_libraries=(PLUGIN,)) as engine:
        engine.infer({"input": np.zeros((1, 3, 64, 64), np.float32)})
    assert "init_libnvinfer_plugins" not in fake.events


def test_two_engines_share_one_load_and_the_last_one_releases_it(cnn, tmp_path):
    plan = _plan("11.4.0.106", cnn, tmp_path)
    fake = FakeTensorRT("11.4.0.106")
    api = TrtApi(fake)
    first = TensorRTEngine(plan, api=api, cuda_module=FakeCuda(), plugin_libraries=(PLUGIN,)).activate()
    second = TensorRTEngine(plan, api=api, cuda_module=FakeCuda(), plugin_libraries=(PLUGIN,)).activate()
    first.deactivate()
    assert fake.events.count(f"load plugin library {PLUGIN}") == 1 and not any(e.startswith("deregister") for e in fake.events)
    second.deactivate()
    assert fake.events.count(f"deregister plugin library {PLUGIN}") == 1


def test_a_plugin_library_tensorrt_refuses_is_named_and_nothing_stays_loaded(cnn, tmp_path):
    plan = _plan("10.16.1.11", cnn, tmp_path)
    fake = FakeTensorRT("10.16.1.11")
    fake.world.refused_plugins = {"/nowhere/libbroken.so"}
    engine = TensorRTEngine(plan, api=TrtApi(fake), cuda_module=FakeCuda(), plugin_libraries=(PLUGIN, "/nowhere/libbroken.so"))
    with pytest.raises(IncompatibleArtifact, match="could not load the plugin library libbroken.so"):
        engine.activate()
    assert fake.events.count(f"deregister plugin library {PLUGIN}") == 1  # the one that did load is given back


def test_a_build_loads_the_plugins_for_the_parser_and_releases_them(cnn, tmp_path):
    source, inputs = cnn
    fake = FakeTensorRT("10.16.1.11")
    build_plan(source, tmp_path / "p.plan", TrtBuildOptions(inputs=inputs, max_batch=2, plugin_libraries=(PLUGIN,)), api=TrtApi(fake))
    loads = [e for e in fake.events if "plugin library" in e]
    assert loads == [f"load plugin library {PLUGIN}", f"deregister plugin library {PLUGIN}"]
