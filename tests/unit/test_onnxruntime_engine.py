"""The ONNX Runtime backend's run into callers' arrays (the path of shared memory and of chunks)."""

import threading

import numpy as np
import pytest

from workers.engines.base import Engine
from workers.engines.onnxruntime import OnnxRuntimeEngine


@pytest.fixture
def never_copied(monkeypatch):
    """Engine's own _infer_into runs, then copies: fail if the backend falls back to it."""
    def refuse(self, feeds, out):
        raise AssertionError("ran, then copied into out")

    monkeypatch.setattr(Engine, "_infer_into", refuse)


def test_outputs_land_in_the_given_arrays_without_a_copy(demo_models, never_copied):
    x = np.random.default_rng(1).random((7, 64), dtype=np.float32)
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        expected = engine.infer({"input": x})
        out = {name: np.full(a.shape, -1, a.dtype) for name, a in expected.items()}
        got = engine.infer({"input": x}, out=out)
    for name, array in expected.items():
        assert got[name] is out[name]
        np.testing.assert_array_equal(out[name], array)


def test_a_view_into_a_larger_buffer_is_written_in_place_and_nothing_beside_it(demo_models, never_copied):
    """Chunks of a large request each write their rows of one array (workers/loaded.py)."""
    x = np.random.default_rng(2).random((12, 64), dtype=np.float32)
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        expected = engine.infer({"input": x})
        whole = {name: np.zeros(a.shape, a.dtype) for name, a in expected.items()}
        engine.infer({"input": x[4:8]}, out={name: a[4:8] for name, a in whole.items()})
    for name, array in expected.items():
        np.testing.assert_array_equal(whole[name][4:8], array[4:8])
        assert not whole[name][:4].any() and not whole[name][8:].any()


def test_concurrent_runs_into_arrays_of_their_own(demo_models, never_copied):
    rng = np.random.default_rng(3)
    inputs = [rng.random((16, 64), dtype=np.float32) for _ in range(8)]
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        expected = [engine.infer({"input": x})["probabilities"] for x in inputs]
        outs = [{"probabilities": np.empty((16, 10), np.float32), "label": np.empty(16, np.int64)} for _ in inputs]
        threads = [threading.Thread(target=lambda i=i: [engine.infer({"input": inputs[i]}, out=outs[i]) for _ in range(20)])
                   for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for want, out in zip(expected, outs):
        np.testing.assert_array_equal(out["probabilities"], want)


def test_a_wrong_shape_in_out_is_the_clients_error(demo_models):
    from workers.errors import InvalidInput

    x = np.zeros((3, 64), np.float32)
    with OnnxRuntimeEngine(demo_models["digits-mlp"]) as engine:
        out = {"probabilities": np.empty((4, 10), np.float32), "label": np.empty(3, np.int64)}
        with pytest.raises(InvalidInput, match=r"output 'probabilities'.*has shape \{4,10\}"):
            engine.infer({"input": x}, out=out)
