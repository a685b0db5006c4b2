"""Progress and warnings for people at a terminal: one line each, on stderr, at once."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
