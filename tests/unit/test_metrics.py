"""``cluster.metrics.render_metrics``: Prometheus text that prometheus_client parses."""

from __future__ import annotations

import copy

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import BATCH_SIZE_BUCKETS, render_metrics
from tests.status_samples import sample_stats, sample_status

COUNTERS = {
    "fleet_nv_inference_request_success", "fleet_nv_inference_request_failure",
    "fleet_nv_inference_request_duration_us", "fleet_nv_inference_count", "fleet_nv_inference_exec_count",
    "fleet_nv_inference_queue_duration_us", "fleet_nv_inference_compute_infer_duration_us",
    "fleet_model_loads", "fleet_model_evictions", "fleet_model_unloads", "fleet_nv_inference_request_rejected",
}
GAUGES = {"fleet_gpu_budget_bytes", "fleet_gpu_ledger_bytes", "fleet_gpu_memory_total_bytes", "fleet_worker_up"}


def parse(text: str) -> dict:
    """family name -> family, as prometheus_client reads it (it drops a counter's ``_total``)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(family, sample: str | None = None) -> dict[frozenset, float]:
    """{frozenset(labels.items()): value} for one family (optionally one sample name)."""
    return {frozenset(s.labels.items()): s.value for s in family.samples if sample is None or s.name == sample}


def L(**labels) -> frozenset:
    return frozenset(labels.items())


@pytest.fixture
def families():
    return parse(render_metrics(sample_status(), sample_stats()))


def test_every_family_has_help_and_type_once_and_parses():
    text = render_metrics(sample_status(), sample_stats())
    assert text.endswith("\n")
    for name in ("fleet_nv_inference_request_success", "fleet_batch_size", "fleet_model_loads_total",
                 "fleet_gpu_budget_bytes"):
        assert text.count(f"# HELP {name} ") == 1
        assert text.count(f"# TYPE {name} ") == 1
    fams = parse(text)
    assert {n for n, f in fams.items() if f.type == "counter"} == COUNTERS
    assert {n for n, f in fams.items() if f.type == "gauge"} == GAUGES
    assert fams["fleet_batch_size"].type == "histogram"
    assert all(f.documentation for f in fams.values())


def test_triton_names_on_the_wire():
    text = render_metrics(sample_status(), sample_stats())
    # Triton writes its counters without a _total suffix; so do we, so dashboards only change the prefix.
    assert 'fleet_nv_inference_request_success{model="digits-mlp",version="1"} 200\n' in text
    assert 'fleet_nv_inference_count{model="digits-mlp",version="1",worker="t4-node-gpu0"} 37\n' in text


def test_ingress_request_stats(families):
    assert values(families["fleet_nv_inference_request_success"]) == {
        L(model="digits-mlp", version="1"): 200, L(model="cnn-small", version="1"): 40}
    assert values(families["fleet_nv_inference_request_failure"]) == {
        L(model="digits-mlp", version="1", reason="InvalidInput"): 3,
        L(model="cnn-small", version="1", reason="InvalidInput"): 1,
        L(model="cnn-small", version="1", reason="NoCapacity"): 1,
    }
    assert values(families["fleet_nv_inference_request_duration_us"]) == {
        L(model="digits-mlp", version="1"): 812345.0, L(model="cnn-small", version="1"): 402000.5}


def test_unclassified_failures_count_as_other():
    stats = sample_stats()
    stats["models"]["digits-mlp"]["failure"] = 5  # 3 classified as InvalidInput
    fam = parse(render_metrics({}, stats))["fleet_nv_inference_request_failure"]
    assert values(fam)[L(model="digits-mlp", version="1", reason="Other")] == 2


def test_worker_engine_stats(families):
    wk = dict(model="digits-mlp", version="1", worker="t4-node-gpu0")
    assert values(families["fleet_nv_inference_count"])[L(**wk)] == 37
    assert values(families["fleet_nv_inference_exec_count"])[L(**wk)] == 6
    assert values(families["fleet_nv_inference_queue_duration_us"])[L(**wk)] == 1234.0
    assert values(families["fleet_nv_inference_compute_infer_duration_us"])[L(**wk)] == 5678.0
    workers = {dict(k)["worker"] for k in values(families["fleet_nv_inference_count"])}
    assert workers == {"t4-node-gpu0", "t4-node-gpu1", "p4-node-gpu0", "v100-node-gpu0"}


def test_engines_of_one_model_version_on_one_worker_are_summed():
    status = sample_status()
    w = status["nodes"][0]["workers"][0]
    w["engines"]["digits-mlp:1:int8:tensorrt-10.16.1-sm75-sim"] = {
        "model": "digits-mlp", "version": "1", "precision": "int8", "success": 1, "failure": 0,
        "inference_count": 3, "exec_count": 1, "queue_us": 6.0, "compute_us": 22.0, "batch_sizes": {"3": 1}}
    fams = parse(render_metrics(status, {}))
    wk = L(model="digits-mlp", version="1", worker="t4-node-gpu0")
    assert values(fams["fleet_nv_inference_count"])[wk] == 40
    assert values(fams["fleet_nv_inference_exec_count"])[wk] == 7
    assert values(fams["fleet_batch_size"], "fleet_batch_size_count")[wk] == 7


def test_batch_size_histogram(families):
    fam = families["fleet_batch_size"]
    wk = dict(model="digits-mlp", version="1", worker="t4-node-gpu0")  # {"1": 2, "8": 4}
    buckets = {dict(k)["le"]: v for k, v in values(fam, "fleet_batch_size_bucket").items()
               if dict(k).items() >= wk.items()}
    assert list(buckets) == [str(b) for b in BATCH_SIZE_BUCKETS] + ["+Inf"]
    assert buckets["1"] == buckets["2"] == buckets["4"] == 2
    assert buckets["8"] == buckets["1024"] == buckets["+Inf"] == 6
    assert values(fam, "fleet_batch_size_count")[L(**wk)] == 6
    assert values(fam, "fleet_batch_size_sum")[L(**wk)] == 1 * 2 + 8 * 4

    # {"44": 1, "256": 1, "2000": 1}: a batch beyond the last bound counts only in +Inf.
    wk = dict(model="digits-mlp", version="1", worker="t4-node-gpu1")
    buckets = {dict(k)["le"]: v for k, v in values(fam, "fleet_batch_size_bucket").items()
               if dict(k).items() >= wk.items()}
    assert (buckets["32"], buckets["64"], buckets["256"], buckets["1024"], buckets["+Inf"]) == (0, 1, 2, 2, 3)
    assert values(fam, "fleet_batch_size_sum")[L(**wk)] == 44 + 256 + 2000


def test_worker_counters_and_up(families):
    assert values(families["fleet_model_loads"]) == {
        L(worker="t4-node-gpu0"): 2, L(worker="t4-node-gpu1"): 3, L(worker="p4-node-gpu0"): 1,
        L(worker="v100-node-gpu0"): 1}
    assert values(families["fleet_model_evictions"])[L(worker="t4-node-gpu1")] == 1
    assert set(values(families["fleet_worker_up"]).values()) == {1}

    status = sample_status()
    status["nodes"][1]["workers"][0]["alive"] = False
    up = values(parse(render_metrics(status, {}))["fleet_worker_up"])
    assert up[L(worker="p4-node-gpu0")] == 0 and up[L(worker="t4-node-gpu0")] == 1


def test_device_gauges(families):
    t4 = L(worker="t4-node-gpu0", device="Tesla T4", uuid="SIM-t4-node-0", simulated="true")
    assert values(families["fleet_gpu_budget_bytes"])[t4] == 14495514624
    assert values(families["fleet_gpu_ledger_bytes"])[t4] == 46827825
    assert values(families["fleet_gpu_memory_total_bytes"])[t4] == 16106127360
    assert len(values(families["fleet_gpu_budget_bytes"])) == 4
    # Simulated devices have no NVML reading, so the family is absent.
    assert "fleet_gpu_memory_used_bytes" not in families


def test_nvml_used_memory_on_real_gpus():
    status = sample_status()
    w = status["nodes"][2]["workers"][0]
    w["simulated"] = w["device"]["simulated"] = False
    w["nvml_used_bytes"] = 1_234_567_890
    fam = parse(render_metrics(status, {}))["fleet_gpu_memory_used_bytes"]
    assert values(fam) == {
        L(worker="v100-node-gpu0", device="Tesla V100-SXM2-16GB", uuid="SIM-v100-node-0", simulated="false"): 1_234_567_890}


def test_label_values_are_escaped():
    weird = 'we"ird\\model\nname'
    stats = {"models": {weird: {"version": "1", "success": 7, "failure": 1, "failure_by_reason": {"Bad\"Reason": 1},
                                "request_duration_us_sum": 10.0}}}
    text = render_metrics({}, stats)
    assert 'model="we\\"ird\\\\model\\nname"' in text
    fams = parse(text)
    # The newline is escaped, so every sample is still exactly one line.
    sample_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(sample_lines) == sum(len(f.samples) for f in fams.values())
    assert values(fams["fleet_nv_inference_request_success"]) == {L(model=weird, version="1"): 7}
    assert values(fams["fleet_nv_inference_request_failure"]) == {L(model=weird, version="1", reason='Bad"Reason'): 1}


def test_empty_inputs():
    assert render_metrics({}, {}) == ""
    assert parse(render_metrics({"nodes": []}, {"models": {}})) == {}


def _counter_samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.type in ("counter", "histogram"):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_counters_are_monotone_when_inputs_are():
    status, stats = sample_status(), sample_stats()
    before = _counter_samples(render_metrics(status, stats))

    later_status, later_stats = copy.deepcopy(status), copy.deepcopy(stats)
    m = later_stats["models"]["digits-mlp"]
    m["success"] += 5
    m["failure"] += 1
    m["failure_by_reason"]["NoCapacity"] = 1
    m["request_duration_us_sum"] += 999.0
    w = later_status["nodes"][0]["workers"][0]
    e = w["engines"]["digits-mlp:1:float32:tensorrt-10.16.1-sm75-sim"]
    e.update(inference_count=e["inference_count"] + 9, exec_count=e["exec_count"] + 2, queue_us=e["queue_us"] + 5,
             compute_us=e["compute_us"] + 50, batch_sizes={"1": 2, "8": 4, "2": 1, "7": 1})
    w["counters"]["loads"] += 1
    w["counters"]["evictions"] += 1
    after = _counter_samples(render_metrics(later_status, later_stats))

    assert set(before) <= set(after)
    assert all(after[k] >= v for k, v in before.items()), [k for k, v in before.items() if after[k] < v]
    assert sum(after.values()) > sum(before.values())
