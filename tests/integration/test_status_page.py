"""The status page rendered by real headless Chromium.

A stub HTTP server (stdlib, one thread, 127.0.0.1) serves the page at ``/`` and
canned ``/v2/fleet/status`` and ``/v2/fleet/stats`` documents of the simulated
hetero-sim fleet (four GPUs), so the page is tested without Ray.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.status_page import render_status_page
from tests.chromium import find_chromium, parse_dom, render_dom, screenshot
from tests.needs import skip_unless
from tests.status_samples import sample_stats, sample_status

@pytest.fixture(autouse=True)
def _chromium():
    skip_unless(find_chromium() is not None,
                "chromium is not installed (scripts/test.sh installs it: apt-get install -y chromium)")


@contextmanager
def stub_server(routes: dict[str, tuple[int, str, bytes]]):
    """Serve ``routes`` (path -> (status, content type, body)); yields (base URL, hit counter)."""
    hits: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            hits[path] += 1
            code, ctype, body = routes.get(path, (404, "application/json", b'{"error": "not found"}'))
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fleet_routes(status: dict | None = None, stats: dict | None = None) -> dict:
    def ok(doc):
        return 200, "application/json", json.dumps(doc).encode()

    return {
        "/": (200, "text/html; charset=utf-8", render_status_page().encode()),
        "/v2/fleet/status": ok(sample_status() if status is None else status),
        "/v2/fleet/stats": ok(sample_stats() if stats is None else stats),
    }


@pytest.fixture(scope="module")
def rendered():
    """The page's DOM after about 5 s of (virtual) page time, and the stub's hit counts."""
    with stub_server(fleet_routes()) as (url, hits):
        dom = render_dom(url)
        return parse_dom(dom), Counter(hits)


def test_page_shows_the_four_simulated_gpus_with_budget_bars(rendered):
    doc, _ = rendered
    status = sample_status()
    expected = {w["worker_id"]: (node["node"], w) for node in status["nodes"] for w in node["workers"]}

    devices = doc.find_all(cls="device")
    assert [d.attrs["data-worker"] for d in devices] == list(expected)
    for card in devices:
        node, w = expected[card.attrs["data-worker"]]
        assert card.attrs["data-node"] == node
        assert card.attrs["data-cc"] == w["device"]["compute_capability"]
        assert card.attrs["data-simulated"] == "true"
        assert card.attrs["data-alive"] == "true"
        assert w["device"]["name"] in card.text()
        assert "CC " + w["device"]["compute_capability"] in card.text()
        assert "simulated" in card.text()

        bar = card.find(cls="budget-bar")
        assert int(bar.attrs["data-used"]) == w["used_bytes"]
        assert int(bar.attrs["data-total"]) == w["budget_bytes"]
        fill = bar.find(cls="budget-fill")
        width = float(fill.attrs["style"].split("width:")[1].split("%")[0])
        assert width == pytest.approx(100 * w["used_bytes"] / w["budget_bytes"], abs=0.01)
        # Every ledger entry shows up as an engine on its card.
        assert {e.attrs["data-key"] for e in card.find_all(cls="engine")} == {e["key"] for e in w["ledger"]}

    t4 = doc.find(cls="device", data_worker="t4-node-gpu0")
    assert t4.find(cls="budget-text").text() == "44.7 MiB / 13.5 GiB"
    v100 = doc.find(cls="device", data_worker="v100-node-gpu0")
    assert v100.find(cls="budget-bar").attrs["data-level"] == "high"  # 83 % of its budget

    assert [n.attrs["data-node"] for n in doc.find_all(cls="node")] == ["t4-node", "p4-node", "v100-node"]


def test_page_shows_models_engines_and_state(rendered):
    doc, hits = rendered
    body = doc.find("body")
    assert body.attrs["data-state"] == "ok"
    assert "hidden" in doc.by_id("error").attrs

    models = {tr.attrs["data-model"]: tr for tr in doc.by_id("models").find_all("tr") if "data-model" in tr.attrs}
    assert set(models) == {"digits-mlp", "cnn-small"}
    mlp = models["digits-mlp"]
    assert mlp.find(cls="rate").text() == "12.3"
    assert mlp.find(cls="p50").text() == "3.1"
    assert mlp.find(cls="p99").text() == "9.8"
    assert "InvalidInput 3" in mlp.text()

    engines = [tr for tr in doc.by_id("engines").find_all("tr") if "data-key" in tr.attrs]
    assert len(engines) == sum(len(w["ledger"]) for n in sample_status()["nodes"] for w in n["workers"])
    assert "tensorrt-8.6.1-sm61-sim" in doc.by_id("engines").text()
    assert len([tr for tr in doc.by_id("events").find_all("tr") if "data-event" in tr.attrs]) == 3
    builds = {tr.attrs["data-build"]: tr for tr in doc.by_id("builds").find_all("tr") if "data-build" in tr.attrs}
    int8 = builds["digits-mlp:1:int8:tensorrt-8.6.1-sm61-sim"]
    assert int8.find(cls="precision").text() == "int8" and "top1_agreement 0.9833" in int8.find(cls="accuracy").text()
    assert int8.find(cls="judged-on").text() == "60 calibration rows kept out of the calibration"
    assert builds["cnn-small:1:float16:tensorrt-10.16.1-sm75-sim"].find(cls="judged-on").text() == "random inputs (weak)"

    # It refreshes itself: ~5 s of page time at a 2 s period is more than one poll.
    assert hits["/v2/fleet/status"] >= 2 and hits["/v2/fleet/stats"] >= 2


def test_screenshot(tmp_path):
    with stub_server(fleet_routes()) as (url, _):
        png = screenshot(url, tmp_path / "status.png", window_size=(1280, 900))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, "a blank page compresses to a few KiB; the rendered one does not"


def test_failed_fetch_shows_a_banner_and_keeps_what_did_arrive():
    routes = fleet_routes()
    routes["/v2/fleet/status"] = (503, "application/json", b'{"error": "controller is not ready"}')
    with stub_server(routes) as (url, _):
        doc = parse_dom(render_dom(url))
    assert doc.find("body").attrs["data-state"] == "error"
    banner = doc.by_id("error")
    assert "hidden" not in banner.attrs
    assert "v2/fleet/status: HTTP 503" in banner.text()
    assert "controller is not ready" in banner.text()
    # Stats still arrived, so the models table is filled.
    assert {tr.attrs["data-model"] for tr in doc.by_id("models").find_all("tr") if "data-model" in tr.attrs} == {
        "digits-mlp", "cnn-small"}


def test_server_strings_are_shown_as_text_never_as_markup():
    evil = '<img src=x onerror="document.title=\'pwned\'">'
    status = sample_status()
    status["nodes"][0]["workers"][0]["device"]["name"] = evil
    stats = sample_stats()
    stats["models"][evil] = stats["models"].pop("cnn-small")
    with stub_server(fleet_routes(status, stats)) as (url, _):
        doc = parse_dom(render_dom(url))
    assert doc.find("body").attrs["data-state"] == "ok"
    assert not doc.find_all("img")
    assert doc.find("title").text() == "forward-fleet status"
    assert evil in doc.find(cls="device", data_worker="t4-node-gpu0").text()
    assert evil in {tr.attrs.get("data-model") for tr in doc.by_id("models").find_all("tr")}
