"""Custom-layer plugin libraries in one process: loaded once, given back by their last user.

The plugin registry is the process's, and a library registered twice registers its creators
twice: engines and builds that need the same library share one load, counted here. How a
library is loaded and unloaded on each TensorRT version is ``TrtApi``'s (compat.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from workers.engines.tensorrt.compat import CapturingLogger, TrtApi

# (TensorRT module, path) -> [handle, users]
_LOADED: dict[tuple[int, str], list[Any]] = {}
_LOCK = threading.Lock()


def load_plugin_libraries(api: TrtApi, paths: Iterable[str], logger: CapturingLogger) -> tuple[str, ...]:
    """Load the libraries before a parse or a deserialization needs their creators; what to give
    ``release_plugin_libraries`` after. Nothing stays loaded when one fails."""
    loaded: list[str] = []
    try:
        for path in map(str, paths):
            with _LOCK:
                entry = _LOADED.get((id(api.module), path))
                if entry is None:
                    entry = _LOADED[(id(api.module), path)] = [api.load_plugin_library(path, logger), 0]
                entry[1] += 1
            loaded.append(path)
    except BaseException:
        release_plugin_libraries(api, loaded)
        raise
    return tuple(loaded)


def release_plugin_libraries(api: TrtApi, paths: Iterable[str]) -> None:
    """Give back what ``load_plugin_libraries`` loaded, once every engine and runtime that used the
    libraries is destroyed; the last user unloads each."""
    for path in reversed(list(paths)):
        with _LOCK:
            entry = _LOADED.get((id(api.module), path))
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] > 0:
                continue
            del _LOADED[(id(api.module), path)]
            api.unload_plugin_library(entry[0])
