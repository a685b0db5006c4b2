"""The load generator's own ceiling: requests/s against a server that does no work.

The server is the HAProxy the front door uses (``cluster.frontdoor.haproxy``) answering
200 itself: C, no work, so the result is (close to) the generator's own limit on this
machine while it shares the cores with that server. A report uses it to say when the
generator, not the system measured, was the limit.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from cluster.frontdoor.haproxy import haproxy_binary
from cluster.net import free_port

from benchmarks import loadgen
from benchmarks.common import wait_http

_TRIVIAL_CFG = """\
global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend trivial
  bind 127.0.0.1:{port}
  http-request return status 200 content-type "application/json" string "{{\\"ok\\":true}}"
"""


def ceiling(tool: str = "auto", *, concurrency: int = 32, duration_s: float = 3.0, body_bytes: int = 300) -> dict:
    """Requests/s the generator reaches against the trivial server, as ``LoadResult.to_dict`` plus the server."""
    tool = loadgen.pick_tool(tool)
    binary = haproxy_binary()
    if binary is None:
        return {"tool": tool, "skipped": "no HAProxy binary for a trivial server"}
    port = free_port()
    url = f"http://127.0.0.1:{port}/v2/models/x/infer"
    with tempfile.TemporaryDirectory(prefix="loadgen-ceiling-") as tmp:
        cfg = Path(tmp) / "trivial.cfg"
        cfg.write_text(_TRIVIAL_CFG.format(port=port))
        proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(url, 10)
            result = loadgen.run(url, b"x" * body_bytes, {"content-type": "application/octet-stream"},
                                 concurrency=concurrency, duration_s=duration_s, tool=tool)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return dict(result.to_dict(), server="haproxy (http-request return)")
