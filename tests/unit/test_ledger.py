import pytest

from workers.errors import NoCapacity
from workers.ledger import Ledger


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_admission_fits_without_eviction():
    ledger = Ledger(100, clock=FakeClock())
    assert ledger.plan_admission("a", 60) == []
    ledger.add("a", 60)
    assert ledger.used_bytes == 60 and ledger.free_bytes == 40


def test_lru_idle_engines_are_evicted_first():
    ledger = Ledger(100, clock=FakeClock())
    ledger.add("old", 40)
    ledger.add("mid", 30)
    ledger.add("new", 30)
    ledger.begin_use("old")  # touching makes it most recently used ...
    ledger.end_use("old")
    assert ledger.plan_admission("x", 50) == ["mid", "new"]


def test_busy_engines_are_never_evicted():
    ledger = Ledger(100, clock=FakeClock())
    ledger.add("busy", 60)
    ledger.add("idle", 40)
    ledger.begin_use("busy")
    assert ledger.plan_admission("x", 40) == ["idle"]
    with pytest.raises(NoCapacity, match="other engines are busy"):
        ledger.plan_admission("x", 50)


def test_larger_than_budget_is_refused_with_numbers():
    ledger = Ledger(1 << 30, device_name="Tesla P4 (compute capability 6.1, simulated)")
    with pytest.raises(NoCapacity, match=r"needs 2\.0 GiB, more than the whole budget of Tesla P4.*1\.0 GiB"):
        ledger.plan_admission("huge", 2 << 30)


def test_add_never_exceeds_budget():
    ledger = Ledger(100)
    ledger.add("a", 70)
    with pytest.raises(NoCapacity):
        ledger.add("b", 31)
    assert ledger.used_bytes == 70


def test_measured_footprint_replaces_estimate_within_budget():
    ledger = Ledger(100)
    ledger.add("a", 10)
    ledger.update_footprint("a", 90)
    assert ledger.used_bytes == 90
    ledger.add("b", 10)
    with pytest.raises(NoCapacity):
        ledger.update_footprint("a", 95)


def test_already_loaded_needs_nothing():
    ledger = Ledger(100)
    ledger.add("a", 100)
    assert ledger.plan_admission("a", 100) == []


def test_an_engine_still_loading_is_never_chosen_for_eviction():
    """Two loads at once on a full device: the second must not evict the first while it loads
    (it did: plan_admission returned ['A'] and the worker's pop of A raised KeyError -> HTTP 500)."""
    ledger = Ledger(100, clock=FakeClock())
    ledger.add("A", 60, loading=True)
    with pytest.raises(NoCapacity, match="busy or still loading"):
        ledger.plan_admission("B", 60)
    ledger.mark_loaded("A")
    assert ledger.plan_admission("B", 60) == ["A"]
