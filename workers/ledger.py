"""The ledger: footprints of the engines loaded on one device, within its budget.

Pure Python with an injected clock. It never lets the sum of footprints exceed
the budget: admission either fits, names least-recently-used idle engines to
evict first, or raises NoCapacity with the numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from workers.errors import NoCapacity


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class LedgerEntry:
    key: str
    footprint_bytes: int
    loaded_at: float
    last_used: float
    in_flight: int = 0  # inferences running now; an engine in use is never evicted
    loading: bool = False  # reserved while its engine loads: never evicted either

    @property
    def evictable(self) -> bool:
        return not self.in_flight and not self.loading

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "footprint_bytes": self.footprint_bytes,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "in_flight": self.in_flight,
            "loading": self.loading,
        }


class Ledger:
    def __init__(self, budget_bytes: int, clock: Callable[[], float] = time.monotonic, device_name: str = "device"):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = int(budget_bytes)
        self._clock = clock
        self._device_name = device_name
        self._entries: dict[str, LedgerEntry] = {}

    @property
    def used_bytes(self) -> int:
        return sum(e.footprint_bytes for e in self._entries.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries.values())

    def get(self, key: str) -> LedgerEntry | None:
        return self._entries.get(key)

    def plan_admission(self, key: str, footprint_bytes: int) -> list[str]:
        """Keys to evict (least recently used idle engines first) so that ``key`` fits.

        Raises NoCapacity when even evicting every idle engine would not make room.
        Changes nothing: the caller evicts, then calls ``add``.
        """
        if key in self._entries:
            return []
        if footprint_bytes > self.budget_bytes:
            raise NoCapacity(
                f"engine {key} needs {format_bytes(footprint_bytes)}, more than the whole budget "
                f"of {self._device_name} ({format_bytes(self.budget_bytes)})"
            )
        free = self.free_bytes
        if footprint_bytes <= free:
            return []
        victims = []
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if not entry.evictable:
                continue
            victims.append(entry.key)
            free += entry.footprint_bytes
            if footprint_bytes <= free:
                return victims
        raise NoCapacity(
            f"engine {key} needs {format_bytes(footprint_bytes)}; {self._device_name} has "
            f"{format_bytes(self.free_bytes)} free of {format_bytes(self.budget_bytes)} and its "
            f"other engines are busy or still loading"
        )

    def add(self, key: str, footprint_bytes: int, loading: bool = False) -> LedgerEntry:
        if key in self._entries:
            return self._entries[key]
        if footprint_bytes > self.free_bytes:
            raise NoCapacity(
                f"engine {key} needs {format_bytes(footprint_bytes)}; {self._device_name} has "
                f"{format_bytes(self.free_bytes)} free of {format_bytes(self.budget_bytes)}"
            )
        now = self._clock()
        entry = LedgerEntry(key, int(footprint_bytes), loaded_at=now, last_used=now, loading=loading)
        self._entries[key] = entry
        return entry

    def mark_loaded(self, key: str) -> None:
        """The engine reserved with ``add(..., loading=True)`` is in service: evictable when idle."""
        entry = self._entries[key]
        entry.loading = False
        entry.loaded_at = entry.last_used = self._clock()

    def update_footprint(self, key: str, footprint_bytes: int) -> None:
        """Replace an estimate with a measurement; refuses growth beyond the budget."""
        entry = self._entries[key]
        if self.used_bytes - entry.footprint_bytes + footprint_bytes > self.budget_bytes:
            raise NoCapacity(
                f"engine {key} measured {format_bytes(footprint_bytes)}, which does not fit the "
                f"budget of {self._device_name} ({format_bytes(self.budget_bytes)})"
            )
        entry.footprint_bytes = int(footprint_bytes)

    def remove(self, key: str) -> LedgerEntry | None:
        return self._entries.pop(key, None)

    def begin_use(self, key: str) -> int:
        """Mark one more use of ``key``; returns how many were in flight before it."""
        entry = self._entries[key]
        entry.in_flight += 1
        entry.last_used = self._clock()
        return entry.in_flight - 1

    def end_use(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.last_used = self._clock()

    def snapshot(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "entries": [e.to_dict() for e in self._entries.values()],
        }
