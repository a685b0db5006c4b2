"""Canned ``/v2/fleet/status`` and ``/v2/fleet/stats`` documents: the simulated
hetero-sim fleet (configs/hetero-sim.yaml) with four GPUs, two T4s, a P4 and a V100.

Functions, not constants, so each test gets its own copy to change.
"""

from __future__ import annotations

GIB = 1024**3


def _runtimes(trt: str, min_cc: str) -> list[dict]:
    return [
        {"backend": "tensorrt", "version": trt, "provider": "tensorrt", "simulated": True, "lean": False,
         "min_compute_capability": min_cc},
        {"backend": "onnxruntime", "version": "1.31.1", "provider": "cpu", "simulated": False, "lean": False,
         "min_compute_capability": min_cc},
    ]


def _worker(node: str, index: int, name: str, cc: str, total: int, trt: str, *, used: int,
            ledger: list[dict], engines: dict, counters: dict, runnable: list[str], alive: bool = True) -> dict:
    return {
        "worker_id": f"{node}-gpu{index}",
        "alive": alive,
        "device": {"name": name, "uuid": f"SIM-{node}-{index}", "kind": "gpu", "compute_capability": cc,
                   "total_memory_bytes": total, "simulated": True, "cuda_ordinal": None},
        "simulated": True,
        "runtimes": _runtimes(trt, "6.0"),
        "budget_bytes": int(total * 0.9),
        "used_bytes": used,
        "ledger": ledger,
        "counters": counters,
        "engines": engines,
        "nvml_used_bytes": None,
        "runnable_not_loaded": runnable,
    }


def _engine(model: str, precision: str, *, success: int, rows: int, batches: int, queue_us: float,
            compute_us: float, batch_sizes: dict[str, int], failure: int = 0) -> dict:
    return {"model": model, "version": "1", "precision": precision, "success": success, "failure": failure,
            "inference_count": rows, "exec_count": batches, "queue_us": queue_us, "compute_us": compute_us,
            "batch_sizes": batch_sizes}


def sample_status() -> dict:
    t4_mlp = "digits-mlp:1:float32:tensorrt-10.16.1-sm75-sim"
    t4_cnn = "cnn-small:1:float16:tensorrt-10.16.1-sm75-sim"
    p4_mlp = "digits-mlp:1:int8:tensorrt-8.6.1-sm61-sim"
    v100_cnn = "cnn-small:1:float32:tensorrt-10.4.0-sm70-sim"
    return {
        "fleet": "hetero-sim", "simulated": True, "epoch": 12, "restarts": 0,
        "nodes": [
            {"node": "t4-node", "host": "vm", "workers": [
                _worker("t4-node", 0, "Tesla T4", "7.5", 15 * GIB, "10.16.1.11", used=46827825,
                        ledger=[{"key": t4_mlp, "footprint_bytes": 17108819, "loaded_at": 491.7,
                                 "last_used": 495.2, "in_flight": 0},
                                {"key": t4_cnn, "footprint_bytes": 29719006, "loaded_at": 492.0,
                                 "last_used": 494.9, "in_flight": 1}],
                        engines={t4_mlp: _engine("digits-mlp", "float32", success=10, rows=37, batches=6,
                                                 queue_us=1234.0, compute_us=5678.0, batch_sizes={"1": 2, "8": 4}),
                                 t4_cnn: _engine("cnn-small", "float16", success=4, rows=4, batches=4,
                                                 queue_us=210.5, compute_us=9100.25, batch_sizes={"1": 4})},
                        counters={"loads": 2, "evictions": 0, "unloads": 0, "inferences": 14, "failures": 0},
                        runnable=[]),
                _worker("t4-node", 1, "Tesla T4", "7.5", 15 * GIB, "10.16.1.11", used=17108819,
                        ledger=[{"key": t4_mlp, "footprint_bytes": 17108819, "loaded_at": 480.1,
                                 "last_used": 493.0, "in_flight": 0}],
                        engines={t4_mlp: _engine("digits-mlp", "float32", success=7, rows=300, batches=3,
                                                 queue_us=800.0, compute_us=4000.0,
                                                 batch_sizes={"44": 1, "256": 1, "2000": 1})},
                        counters={"loads": 3, "evictions": 1, "unloads": 1, "inferences": 7, "failures": 0},
                        runnable=["cnn-small:1:float16"]),
            ]},
            {"node": "p4-node", "host": "vm", "workers": [
                _worker("p4-node", 0, "Tesla P4", "6.1", 8 * GIB, "8.6.1", used=5242880,
                        ledger=[{"key": p4_mlp, "footprint_bytes": 5242880, "loaded_at": 300.0,
                                 "last_used": 410.0, "in_flight": 0}],
                        engines={p4_mlp: _engine("digits-mlp", "int8", success=5, rows=5, batches=5,
                                                 queue_us=50.0, compute_us=700.0, batch_sizes={"1": 5},
                                                 failure=1)},
                        counters={"loads": 1, "evictions": 0, "unloads": 0, "inferences": 5, "failures": 1},
                        runnable=["cnn-small:1:float32"]),
            ]},
            {"node": "v100-node", "host": "vm", "workers": [
                _worker("v100-node", 0, "Tesla V100-SXM2-16GB", "7.0", 16 * GIB, "10.4.0", used=12884901888,
                        ledger=[{"key": v100_cnn, "footprint_bytes": 12884901888, "loaded_at": 100.0,
                                 "last_used": 200.0, "in_flight": 2}],
                        engines={v100_cnn: _engine("cnn-small", "float32", success=3, rows=3, batches=3,
                                                   queue_us=30.0, compute_us=3000.0, batch_sizes={"1": 3})},
                        counters={"loads": 1, "evictions": 0, "unloads": 0, "inferences": 3, "failures": 0},
                        runnable=["digits-mlp:1:float32"]),
            ]},
        ],
        "models": {"digits-mlp": ["1"], "cnn-small": ["1"]},
        "builds": [
            {"model": "digits-mlp", "version": "1", "precision": "int8", "target": "tensorrt-8.6.1-sm61-sim",
             "accuracy": "top1_agreement 0.9833, rel_l2_error 0.0213", "judged_on": "60 calibration rows kept out of the calibration",
             "weak": False},
            {"model": "cnn-small", "version": "1", "precision": "float16", "target": "tensorrt-10.16.1-sm75-sim",
             "accuracy": "rel_l2_error 0.0004591", "judged_on": "random inputs", "weak": True},
        ],
        "events": [
            {"time": 1795308344.3, "event": "load", "worker": "t4-node-gpu0", "engine": t4_mlp, "evicted": []},
            {"time": 1795308345.9, "event": "load", "worker": "t4-node-gpu0", "engine": t4_cnn, "evicted": []},
            {"time": 1795308350.0, "event": "load", "worker": "t4-node-gpu1", "engine": t4_mlp,
             "evicted": ["cnn-small:1:float16:tensorrt-10.16.1-sm75-sim"]},
        ],
    }


def sample_stats() -> dict:
    return {
        "uptime_s": 120.5,
        "models": {
            "digits-mlp": {"version": "1", "success": 200, "failure": 3, "failure_by_reason": {"InvalidInput": 3},
                           "request_duration_us_sum": 812345.0, "rate_per_s": 12.3, "p50_ms": 3.1, "p99_ms": 9.8},
            "cnn-small": {"version": "1", "success": 40, "failure": 2,
                          "failure_by_reason": {"NoCapacity": 1, "InvalidInput": 1},
                          "request_duration_us_sum": 402000.5, "rate_per_s": 0.8, "p50_ms": 8.4, "p99_ms": 31.0},
        },
    }
