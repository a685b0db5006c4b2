"""The fleet's status page (``GET /``): one self-contained HTML document.

No build step, no CDN, no web fonts: inline CSS and vanilla JavaScript that polls
``v2/fleet/status`` and ``v2/fleet/stats`` (relative URLs, so the page also works
behind a path prefix) and redraws nodes, devices with their budget bars, loaded
engines, per-model request rate and latency, and recent events. Everything the
page shows from the server is inserted as text, never as markup.

Stable hooks for tests and scrapers: ``body[data-state]`` (``loading`` | ``ok`` |
``error``), ``#error`` (the banner), ``.node[data-node]``,
``.device[data-worker][data-node][data-cc][data-simulated][data-alive]``,
``.budget-bar[data-used][data-total]``, ``#models tr[data-model]``,
``#engines tr[data-key][data-worker]``, ``#events``.
"""

from __future__ import annotations

import json

__all__ = ["STATUS_PAGE_HTML", "render_status_page"]

_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>forward-fleet status</title>
<link rel="icon" href="data:,">
<style>
:root {
  --bg: #f5f7fa; --panel: #ffffff; --ink: #1b2430; --muted: #5f6b7a; --faint: #8b96a5;
  --line: #e3e8ef; --accent: #2f6fde; --accent-soft: #e8f0fd; --ok: #1f9d55; --bad: #d64545;
  --warn: #c27c0e; --warn-soft: #fdf3e1; --bar-bg: #edf1f6;
  --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
}
* { box-sizing: border-box; }
html, body { margin: 0; }
body {
  background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "Liberation Sans", Arial, sans-serif;
}
header {
  background: #16202e; color: #e9eef5; padding: 14px 28px;
  display: flex; align-items: center; gap: 18px; flex-wrap: wrap;
}
header h1 { font-size: 17px; font-weight: 600; margin: 0; letter-spacing: .2px; }
header h1 .fleet { color: #9fb3cc; font-weight: 400; }
header .meta { display: flex; gap: 16px; color: #9fb3cc; font-size: 13px; flex-wrap: wrap; }
header .meta b { color: #e9eef5; font-weight: 600; }
header .spacer { flex: 1; }
.live { display: inline-flex; align-items: center; gap: 6px; font-size: 12.5px; color: #9fb3cc; }
.live::before { content: ""; width: 8px; height: 8px; border-radius: 50%; background: #6b7a8c; }
body[data-state="ok"] .live::before { background: #34c26f; box-shadow: 0 0 0 3px rgba(52,194,111,.18); }
body[data-state="error"] .live::before { background: #ef5a5a; box-shadow: 0 0 0 3px rgba(239,90,90,.18); }
#error {
  margin: 14px 28px 0; padding: 10px 14px; border-radius: 6px; font-size: 13.5px;
  background: #fdecec; color: #8f1f1f; border: 1px solid #f3c2c2;
}
#error[hidden] { display: none; }
main { padding: 18px 28px 36px; max-width: 1500px; }
section { margin-bottom: 26px; }
h2 {
  font-size: 12px; font-weight: 700; text-transform: uppercase; letter-spacing: .7px;
  color: var(--muted); margin: 0 0 10px;
}
.empty { color: var(--faint); font-style: italic; padding: 6px 0; }
#summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; }
.tile { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 11px 14px; }
.tile .label { font-size: 11.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .5px; }
.tile .value { font-size: 21px; font-weight: 600; margin-top: 2px; font-variant-numeric: tabular-nums; }
.tile .sub { font-size: 12px; color: var(--faint); }
#nodes { display: flex; flex-wrap: wrap; gap: 14px 18px; align-items: flex-start; }
.node { min-width: 0; }
.node-head { display: flex; align-items: baseline; gap: 10px; margin: 0 0 8px; }
.node-head .name { font-weight: 600; font-size: 14.5px; }
.node-head .info { color: var(--faint); font-size: 12.5px; }
.devices { display: flex; flex-wrap: wrap; gap: 12px; }
.device {
  background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 13px 15px;
  display: flex; flex-direction: column; gap: 9px; width: 290px;
}
.device[data-alive="false"] { border-color: #f0b4b4; background: #fffafa; }
.device .dev-name { font-weight: 600; font-size: 14.5px; display: flex; align-items: center; gap: 7px; }
.device .dev-name::before { content: ""; flex: none; width: 8px; height: 8px; border-radius: 50%; background: var(--ok); }
.device[data-alive="false"] .dev-name::before { background: var(--bad); }
.device .sub { display: flex; align-items: center; gap: 8px; margin-top: 3px; }
.device .worker-id { flex: 1; min-width: 0; font-family: var(--mono); font-size: 11.5px; color: var(--muted);
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.badges { display: flex; gap: 5px; flex-wrap: wrap; justify-content: flex-end; }
.badge {
  font-size: 11px; font-weight: 600; padding: 1px 7px; border-radius: 10px; white-space: nowrap;
  background: var(--accent-soft); color: var(--accent); border: 1px solid #d3e1fa;
}
.badge.sim { background: var(--warn-soft); color: var(--warn); border-color: #f3dcb2; }
.badge.down { background: #fdecec; color: var(--bad); border-color: #f3c2c2; }
.runtimes { font-size: 12px; color: var(--muted); }
.runtimes .rt { white-space: nowrap; }
.runtimes .rt + .rt::before { content: " \00b7  "; color: var(--faint); }
.budget .line { display: flex; justify-content: space-between; font-size: 12.5px; margin-bottom: 4px; }
.budget .line .k { color: var(--muted); }
.budget-text { font-variant-numeric: tabular-nums; font-weight: 500; }
.budget-bar { height: 9px; background: var(--bar-bg); border-radius: 5px; overflow: hidden; }
.budget-fill { height: 100%; background: var(--accent); border-radius: 5px; min-width: 2px; transition: width .4s ease; }
.budget-bar[data-level="high"] .budget-fill { background: #e0a11b; }
.budget-bar[data-level="full"] .budget-fill { background: var(--bad); }
.budget .nvml { font-size: 11.5px; color: var(--faint); margin-top: 3px; }
.eng-list { list-style: none; margin: 0; padding: 0; border-top: 1px solid var(--line); }
.eng-list li {
  display: flex; align-items: center; gap: 8px; padding: 5px 0; border-bottom: 1px solid var(--line); font-size: 12.5px;
}
.eng-list li:last-child { border-bottom: 0; }
.eng-list li { flex-wrap: wrap; row-gap: 2px; }
.eng-list .m { flex: 1 0 auto; white-space: nowrap; }
.eng-list .fp { color: var(--muted); font-variant-numeric: tabular-nums; }
.prec { font-family: var(--mono); font-size: 11px; padding: 0 5px; border-radius: 4px; background: #f0f2f5; color: #44505f; }
.busy { font-size: 11px; color: var(--ok); font-weight: 600; }
.device .none { font-size: 12.5px; color: var(--faint); }
.device .runnable { font-size: 11.5px; color: var(--faint); }
table { width: 100%; border-collapse: collapse; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { text-align: left; padding: 7px 12px; border-bottom: 1px solid var(--line); font-size: 13px; white-space: nowrap; }
th { background: #f9fafc; color: var(--muted); font-weight: 600; font-size: 11.5px; text-transform: uppercase; letter-spacing: .4px; }
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono { font-family: var(--mono); font-size: 12px; }
td .reasons { color: var(--faint); font-size: 11.5px; margin-left: 4px; }
td.bad { color: var(--bad); }
td.empty { padding: 10px 12px; }
footer { color: var(--faint); font-size: 12px; padding: 0 28px 24px; }
</style>
</head>
<body data-state="loading">
<header>
  <h1>forward-fleet <span class="fleet" id="fleet-name"></span></h1>
  <div class="meta" id="fleet-meta"></div>
  <div class="spacer"></div>
  <div class="live" id="updated">connecting&hellip;</div>
</header>
<div id="error" role="alert" hidden></div>
<main>
  <section><div id="summary"><div class="empty">Loading fleet status&hellip;</div></div></section>
  <section><h2>Nodes and devices</h2><div id="nodes"><div class="empty">Loading&hellip;</div></div></section>
  <section><h2>Models</h2><table id="models"><thead><tr>
    <th>Model</th><th>Versions</th><th class="num">Loaded on</th><th class="num">Req/s</th>
    <th class="num">p50 ms</th><th class="num">p99 ms</th><th class="num">Success</th><th class="num">Failures</th>
  </tr></thead><tbody></tbody></table></section>
  <section><h2>Loaded engines</h2><table id="engines"><thead><tr>
    <th>Worker</th><th>Model</th><th>Precision</th><th>Target</th><th class="num">Footprint</th>
    <th class="num">In flight</th><th class="num">Rows</th><th class="num">Batches</th><th class="num">Avg batch</th>
  </tr></thead><tbody></tbody></table></section>
  <section><h2>Recent events</h2><table id="events"><thead><tr>
    <th>Time</th><th>Event</th><th>Worker</th><th>Engine</th><th>Evicted</th>
  </tr></thead><tbody></tbody></table></section>
</main>
<footer>Refreshes every <span id="refresh-s"></span> s &middot; <a href="metrics">Prometheus metrics</a></footer>
<noscript><p style="padding:0 28px">This page needs JavaScript; the raw data is at
<a href="v2/fleet/status">v2/fleet/status</a> and <a href="v2/fleet/stats">v2/fleet/stats</a>.</p></noscript>
<script>
"use strict";
(function () {
  const CONFIG = __FLEET_CONFIG__;
  const state = { status: null, stats: null, prev: null, lastOk: null };
  const $ = (id) => document.getElementById(id);

  // h("td", {class: "num"}, "text", childNode, ...): text children become text nodes.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "style") el.style.cssText = v; else el.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // Same output as workers.ledger.format_bytes: "512 B", "44.7 MiB", "13.5 GiB".
  function fmtBytes(n) {
    if (n === null || n === undefined || isNaN(n)) return "\u2013";
    let v = Number(n);
    for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
      if (Math.abs(v) < 1024 || unit === "TiB") return unit === "B" ? Math.round(v) + " B" : v.toFixed(1) + " " + unit;
      v /= 1024;
    }
  }
  const fmtNum = (x, d) => (x === null || x === undefined || isNaN(x)) ? "\u2013" : Number(x).toFixed(d);
  const fmtInt = (x) => (x === null || x === undefined || isNaN(x)) ? "\u2013" : Number(x).toLocaleString("en-US");
  function fmtDuration(s) {
    if (s === null || s === undefined || isNaN(s)) return "\u2013";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), ss = s % 60;
    if (d) return d + "d " + hh + "h";
    if (hh) return hh + "h " + m + "m";
    if (m) return m + "m " + ss + "s";
    return ss + "s";
  }
  const pad = (x) => String(x).padStart(2, "0");
  const clock = (t) => pad(t.getHours()) + ":" + pad(t.getMinutes()) + ":" + pad(t.getSeconds());

  // "digits-mlp:1:float32:tensorrt-10.16.1-sm75-sim" -> parts; engine stats win when present.
  function engineInfo(key, eng) {
    const p = String(key).split(":");
    eng = eng || {};
    return { model: eng.model || p[0], version: String(eng.version || p[1] || ""),
             precision: eng.precision || p[2] || "", target: p.slice(3).join(":") };
  }

  function workers(status) {
    const out = [];
    for (const node of (status && status.nodes) || [])
      for (const w of node.workers || []) out.push([node, w]);
    return out;
  }

  async function getJSON(url) {
    let r;
    try { r = await fetch(url, { cache: "no-store", headers: { "Accept": "application/json" } }); }
    catch (e) { throw new Error(url + ": " + (e.message || "network error")); }
    const text = await r.text();
    if (!r.ok) {
      let msg = text.slice(0, 300);
      try { const j = JSON.parse(text); if (j && j.error) msg = j.error; } catch (e) { /* not JSON */ }
      throw new Error(url + ": HTTP " + r.status + (msg ? " \u2013 " + msg : ""));
    }
    try { return JSON.parse(text); } catch (e) { throw new Error(url + ": response is not JSON"); }
  }

  // ---- rendering ----------------------------------------------------------
  function renderHeader(status, stats) {
    $("fleet-name").textContent = status && status.fleet ? "/ " + status.fleet : "";
    const meta = [];
    if (status) {
      if (status.simulated) meta.push(h("span", { class: "badge sim" }, "SIMULATED"));
      meta.push(h("span", {}, "epoch ", h("b", {}, status.epoch ?? "\u2013")));
      meta.push(h("span", {}, "restarts ", h("b", {}, status.restarts ?? 0)));
    }
    if (stats && stats.uptime_s !== undefined) meta.push(h("span", {}, "uptime ", h("b", {}, fmtDuration(stats.uptime_s))));
    $("fleet-meta").replaceChildren(...meta);
  }

  function renderSummary(status, stats) {
    const ws = workers(status).map(([, w]) => w);
    const alive = ws.filter((w) => w.alive !== false).length;
    const budget = ws.reduce((a, w) => a + (w.budget_bytes || 0), 0);
    const used = ws.reduce((a, w) => a + (w.used_bytes || 0), 0);
    const engines = ws.reduce((a, w) => a + (w.ledger || []).length, 0);
    const byName = Object.entries((stats && stats.models) || {});
    const models = byName.map(([, m]) => m);
    const rate = byName.reduce((a, [name, m]) => a + (rateOf(m, name) || 0), 0);
    const ok = models.reduce((a, m) => a + (m.success || 0), 0);
    const bad = models.reduce((a, m) => a + (m.failure || 0), 0);
    const tile = (id, label, value, sub) => h("div", { class: "tile", id: "tile-" + id },
      h("div", { class: "label" }, label), h("div", { class: "value" }, value), h("div", { class: "sub" }, sub || "\u00a0"));
    $("summary").replaceChildren(
      tile("nodes", "Nodes", status ? (status.nodes || []).length : "\u2013"),
      tile("workers", "Workers up", status ? alive + " / " + ws.length : "\u2013", !status ? "" : alive < ws.length ? (ws.length - alive) + " down" : "all healthy"),
      tile("budget", "Budget in use", status ? fmtBytes(used) : "\u2013", status ? "of " + fmtBytes(budget) : ""),
      tile("engines", "Engines loaded", status ? engines : "\u2013",
           status ? Object.keys(status.models || {}).length + " models in repository" : ""),
      tile("rate", "Requests / s", stats ? fmtNum(rate, 1) : "\u2013", stats ? fmtInt(ok) + " served" : ""),
      tile("failures", "Failed requests", stats ? fmtInt(bad) : "\u2013",
           stats && ok + bad > 0 ? fmtNum(100 * bad / (ok + bad), 2) + "% of all" : ""));
  }

  function budgetBar(w) {
    const used = Number(w.used_bytes || 0), total = Number(w.budget_bytes || 0);
    const frac = total > 0 ? Math.min(1, used / total) : 0;
    const level = frac >= 0.9 ? "full" : frac >= 0.7 ? "high" : "normal";
    const pct = total > 0 ? (100 * used / total) : 0;
    const text = fmtBytes(used) + " / " + fmtBytes(total);
    const wrap = h("div", { class: "budget" },
      h("div", { class: "line" }, h("span", { class: "k" }, "Budget"),
        h("span", {}, h("span", { class: "budget-text" }, text), h("span", { class: "k" }, " \u00b7 " + fmtNum(pct, pct < 10 ? 1 : 0) + "%"))),
      h("div", { class: "budget-bar", "data-used": used, "data-total": total, "data-level": level, role: "meter",
                 "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": used, "aria-label": "budget used " + text,
                 title: text + " (device " + fmtBytes((w.device || {}).total_memory_bytes) + ")" },
        h("div", { class: "budget-fill", style: "width:" + (100 * frac).toFixed(2) + "%" })));
    if (w.nvml_used_bytes !== null && w.nvml_used_bytes !== undefined)
      wrap.appendChild(h("div", { class: "nvml" }, "NVML reports " + fmtBytes(w.nvml_used_bytes) + " in use on the device"));
    return wrap;
  }

  function deviceCard(node, w) {
    const dev = w.device || {};
    const simulated = !!(w.simulated ?? dev.simulated);
    const alive = w.alive !== false;
    const cc = dev.compute_capability || "";
    const runtimes = (w.runtimes || []).map((r) => h("span", { class: "rt" },
      (r.backend === "tensorrt" ? "TensorRT " : r.backend === "onnxruntime" ? "ORT " : r.backend + " ") + (r.version || "") +
      (r.backend === "onnxruntime" ? " (" + r.provider + ")" : "") + (r.lean ? " lean" : "")));
    const ledger = (w.ledger || []).slice().sort((a, b) => (b.last_used || 0) - (a.last_used || 0));
    // LRU among idle entries: what this worker would evict first (its own clock, so comparable).
    const idle = ledger.filter((e) => !e.in_flight);
    const lru = ledger.length > 1 && idle.length ? idle[idle.length - 1].key : null;
    const engines = ledger.length
      ? h("ul", { class: "eng-list" }, ledger.map((e) => {
          const info = engineInfo(e.key, (w.engines || {})[e.key]);
          return h("li", { class: "engine", "data-key": e.key, title: e.key },
            h("span", { class: "m" }, info.model + ":" + info.version),
            h("span", { class: "prec" }, info.precision),
            e.in_flight ? h("span", { class: "busy", title: e.in_flight + " inferences in flight" }, e.in_flight + " busy") : null,
            e.key === lru ? h("span", { class: "prec", title: "least recently used idle engine: evicted first" }, "LRU") : null,
            h("span", { class: "fp" }, fmtBytes(e.footprint_bytes)));
        }))
      : h("div", { class: "none" }, "No engines loaded");
    const runnable = (w.runnable_not_loaded || []).length
      ? h("div", { class: "runnable" }, "Can also run: " + w.runnable_not_loaded.join(", ")) : null;
    return h("div", { class: "device", "data-worker": w.worker_id, "data-node": node.node, "data-cc": cc,
                      "data-simulated": simulated ? "true" : "false", "data-alive": alive ? "true" : "false",
                      "data-uuid": dev.uuid || "" },
      h("div", { class: "top" },
        h("div", { class: "dev-name", title: alive ? "worker up" : "worker down" }, dev.name || dev.kind || "device"),
        h("div", { class: "sub" },
          h("div", { class: "worker-id", title: w.worker_id }, w.worker_id),
          h("div", { class: "badges" },
            cc ? h("span", { class: "badge cc", title: "compute capability" }, "CC " + cc) : null,
            simulated ? h("span", { class: "badge sim", title: "declared by the fleet config, executed on the CPU" }, "simulated") : null,
            alive ? null : h("span", { class: "badge down" }, "down")))),
      runtimes.length ? h("div", { class: "runtimes" }, runtimes) : null,
      budgetBar(w), engines, runnable);
  }

  function renderNodes(status) {
    const nodes = (status && status.nodes) || [];
    if (!nodes.length) { $("nodes").replaceChildren(h("div", { class: "empty" }, "No nodes reported")); return; }
    $("nodes").replaceChildren(...nodes.map((node) => {
      const ws = node.workers || [];
      return h("div", { class: "node", "data-node": node.node },
        h("div", { class: "node-head" }, h("span", { class: "name" }, node.node),
          h("span", { class: "info" }, (node.host ? "host " + node.host + " \u00b7 " : "") + ws.length + (ws.length === 1 ? " device" : " devices"))),
        h("div", { class: "devices" }, ws.map((w) => deviceCard(node, w))));
    }));
  }

  // Prefer the server's rate; otherwise derive it from two polls.
  function rateOf(m, name) {
    if (m.rate_per_s !== undefined && m.rate_per_s !== null) return m.rate_per_s;
    const prev = state.prev && state.prev.stats && state.prev.stats.models && state.prev.stats.models[name];
    if (!prev) return null;
    const dt = (Date.now() - state.prev.time) / 1000;
    const dn = (m.success || 0) + (m.failure || 0) - (prev.success || 0) - (prev.failure || 0);
    return dt > 0 && dn >= 0 ? dn / dt : null;
  }

  function renderModels(status, stats) {
    const fromStats = (stats && stats.models) || {};
    const repo = (status && status.models) || {};
    const loadedOn = {};
    for (const [, w] of workers(status))
      for (const e of w.ledger || []) {
        const m = engineInfo(e.key, (w.engines || {})[e.key]).model;
        (loadedOn[m] = loadedOn[m] || new Set()).add(w.worker_id);
      }
    const names = [...new Set([...Object.keys(repo), ...Object.keys(fromStats)])].sort();
    const rows = names.map((name) => {
      const m = fromStats[name] || {};
      const reasons = Object.entries(m.failure_by_reason || {}).map(([k, v]) => k + " " + v).join(", ");
      const versions = repo[name] ? repo[name].join(", ") : (m.version || "");
      return h("tr", { "data-model": name },
        h("td", {}, name), h("td", {}, versions),
        h("td", { class: "num" }, !status ? "\u2013" : loadedOn[name] ? loadedOn[name].size : 0),
        h("td", { class: "num rate" }, fmtNum(rateOf(m, name), 1)),
        h("td", { class: "num p50" }, fmtNum(m.p50_ms, 1)),
        h("td", { class: "num p99" }, fmtNum(m.p99_ms, 1)),
        h("td", { class: "num" }, fmtInt(m.success || 0)),
        h("td", { class: "num" + (m.failure ? " bad" : "") }, fmtInt(m.failure || 0),
          reasons ? h("span", { class: "reasons" }, "(" + reasons + ")") : null));
    });
    $("models").tBodies[0].replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No models"))]));
  }

  function renderEngines(status) {
    const rows = [];
    for (const [, w] of workers(status))
      for (const e of w.ledger || []) {
        const eng = (w.engines || {})[e.key] || {};
        const info = engineInfo(e.key, eng);
        const avg = eng.exec_count ? eng.inference_count / eng.exec_count : null;
        rows.push(h("tr", { "data-key": e.key, "data-worker": w.worker_id },
          h("td", { class: "mono" }, w.worker_id), h("td", {}, info.model + ":" + info.version),
          h("td", {}, h("span", { class: "prec" }, info.precision)), h("td", { class: "mono" }, info.target),
          h("td", { class: "num" }, fmtBytes(e.footprint_bytes)), h("td", { class: "num" }, e.in_flight || 0),
          h("td", { class: "num" }, fmtInt(eng.inference_count)), h("td", { class: "num" }, fmtInt(eng.exec_count)),
          h("td", { class: "num" }, fmtNum(avg, 1))));
      }
    $("engines").tBodies[0].replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No engines loaded"))]));
  }

  function renderEvents(status) {
    const events = ((status && status.events) || []).slice(-10).reverse();
    const today = new Date().toDateString();
    const rows = events.map((ev) => {
      const t = new Date(ev.time * 1000);
      const when = isNaN(t) ? "" : (t.toDateString() === today ? "" : t.toISOString().slice(0, 10) + " ") + clock(t);
      return h("tr", { "data-event": ev.event },
        h("td", { class: "mono" }, when), h("td", {}, ev.event || ""), h("td", { class: "mono" }, ev.worker || ""),
        h("td", { class: "mono" }, ev.engine || ""), h("td", { class: "mono" }, (ev.evicted || []).join(", ")));
    });
    $("events").tBodies[0].replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No events yet"))]));
  }

  function render() {
    const { status, stats } = state;
    renderHeader(status, stats);
    renderSummary(status, stats);
    if (status) { renderNodes(status); renderEngines(status); renderEvents(status); }
    else {
      const waiting = (colspan) => h("tr", {}, h("td", { colspan, class: "empty" }, "Waiting for fleet status\u2026"));
      $("nodes").replaceChildren(h("div", { class: "empty" }, "Waiting for fleet status\u2026"));
      $("engines").tBodies[0].replaceChildren(waiting(9));
      $("events").tBodies[0].replaceChildren(waiting(5));
    }
    renderModels(status, stats);
  }

  // ---- polling --------------------------------------------------------------
  async function refresh() {
    const [st, sx] = await Promise.allSettled([getJSON(CONFIG.statusUrl), getJSON(CONFIG.statsUrl)]);
    const errors = [st, sx].filter((r) => r.status === "rejected").map((r) => r.reason.message || String(r.reason));
    if (st.status === "fulfilled") state.status = st.value;
    if (sx.status === "fulfilled") {
      if (state.stats) state.prev = { stats: state.stats, time: state.statsTime };
      state.stats = sx.value; state.statsTime = Date.now();
    }
    try { render(); } catch (e) { errors.push("could not render: " + e.message); }
    const banner = $("error");
    if (errors.length) {
      document.body.dataset.state = "error";
      banner.textContent = "Could not refresh: " + errors.join("; ") +
        (state.lastOk ? " \u2013 showing data from " + clock(state.lastOk) + "." : ".");
      banner.hidden = false;
      $("updated").textContent = state.lastOk ? "stale since " + clock(state.lastOk) : "no data";
    } else {
      state.lastOk = new Date();
      document.body.dataset.state = "ok";
      banner.hidden = true; banner.textContent = "";
      $("updated").textContent = "updated " + clock(state.lastOk);
    }
    setTimeout(refresh, CONFIG.refreshMs);
  }

  $("refresh-s").textContent = String(CONFIG.refreshMs / 1000);
  refresh();
})();
</script>
</body>
</html>
"""


def render_status_page(*, status_url: str = "v2/fleet/status", stats_url: str = "v2/fleet/stats",
                       refresh_ms: int = 2000) -> str:
    """The page with its data URLs and refresh period filled in.

    The default URLs are relative, so the page served at ``/`` polls
    ``/v2/fleet/status`` and one served under a proxy prefix polls under that prefix.
    """
    if refresh_ms <= 0:
        raise ValueError(f"refresh_ms must be positive, got {refresh_ms}")
    config = json.dumps({"statusUrl": status_url, "statsUrl": stats_url, "refreshMs": int(refresh_ms)})
    # "</" inside a <script> would end it early; "<\/" is the same string to JavaScript.
    return _TEMPLATE.replace("__FLEET_CONFIG__", config.replace("</", "<\\/"))


STATUS_PAGE_HTML: str = render_status_page()
