"""``scripts/bench.py --pin``: parsing, and the load generator's child really running on its cores."""

import os
import sys
import textwrap

import pytest

from benchmarks import cli, loadgen
from workers.cpus import usable_cpus


def test_cpu_lists_read_and_write_tasksets_syntax():
    assert loadgen.parse_cpu_list("0-3,6,8-9") == frozenset({0, 1, 2, 3, 6, 8, 9})
    assert loadgen.format_cpu_list({0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9"
    assert loadgen.format_cpu_list({5}) == "5"
    for bad in ("", "a", "3-1", "1-", "-2"):
        with pytest.raises(ValueError):
            loadgen.parse_cpu_list(bad)


def test_pin_splits_fleet_and_load_generator_cores():
    sixteen = frozenset(range(16))
    assert cli.parse_pin("0-7:8-15", sixteen) == (frozenset(range(8)), frozenset(range(8, 16)))
    with pytest.raises(ValueError, match="share core"):
        cli.parse_pin("0-8:8-15", sixteen)
    with pytest.raises(ValueError, match="not available"):
        cli.parse_pin("0-7:8-16", sixteen)
    with pytest.raises(ValueError, match="FLEET_CPUS:LOADGEN_CPUS"):
        cli.parse_pin("0-7", sixteen)


def test_bench_command_line_takes_pin():
    args = cli.parse_args(["--pin", "0:1"]) if usable_cpus() >= 2 and {0, 1} <= os.sched_getaffinity(0) else None
    if args is not None:
        assert args.pin == (frozenset({0}), frozenset({1}))
    assert cli.parse_args([]).pin is None
    with pytest.raises(SystemExit):
        cli.parse_args(["--pin", "0:0"])


def test_wrk_threads_follow_the_load_generators_cores():
    assert loadgen.wrk_threads(8, None, cores=2) == 1 and loadgen.wrk_threads(64, None, cores=4) == 2
    assert loadgen.wrk_threads(8, None, cores=16) == 4 and loadgen.wrk_threads(2, None, cores=16) == 2
    assert loadgen.wrk_threads(64, frozenset(range(8))) == 8
    assert loadgen.wrk_threads(8, frozenset(range(8))) == 1
    assert loadgen.wrk_threads(256, frozenset({3, 4})) == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_the_load_generators_child_runs_on_the_named_cores(monkeypatch, tmp_path):
    """The child (a real process) reports its own affinity; the parent's stays as it was."""
    mine = sorted(os.sched_getaffinity(0))
    target = mine[-1]
    monkeypatch.setenv(loadgen.CPUS_ENV, str(target))
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import os
        print(sorted(os.sched_getaffinity(0)))
    """))
    import subprocess

    out = subprocess.run([sys.executable, str(child)], capture_output=True, text=True, check=True,
                         preexec_fn=loadgen._pin_child(loadgen.pinned_cpus()))
    assert out.stdout.strip() == str([target])
    assert sorted(os.sched_getaffinity(0)) == mine


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_the_python_generator_is_pinned_when_it_runs(monkeypatch):
    """loadgen.run itself: its python engine's process is seen, while it runs, on the named core."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            if not seen:
                seen.append(_affinity_of_peer(self.client_address[1]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = sorted(os.sched_getaffinity(0))[-1]
    monkeypatch.setenv(loadgen.CPUS_ENV, str(target))
    try:
        r = loadgen.run(f"http://127.0.0.1:{server.server_address[1]}/x", b"x", {}, concurrency=1, duration_s=0.5,
                        tool="python")
    finally:
        server.shutdown()
    assert r.requests > 0
    assert seen == [[target]]


def _affinity_of_peer(port: int) -> list[int] | None:
    """The affinity of the local process whose TCP socket has source port ``port`` (through /proc)."""
    inode = None
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            inode = fields[9]
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                return sorted(os.sched_getaffinity(int(pid)))
        except OSError:
            continue
    return None
