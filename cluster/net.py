"""Addresses and ports."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def is_wildcard(host: str) -> bool:
    """A bind-to-every-interface address, which nobody can connect to as such."""
    return host in ("0.0.0.0", "::")


def local_address(host: str) -> str:
    """Where a process on the same host reaches a server bound to ``host``."""
    return "127.0.0.1" if is_wildcard(host) else host


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


RAY_WORKER_PORTS_END = 20000  # Ray's workers take 10002-19999 (and its client server 10001): never ours


def _ephemeral_start() -> int:
    """Where the kernel's range for bind(0) and outgoing connections starts."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, chosen between Ray's worker ports and the kernel's ephemeral
    range: a port from that range can be handed to any process's ``bind(0)`` or outgoing connection
    before our server binds it (seen in CI: HAProxy's listener lost its port to a worker's endpoint
    started meanwhile), and `ray start` refuses a port of its workers' range."""
    address = "" if is_wildcard(host) else host
    low = _ephemeral_start()
    for port in random.sample(range(RAY_WORKER_PORTS_END, low), min(64, max(0, low - RAY_WORKER_PORTS_END))):
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: the kernel's choice
        sock.bind((address, 0))
        return sock.getsockname()[1]
