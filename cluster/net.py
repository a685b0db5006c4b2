"""Addresses and ports."""

from __future__ import annotations

import socket


def is_wildcard(host: str) -> bool:
    """A bind-to-every-interface address, which nobody can connect to as such."""
    return host in ("0.0.0.0", "::")


def local_address(host: str) -> str:
    """Where a process on the same host reaches a server bound to ``host``."""
    return "127.0.0.1" if is_wildcard(host) else host


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("" if is_wildcard(host) else host, 0))
        return sock.getsockname()[1]
