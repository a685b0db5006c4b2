"""TensorRTEngine's CUDA side on a real GPU.

TensorRT itself cannot be installed here, so the first test drives the engine with the
fake TensorRT (tests/unit/fake_tensorrt.py) over real cuda-python: real pinned host
buffers, device buffers, streams and copies, and device memory back to its baseline
after teardown. Where the real lean runtime (tensorrt_lean) imports, the second test
creates a real TensorRT Runtime on the GPU and checks that a plan it cannot
deserialize is refused with TensorRT's own words.
"""

import importlib
import threading

import numpy as np
import onnxruntime as ort
import pytest

from tests.unit.fake_tensorrt import FakeTensorRT
from tests.unit.fake_trt_world import TRT_TO_NUMPY
from workers.engines.tensorrt import TensorRTEngine, TrtBuildOptions, build_plan
from workers.engines.tensorrt.compat import TrtApi
from workers.errors import IncompatibleArtifact
from workers.tensors import TensorSpec

pytestmark = pytest.mark.gpu


def _small_cnn(path):
    """Conv-Relu-Flatten-Gemm on [N, 3, 64, 64] (cluster.demo's cnn-small needs the cluster's dependencies)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal((10, 8 * 64 * 64)).astype(np.float32) * 0.01, "w2"),
        numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _cudart():
    from cuda.bindings import runtime

    return runtime


def _check(result):
    assert result[0] == _cudart().cudaError_t.cudaSuccess, result
    return result[1] if len(result) > 1 else None


def _gpu_execute(fake, context, stream):
    """The fake engine's work, on real device memory: copy in, ONNX Runtime, copy out."""
    import base64

    rt = _cudart()
    plan = context._state["engine"]._state["plan"]
    _check(rt.cudaStreamSynchronize(stream))  # the engine's input copies are on this stream
    feeds = {}
    for tensor in plan["io"]:
        if tensor["mode"] == "INPUT":
            host = np.empty(context._state["shapes"][tensor["name"]], TRT_TO_NUMPY[tensor["dtype"]])
            _check(rt.cudaMemcpy(host.ctypes.data, context._state["addresses"][tensor["name"]], host.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            feeds[tensor["name"]] = host
    session = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
    for output, value in zip(session.get_outputs(), session.run(None, feeds)):
        value = np.ascontiguousarray(value)
        _check(rt.cudaMemcpy(context._state["addresses"][output.name], value.ctypes.data, value.nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
    return True


def _free_device_bytes() -> int:
    error, free, _total = _cudart().cudaMemGetInfo()
    assert error == _cudart().cudaError_t.cudaSuccess, error
    return int(free)


def test_engine_buffers_streams_and_teardown_on_a_real_gpu(tmp_path):
    rt = _cudart()
    _check(rt.cudaSetDevice(0))
    _check(rt.cudaFree(0))  # create the primary context before measuring
    model = _small_cnn(tmp_path / "small-cnn.onnx")
    specs = (TensorSpec("input", "FP32", (-1, 3, 64, 64)),)
    info = build_plan(model, tmp_path / "cnn.plan", TrtBuildOptions(inputs=specs, max_batch=16),
                      api=TrtApi(FakeTensorRT("10.16.1.11")))
    fake = FakeTensorRT("10.16.1.11")
    fake.behaviours["IExecutionContext.execute_async_v3"] = _gpu_execute
    reference = ort.InferenceSession(str(model))
    rng = np.random.default_rng(0)

    def load_run_unload() -> int:
        """One load, six concurrent requests over three slots, one unload; device bytes held while loaded."""
        before = _free_device_bytes()
        engine = TensorRTEngine(info.plan_path, device_id=0, slots=3, api=TrtApi(fake))  # real cuda-python
        with engine:
            held = before - _free_device_bytes()
            batches = [rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (1, 5, 16, 7, 2, 9)]
            results = {}
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.infer({"input": batches[i]})))
                       for i in range(len(batches))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, x in enumerate(batches):
                np.testing.assert_allclose(results[i]["logits"], reference.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
        return held

    start = _free_device_bytes()
    load_run_unload()
    # The first streams and copies make the CUDA driver set up resources it keeps for the
    # process; what matters is that loads and unloads after that do not leak.
    baseline = _free_device_bytes()
    print(f"first load left {start - baseline} bytes to the CUDA driver")
    for _ in range(3):
        held = load_run_unload()
        # The driver hands out device memory in 2 MiB pages and packs small buffers into
        # them (seen on an H200: 3 slots of ~0.8 MB held exactly 2 MiB), so the buffers show
        # as at least one page, not as their byte sum.
        assert held >= 2 << 20, held
        assert _free_device_bytes() == baseline, f"teardown left {baseline - _free_device_bytes()} bytes of device memory"


def _real_lean():
    for name in ("tensorrt_lean", "tensorrt_lean_bindings"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    pytest.skip("the TensorRT lean runtime does not import here")


def test_real_lean_runtime_refuses_a_plan_it_cannot_deserialize(tmp_path):
    lean = _real_lean()
    api = TrtApi(lean)
    assert api.lean
    plan = tmp_path / "not-a-plan.plan"
    plan.write_bytes(b"\0" * 4096)
    engine = TensorRTEngine(plan, device_id=0, slots=2, lean=True, api=api)
    with pytest.raises(IncompatibleArtifact) as err:
        engine.activate()
    message = str(err.value)
    assert f"with TensorRT lean {lean.__version__}:" in message and "TensorRT logged no error" not in message, message
    print("TensorRT said:", message)
    assert not engine.active
