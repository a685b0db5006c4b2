"""The fleet's status page (``GET /``): one self-contained HTML document, ``static/status.html``.

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
from importlib import resources

__all__ = ["render_status_page"]


def render_status_page(*, status_url: str = "v2/fleet/status", stats_url: str = "v2/fleet/stats",
                       refresh_ms: int = 2000) -> str:
    """The page with its data URLs and refresh period filled in.

    The default URLs are relative, so the page served at ``/`` polls
    ``/v2/fleet/status`` and one served under a proxy prefix polls under that prefix.
    """
    if refresh_ms <= 0:
        raise ValueError(f"refresh_ms must be positive, got {refresh_ms}")
    template = resources.files("cluster").joinpath("static/status.html").read_text(encoding="utf-8")
    config = json.dumps({"statusUrl": status_url, "statsUrl": stats_url, "refreshMs": int(refresh_ms)})
    # "</" inside a <script> would end it early; "<\/" is the same string to JavaScript.
    return template.replace("__FLEET_CONFIG__", config.replace("</", "<\\/"))
