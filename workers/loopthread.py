"""An asyncio event loop in a thread of its own: how the worker process runs its HTTP and gRPC endpoints.

``start`` runs ``setup`` on the new loop and returns once it is done (re-raising what it
raised), then the loop runs until ``stop``; ``teardown`` runs on the loop before it closes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable


def new_loop(fast: bool) -> asyncio.AbstractEventLoop:
    """uvloop when asked for and installed (the HTTP endpoint), else asyncio's own (grpc.aio needs it)."""
    if fast:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


class LoopThread:
    def __init__(self, name: str, *, fast: bool = False) -> None:
        self.name = name
        self.fast = fast
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, setup: Callable[[], Awaitable[object]], teardown: Callable[[], Awaitable[None]],
              timeout_s: float = 30.0) -> None:
        started = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = new_loop(self.fast)
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # noqa: BLE001 (re-raised in start's caller)
                failed.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(teardown())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait(timeout_s)
        if failed:
            raise failed[0]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
