"""Drive headless Chromium from tests: the rendered DOM of a page, or a screenshot.

Debian's ``chromium`` package (``scripts/test.sh`` installs it when missing). Each
call is one short-lived browser with its own throw-away profile; ``--virtual-time-budget``
lets the page's timers and fetches run (about 5 s of page time) before the DOM or
the screenshot is taken, without the test waiting that long in real time.
``parse_dom`` reads the dumped DOM into a small tree for assertions (stdlib only).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Element", "find_chromium", "parse_dom", "render_dom", "screenshot"]

_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "chrome")

# Quiet, offline, reproducible: no sandbox (tests run as root in containers), no
# GPU, no background traffic, no first-run UI.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) executable on PATH, or None."""
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(url: str, extra: list[str], *, virtual_time_ms: int, timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={virtual_time_ms}", *extra, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"chromium exited with {proc.returncode} for {url}:\n{tail}")
    return proc


def render_dom(url: str, *, virtual_time_ms: int = 5000, timeout: float = 60) -> str:
    """The page's DOM, serialized after its scripts ran for ``virtual_time_ms``."""
    return _run(url, ["--dump-dom"], virtual_time_ms=virtual_time_ms, timeout=timeout).stdout


def screenshot(url: str, path: str | Path, *, window_size: tuple[int, int] = (1280, 900),
               virtual_time_ms: int = 5000, timeout: float = 60) -> Path:
    """Write a PNG of the page to ``path`` and return it."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={path}", f"--window-size={window_size[0]},{window_size[1]}"],
         virtual_time_ms=virtual_time_ms, timeout=timeout)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path


# ---- reading a dumped DOM ------------------------------------------------------
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Element:
    """A parsed element: ``tag``, ``attrs`` (dict), ``children`` (elements and strings)."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None = None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Element):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> list[Element]:
        """Descendants matching tag, class and attributes (``data_worker=`` means ``data-worker``)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.iter()
                if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
                and all(e.attrs.get(k) == v for k, v in want.items())]

    def find(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, cls=cls, **attrs)
        if not found:
            raise LookupError(f"no element matches tag={tag!r} cls={cls!r} {attrs}")
        return found[0]

    def by_id(self, id_: str) -> Element:
        return self.find(id=id_)

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs}>"


def parse_dom(html: str) -> Element:
    """Parse ``render_dom``'s output into a small tree (stdlib only)."""
    from html.parser import HTMLParser

    root = Element("#document", {})

    class _Parser(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.cur = root

        def handle_starttag(self, tag, attrs):
            el = Element(tag, {k: ("" if v is None else v) for k, v in attrs}, self.cur)
            self.cur.children.append(el)
            if tag not in _VOID:
                self.cur = el

        def handle_startendtag(self, tag, attrs):
            self.cur.children.append(Element(tag, {k: ("" if v is None else v) for k, v in attrs}, self.cur))

        def handle_endtag(self, tag):
            node = self.cur
            while node is not root and node.tag != tag:
                node = node.parent
            if node is not root:
                self.cur = node.parent

        def handle_data(self, data):
            self.cur.children.append(data)

    parser = _Parser()
    parser.feed(html)
    parser.close()
    return root
