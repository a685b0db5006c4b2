"""Skips that say "this machine lacks it", and never hide a broken set-up on CI.

On a developer's machine a missing optional piece (Chromium, HAProxy, the TensorRT
lean wheel, mypy's stubs) skips the tests that need it. On CI (``CI=true``) the
project's own scripts install every one of them, so a missing piece there means the
set-up broke: the test fails and says what is missing. Only hardware (a GPU) may
skip on CI; that is the GPU marker's business (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_unless(available: bool, reason: str) -> None:
    """Skip (here) or fail (on CI) when ``available`` is false."""
    if available:
        return
    if on_ci():
        pytest.fail(f"set-up incomplete on CI: {reason}", pytrace=False)
    pytest.skip(reason)
