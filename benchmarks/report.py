"""Turn a benchmark result document into target verdicts, a Markdown table and a PNG chart.

Pure functions over the JSON that ``benchmarks.cli`` writes (schema ``SCHEMA``), so
they can be re-run on an old result file:

    python -m benchmarks.report bench-results/2026-11-22T01-30-00.json [chart.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SCHEMA = "forward-fleet-bench/1"

# Every measurement row carries these (router and cold-start rows have their own fields).
ROW_FIELDS = ("system", "variant", "model", "batch", "concurrency", "requests", "errors", "req_per_s", "rows_per_s",
              "p50_ms", "p99_ms")

THRESHOLDS = {
    "vs_naive_ht": 1.0,  # fleet-http-binary c=32 digits req/s / naive-serve throughput mode
    "vs_triton": 1.2,  # ... / Triton
    "cnn_vs_bare": 0.8,  # cnn-small fleet-http-binary rows/s / bare rows/s at max batch
    "router_median_us": 50.0,
    "router_p99_us": 200.0,
    "cold_start_s": 20.0,
    "pa_vs_triton": 1.2,  # perf_analyzer, digits-mlp c=32: fleet / Triton, per protocol (issue 17)
}


TOP_LEVEL = ("schema", "started", "quick", "host", "args", "loadgen", "phases", "targets")
PHASE_STATUSES = ("ok", "partial", "skipped", "error", "wrong answers")


def validate(doc: dict) -> list[str]:
    """Problems with a result document's shape (empty when it follows ``SCHEMA``)."""
    problems = [f"missing top-level key {k!r}" for k in TOP_LEVEL if k not in doc]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for name, phase in (doc.get("phases") or {}).items():
        if phase.get("status") not in PHASE_STATUSES:
            problems.append(f"phase {name}: status {phase.get('status')!r} not in {PHASE_STATUSES}")
        if not isinstance(phase.get("seconds"), (int, float)):
            problems.append(f"phase {name}: no 'seconds'")
        for i, row in enumerate(phase.get("rows", [])):
            need: tuple[str, ...]
            if row.get("system") == "router":
                need = ("variant", "workers", "models", "median_us", "p99_us")
            elif row.get("system") == "cold-start":
                need = ("fleet_up_s", "first_inference_s")
            else:
                need = ROW_FIELDS
            missing = [k for k in need if k not in row]
            if missing:
                problems.append(f"phase {name} row {i} ({row.get('system')}): missing {', '.join(missing)}")
    for t in doc.get("targets") or []:
        if not {"name", "value", "threshold", "met"} <= set(t):
            problems.append(f"target {t.get('name')!r} lacks name/value/threshold/met")
    return problems


def all_rows(doc: dict) -> list[dict]:
    rows = []
    for phase in doc.get("phases", {}).values():
        rows.extend(phase.get("rows", []))
    return rows


def find(rows: list[dict], **match) -> list[dict]:
    out = []
    for r in rows:
        ok = True
        for k, v in match.items():
            have = r.get(k)
            if callable(v):
                ok = have is not None and v(have)
            else:
                ok = have == v
            if not ok:
                break
        if ok:
            out.append(r)
    return out


def _one(rows: list[dict], **match) -> dict | None:
    found = find(rows, **match)
    return max(found, key=lambda r: r.get("req_per_s", 0)) if found else None


def shipped_rows(rows: list[dict]) -> list[dict]:
    """The fleet's HTTP rows as it runs by default (older documents: variant 'default')."""
    flagged = [r for r in rows if r.get("shipped")]
    return flagged or [r for r in rows if r.get("system", "").startswith("fleet-http") and r.get("variant") == "default"]


def _is_throughput_mode(v: str) -> bool:
    return "throughput-optimized" in v


def evaluate_targets(doc: dict) -> list[dict]:
    """The done-when targets of issue 7, each with value, threshold and met (None: not measured)."""
    rows = all_rows(doc)
    t = THRESHOLDS
    targets = []

    fleet32 = _one(shipped_rows(rows), system="fleet-http-binary", model="digits-mlp", concurrency=32)
    naive32 = _one(rows, system="naive-serve", variant=_is_throughput_mode, model="digits-mlp", concurrency=32)
    triton32 = _one(rows, system="triton-binary", model="digits-mlp", concurrency=32)

    def ratio_target(name, ours, theirs, threshold, what):
        if ours is None or theirs is None or not theirs.get("req_per_s"):
            missing = "fleet-http-binary" if ours is None else what
            return {"name": name, "value": None, "threshold": threshold, "met": None, "detail": f"{missing} not measured"}
        ratio = ours["req_per_s"] / theirs["req_per_s"]
        return {"name": name, "value": round(ratio, 3), "threshold": threshold, "met": ratio >= threshold,
                "detail": f"{ours['req_per_s']:.0f} vs {theirs['req_per_s']:.0f} req/s"}

    targets.append(ratio_target("digits-mlp c=32: fleet-http-binary / naive-serve (throughput mode), req/s",
                                fleet32, naive32, t["vs_naive_ht"], "naive-serve throughput mode"))
    targets.append(ratio_target("digits-mlp c=32: fleet-http-binary / Triton (binary), req/s",
                                fleet32, triton32, t["vs_triton"], "triton"))
    if fleet32 and triton32:
        targets.append({"name": "digits-mlp c=32: fleet-http-binary p99 <= Triton p99 (ms)",
                        "value": round(fleet32["p99_ms"], 2), "threshold": round(triton32["p99_ms"], 2),
                        "met": fleet32["p99_ms"] <= triton32["p99_ms"], "detail": "lower is better"})
    else:
        targets.append({"name": "digits-mlp c=32: fleet-http-binary p99 <= Triton p99 (ms)", "value": None,
                        "threshold": None, "met": None, "detail": "not measured"})

    bare = find(rows, system="bare", model="cnn-small", batch=lambda b: b > 1)
    fleet_cnn = find(shipped_rows(rows), system="fleet-http-binary", model="cnn-small")
    if bare and fleet_cnn:
        best = max(fleet_cnn, key=lambda r: r["rows_per_s"])
        ratio = best["rows_per_s"] / bare[0]["rows_per_s"]
        targets.append({"name": "cnn-small at max batch: fleet-http-binary rows/s / bare rows/s", "value": round(ratio, 3),
                        "threshold": t["cnn_vs_bare"], "met": ratio >= t["cnn_vs_bare"],
                        "detail": f"{best['rows_per_s']:.0f} (c={best['concurrency']}) vs {bare[0]['rows_per_s']:.0f} rows/s"})
    else:
        targets.append({"name": "cnn-small at max batch: fleet-http-binary rows/s / bare rows/s", "value": None,
                        "threshold": t["cnn_vs_bare"], "met": None, "detail": "not measured"})

    router = find(rows, system="router", variant=lambda v: v.startswith("spread"))
    if router:
        r = router[0]
        scale = f"{r['workers']} workers x {r['models']} models"
        targets.append({"name": f"router median per decision (us), {scale}", "value": round(r["median_us"], 2),
                        "threshold": t["router_median_us"], "met": r["median_us"] <= t["router_median_us"], "detail": ""})
        targets.append({"name": f"router p99 per decision (us), {scale}", "value": round(r["p99_us"], 2),
                        "threshold": t["router_p99_us"], "met": r["p99_us"] <= t["router_p99_us"], "detail": ""})
    else:
        for what in ("median", "p99"):
            targets.append({"name": f"router {what} per decision (us)", "value": None,
                            "threshold": t[f"router_{what}_us"], "met": None, "detail": "not measured"})

    targets += perf_analyzer_targets(rows)
    cold = find(rows, system="cold-start")
    if cold:
        c = cold[0]
        targets.append({"name": "cold start: fleet up to first good inference (s)", "value": round(c["first_inference_s"], 2),
                        "threshold": t["cold_start_s"], "met": c["first_inference_s"] <= t["cold_start_s"],
                        "detail": f"fleet up returned after {c['fleet_up_s']:.1f} s"})
    else:
        targets.append({"name": "cold start: fleet up to first good inference (s)", "value": None,
                        "threshold": t["cold_start_s"], "met": None, "detail": "not measured"})
    return targets


def perf_analyzer_targets(rows: list[dict]) -> list[dict]:
    """Issue 17's targets, measured by perf_analyzer on digits-mlp at c=32: fleet >= 1.2x Triton per protocol,
    p99 no worse than Triton's, and fleet gRPC >= fleet HTTP."""
    pa = {name: _one(rows, system=f"pa-{name}", model="digits-mlp", concurrency=32)
          for name in ("fleet-http", "fleet-grpc", "triton-http", "triton-grpc")}
    targets = []
    for protocol in ("grpc", "http"):
        ours, theirs = pa[f"fleet-{protocol}"], pa[f"triton-{protocol}"]
        name = f"perf_analyzer digits-mlp c=32: fleet {protocol} / Triton {protocol}, infer/s"
        if ours is None or theirs is None:
            targets += [{"name": name, "value": None, "threshold": THRESHOLDS["pa_vs_triton"], "met": None,
                         "detail": "not measured"},
                        {"name": f"perf_analyzer digits-mlp c=32: fleet {protocol} p99 <= Triton {protocol} p99 (ms)",
                         "value": None, "threshold": None, "met": None, "detail": "not measured"}]
            continue
        ratio = ours["req_per_s"] / theirs["req_per_s"]
        targets.append({"name": name, "value": round(ratio, 3), "threshold": THRESHOLDS["pa_vs_triton"],
                        "met": ratio >= THRESHOLDS["pa_vs_triton"],
                        "detail": f"{ours['req_per_s']:.0f} vs {theirs['req_per_s']:.0f} infer/s"})
        targets.append({"name": f"perf_analyzer digits-mlp c=32: fleet {protocol} p99 <= Triton {protocol} p99 (ms)",
                        "value": round(ours["p99_ms"], 2), "threshold": round(theirs["p99_ms"], 2),
                        "met": ours["p99_ms"] <= theirs["p99_ms"], "detail": "lower is better"})
    grpc, http = pa["fleet-grpc"], pa["fleet-http"]
    targets.append({"name": "perf_analyzer digits-mlp c=32: fleet gRPC / fleet HTTP, infer/s",
                    "value": round(grpc["req_per_s"] / http["req_per_s"], 3) if grpc and http else None,
                    "threshold": 1.0, "met": grpc["req_per_s"] >= http["req_per_s"] if grpc and http else None,
                    "detail": f"{grpc['req_per_s']:.0f} vs {http['req_per_s']:.0f} infer/s" if grpc and http else "not measured"})
    return targets


def _fmt(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(doc: dict) -> str:
    rows = all_rows(doc)
    lines = ["| system | variant | model | batch | conc. | req/s | rows/s | p50 ms | p99 ms | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("system") in ("router", "cold-start"):
            continue
        lines.append(
            f"| {r['system']} | {r.get('variant', '')} | {r.get('model', '')} | {r.get('batch', '')} | "
            f"{r.get('concurrency', '')} | {_fmt(r.get('req_per_s'), 0)} | {_fmt(r.get('rows_per_s'), 0)} | "
            f"{_fmt(r.get('p50_ms'), 2)} | {_fmt(r.get('p99_ms'), 2)} | {r.get('errors', 0)} |")
    for r in find(rows, system="router"):
        lines.append(f"| router | {r['variant']} | {r['workers']} workers x {r['models']} models | | | | | "
                     f"median {r['median_us']:.1f} us | p99 {r['p99_us']:.1f} us | |")
    for r in find(rows, system="cold-start"):
        lines.append(f"| cold-start | {r['variant']} | | | | | | fleet up {r['fleet_up_s']:.1f} s | "
                     f"first inference {r['first_inference_s']:.1f} s | |")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | value | threshold | met | detail |", "|---|---:|---:|---|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {_fmt(t['value'], 2)} | {_fmt(t['threshold'], 2)} | {met} | {t['detail']} |")
    return "\n".join(lines)


def phase_summary(doc: dict) -> str:
    lines = []
    for name, phase in doc.get("phases", {}).items():
        status = phase.get("status")
        problems = phase.get("incidents") or [f"{r['mode']}: {r.get('error')}" for r in phase.get("runs", [])
                                              if r.get("status") == "error"]
        extra = f": {phase.get('reason') or phase.get('error') or '; '.join(problems)}" if status != "ok" else ""
        lines.append(f"- {name}: {status} ({phase.get('seconds', 0):.0f} s){extra}")
    return "\n".join(lines)


# ---- chart -----------------------------------------------------------------------------
_SHORT = {"throughput-optimized+haproxy": "HT+HAProxy", "front door + throughput-optimized": "front door"}


def _label(r: dict) -> str:
    v = _SHORT.get(r.get("variant", ""), r.get("variant", ""))
    if r["system"].startswith(("fleet-http", "naive-serve")):
        return f"{r['system']}\n[{v}{', as shipped' if r.get('shipped') else ''}]"
    if r["system"] == "fleet-client":
        return f"fleet-client\n[{v}]"
    return r["system"]


def write_chart(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = all_rows(doc)
    fig, axes = plt.subplots(2, 2, figsize=(17, 13))
    commit = (doc.get("git") or {}).get("commit") or "?"
    fig.suptitle(f"forward-fleet benchmarks @ {commit}, {doc.get('started', '')} ({doc.get('host', {}).get('cpus', '?')} cores"
                 f"{', quick' if doc.get('quick') else ''}; ratios within one run count, absolute numbers do not)",
                 fontsize=12)
    digits = [r for r in rows if r.get("model") == "digits-mlp" and r["system"] not in ("bare",) and r.get("concurrency")]
    levels = _digits_rate_panel(axes[0][0], rows, digits)
    _digits_latency_panel(axes[0][1], digits, max(levels) if levels else 32)
    _cnn_panel(axes[1][0], rows)
    _targets_panel(axes[1][1], doc.get("targets") or evaluate_targets(doc), doc.get("loadgen", {}).get("ceiling", {}))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.subplots_adjust(hspace=0.45)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _digits_rate_panel(ax, rows: list[dict], digits: list[dict]) -> list[int]:
    """(a) digits-mlp requests/s by concurrency; returns the concurrency levels shown."""
    series: dict[str, dict[int, float]] = {}
    for r in digits:
        series.setdefault(_label(r), {})[r["concurrency"]] = r["req_per_s"]
    levels = sorted({c for s in series.values() for c in s})
    width = 0.8 / max(1, len(series))
    for i, (label, by_c) in enumerate(sorted(series.items())):
        xs = [levels.index(c) + i * width for c in by_c]
        ax.bar(xs, list(by_c.values()), width=width, label=label.replace("\n", " "))
    bare1 = find(rows, system="bare", model="digits-mlp", batch=1)
    if bare1:
        ax.axhline(bare1[0]["req_per_s"], color="k", linestyle="--", linewidth=1)
        ax.text(-0.1, bare1[0]["req_per_s"] * 1.1, f"bare ONNX Runtime, batch 1: {bare1[0]['req_per_s']:,.0f} calls/s",
                va="bottom", ha="left", fontsize=8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [f"concurrency {c}" for c in levels])
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("digits-mlp, one row per request")
    if series:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.07))
    return levels


def _digits_latency_panel(ax, digits: list[dict], top: int) -> None:
    """(b) digits-mlp p50 and p99 at the highest concurrency."""
    at_top = sorted([r for r in digits if r["concurrency"] == top], key=lambda r: r["p99_ms"])
    labels = [_label(r).replace("\n", " ") for r in at_top]
    ax.barh(labels, [r["p99_ms"] for r in at_top], color="tab:orange", label="p99")
    ax.barh(labels, [r["p50_ms"] for r in at_top], color="tab:blue", label="p50")
    ax.set_xscale("log")
    ax.set_xlabel("latency ms (log)")
    ax.set_title(f"digits-mlp latency at concurrency {top}")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)


def _cnn_panel(ax, rows: list[dict]) -> None:
    """(c) cnn-small rows/s, best over concurrency levels."""
    best: dict[str, float] = {}
    for r in rows:
        if r.get("model") == "cnn-small" and r.get("rows_per_s"):
            label = "bare ORT batch %d" % r["batch"] if r["system"] == "bare" else _label(r).replace("\n", " ")
            best[label] = max(best.get(label, 0), r["rows_per_s"])
    items = sorted(best.items(), key=lambda kv: kv[1])
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:green")
    bare_max = [r for r in find(rows, system="bare", model="cnn-small") if r["batch"] > 1]
    if bare_max:
        ax.axvline(0.8 * bare_max[0]["rows_per_s"], color="r", linestyle="--", linewidth=1, label="80% of bare")
        ax.legend(fontsize=8)
    ax.set_xlabel("rows/s (best concurrency)")
    ax.set_title("cnn-small, 64 rows per request (compute-bound)")
    ax.tick_params(axis="y", labelsize=7)


def _targets_panel(ax, targets: list[dict], ceiling: dict) -> None:
    """(d) the targets, met or not, and the load generator's own ceiling."""
    ax.axis("off")
    ax.set_title("issue 7 targets")
    y = 0.95
    for t in targets:
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        color = {True: "green", False: "red", None: "gray"}[t["met"]]
        ax.text(0.0, y, f"[{mark}]", color=color, fontsize=9, fontweight="bold", transform=ax.transAxes)
        ax.text(0.13, y, f"{t['name']}\n  value {_fmt(t['value'], 2)} / threshold {_fmt(t['threshold'], 2)}  {t['detail']}",
                fontsize=8, va="top", transform=ax.transAxes)
        y -= 0.12
    if ceiling.get("req_per_s"):
        ax.text(0.0, 0.02, f"load generator: {ceiling.get('tool')}, own ceiling {ceiling['req_per_s']:,.0f} req/s "
                f"at c={ceiling.get('concurrency')} against a trivial server", fontsize=8, transform=ax.transAxes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = json.loads(Path(argv[0]).read_text())
    doc["targets"] = evaluate_targets(doc)
    print(markdown_table(doc))
    print()
    print(targets_table(doc["targets"]))
    if len(argv) > 1:
        print(write_chart(doc, Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
