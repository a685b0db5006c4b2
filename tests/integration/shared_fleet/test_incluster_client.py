"""The in-cluster client (``cluster.incluster.InClusterClient``) on a real fleet: the data plane
from the test's own Ray driver, tensors in shared memory and through Ray's object store."""

import asyncio
import os

import numpy as np
import onnxruntime as ort
import pytest
import ray

from cluster.incluster import InClusterClient
from cluster.names import CONTROLLER_NAME, NAMESPACE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(shared_fleet):
    return shared_fleet


def _regions() -> set[str]:
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    return {r["name"] for r in ray.get(controller.shm_status.remote())}


def _expected(source, X: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": X})))


def test_concurrent_calls_in_shared_memory_match_onnx_runtime(fleet):
    """Six calls at once, each in its own region of this process (asked for: these inputs are small
    enough to go inside the Ray call by default); the answers are the model's."""
    rng = np.random.default_rng(11)
    batches = [rng.random((rows, 64), dtype=np.float32) for rows in (1, 3, 17, 64, 200, 256)]

    async def scenario():
        client = InClusterClient(shared_memory=True)
        try:
            answers = await asyncio.gather(*(client.infer_with_parameters("digits-mlp", {"input": X})
                                             for X in batches))
            during = _regions()
            mine = {arena.region for arena in client._arenas}
            # a second round reuses the regions: nothing is registered anew
            again = await client.infer("digits-mlp", {"input": batches[0]}, outputs=["probabilities"])
            return answers, during, mine, {arena.region for arena in client._arenas}, again, client.calls_over_http
        finally:
            await client.close()

    answers, during, mine, after_second, again, over_http = asyncio.run(scenario())
    assert over_http == len(batches) + 1  # each to the worker's own endpoint, none through Ray
    assert len(mine) == len(batches) and all(mine)  # one region per call in flight
    assert mine <= during and after_second == mine
    for X, answer in zip(batches, answers):
        expected = _expected(fleet["sources"]["digits-mlp"], X)
        assert answer.outputs.keys() == expected.keys()
        np.testing.assert_array_equal(answer.outputs["label"], expected["label"])
        np.testing.assert_allclose(answer.outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)
        assert answer.parameters["fleet_worker"].endswith("-cpu")
    assert set(again) == {"probabilities"}
    assert not mine & _regions()  # close() unregistered them ...
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in mine)  # ... and unlinked the objects


def test_shared_memory_through_ray_when_the_worker_endpoint_is_not_used(fleet):
    """The Ray path for requests in shared memory (what a call takes when the worker's endpoint cannot
    answer it): the same answers, the outputs written into the region."""
    X = np.random.default_rng(13).random((40, 64), dtype=np.float32)

    async def scenario():
        client = InClusterClient(shared_memory=True)
        client._http = False
        try:
            return await client.infer_with_parameters("digits-mlp", {"input": X}), client.calls_over_http
        finally:
            await client.close()

    answer, over_http = asyncio.run(scenario())
    assert over_http == 0
    expected = _expected(fleet["sources"]["digits-mlp"], X)
    np.testing.assert_array_equal(answer.outputs["label"], expected["label"])
    np.testing.assert_allclose(answer.outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert answer.parameters["fleet_worker"].endswith("-cpu")


def test_large_inputs_take_shared_memory_by_default_small_ones_the_ray_call(fleet):
    """By default (``shared_memory=None``) a 384 KiB input goes through a region, 256 bytes do not;
    ``shared_memory=False`` registers nothing; all three answer alike."""
    X = np.random.default_rng(12).standard_normal((8, 3, 64, 64)).astype(np.float32)
    before = _regions()

    async def scenario():
        plain, auto = InClusterClient(shared_memory=False), InClusterClient()
        try:
            small = await auto.infer("digits-mlp", {"input": X[0, 0, :1, :64]})
            after_small = _regions()
            return (await plain.infer("cnn-small", {"input": X}), await auto.infer("cnn-small", {"input": X}),
                    after_small, _regions(), small)
        finally:
            await plain.close()
            await auto.close()

    via_store, via_shm, after_small, during, small = asyncio.run(scenario())
    assert after_small == before and small["probabilities"].shape == (1, 10)
    assert len(during - before) == 1  # the default client's one region, for the large input; the other none
    for name, expected in _expected(fleet["sources"]["cnn-small"], X).items():
        np.testing.assert_allclose(via_store[name], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(via_shm[name], via_store[name])


def test_outputs_read_in_place_hold_their_region_until_released(fleet):
    """``in_place=True``: the outputs are the region's own bytes (no copy out); while an answer is held
    its region serves no other call; ``release()`` (here from another thread) gives it back."""
    rng = np.random.default_rng(14)
    first, second = rng.random((50, 64), dtype=np.float32), rng.random((70, 64), dtype=np.float32)

    async def scenario():
        client = InClusterClient(shared_memory=True)
        try:
            held = await client.infer_with_parameters("digits-mlp", {"input": first}, in_place=True)
            kept = {name: array.copy() for name, array in held.outputs.items()}
            views = all(array.base is not None and not array.flags.owndata for array in held.outputs.values())
            other = await client.infer_with_parameters("digits-mlp", {"input": second}, in_place=True)
            two = len(client._arenas)  # the held region was not reused
            unchanged = all(np.array_equal(held.outputs[n], kept[n]) for n in kept)
            await asyncio.to_thread(held.release)
            held.release()  # a second release gives nothing back twice
            await asyncio.sleep(0)  # the loop runs the give-back
            free_after = len(client._free)
            other.release()
            await asyncio.sleep(0)
            third = await client.infer("digits-mlp", {"input": first})
            return kept, views, two, unchanged, free_after, len(client._arenas), third
        finally:
            await client.close()

    kept, views, two, unchanged, free_after, arenas_after, third = asyncio.run(scenario())
    assert views and two == 2 and unchanged and free_after == 1 and arenas_after == 2
    expected = _expected(fleet["sources"]["digits-mlp"], first)
    np.testing.assert_array_equal(kept["label"], expected["label"])
    np.testing.assert_allclose(kept["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(third["label"], expected["label"])  # a reused region, copied out as before
