"""The batch job's progress lines and summary (cluster/batch_report.py): pure, driven by a clock we step."""

import threading
import time

from cluster.batch_report import Progress, Summary, region_costs, worker_time
from cluster.controller.views import model_statistics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_when_due_with_rows_rate_and_time_left():
    clock, said = Clock(), []
    summary = Summary(rows=10_000, parts=10)
    progress = Progress(summary, said.append, every_s=5, clock=clock)
    summary.rows_written = 2_000
    clock.now += 4.9
    progress.tick()
    assert said == []  # not due yet
    clock.now += 0.1
    progress.tick()
    assert said == ["  2,000 of 10,000 rows (20 %) in 5 s, 400 rows/s, about 20 s left"]
    summary.rows_written = 3_000
    clock.now += 1
    progress.tick()
    assert len(said) == 1  # the next one is 5 s after the last


def test_parts_done_by_an_earlier_run_are_not_counted_as_work_left():
    clock, said = Clock(), []
    summary = Summary(rows=10_000, parts=10, parts_skipped=5, rows_skipped=5_000)
    progress = Progress(summary, said.append, every_s=1, clock=clock)
    summary.rows_written = 2_500
    clock.now += 10
    progress.tick()
    assert said == ["  2,500 of 5,000 rows (50 %) in 10 s, 250 rows/s, about 10 s left"]


def test_no_lines_when_turned_off_or_before_any_row():
    clock, said = Clock(), []
    summary = Summary(rows=100, parts=1)
    Progress(summary, said.append, every_s=0, clock=clock).tick()
    clock.now += 100
    Progress(summary, said.append, every_s=0, clock=clock).tick()
    assert said == []
    quiet = Progress(summary, said.append, every_s=1, clock=clock)
    clock.now += 2
    quiet.tick()
    assert said == ["  0 of 100 rows (0 %) in 2 s, 0 rows/s"]  # no rate yet: no time left either


def test_summary_renders_rate_transport_and_share_by_device():
    summary = Summary(rows=4_000, rows_written=4_000, parts=4, seconds=2.0, transport="shared memory",
                      part_seconds=0.4)
    summary.rows_per_worker.update({"w1": 3_000, "w2": 1_000})
    summary.devices.update({"w1": "H100", "w2": "T4"})
    text = summary.render()
    assert "time: 2.0 s, 2000 rows/s, retries: 0" in text
    assert "parts through shared memory, 100 ms each from sent to answered" in text
    assert "w1" in text and " 75.0 %" in text and " 25.0 %" in text
    assert summary.to_dict()["rows_per_s"] == 2000.0


def _stats(runs: int, rows: int, run_us: float, queue_us: float) -> dict:
    """The fleet's statistics of one model version (cluster.controller.views), from one worker's engine."""
    engine = {"model": "mlp", "version": "1", "success": runs, "inference_count": rows, "exec_count": runs,
              "queue_us": queue_us, "request_compute_us": run_us, "batch_sizes": {"256": runs},
              "batch_compute_us": {"256": run_us}}
    return model_statistics({"w1": {"engines": {"mlp:1": engine}}}, [("mlp", "1")])


def test_worker_time_is_what_the_engines_did_between_two_readings():
    before, after = _stats(10, 2_560, 8_000.0, 1_000.0), _stats(26, 6_656, 20_000.0, 5_000.0)
    got = worker_time(before, after)
    assert got == {"runs": 16, "rows": 4_096, "requests": 16, "compute_s": 0.012, "queue_s": 0.004}
    summary = Summary(rows=4_096, rows_written=4_096, parts=1, seconds=1.0, transport="shared memory", workers=got)
    assert ("the model's engines meanwhile: 16 runs of 256 rows on average, 0.75 ms each; a request queued "
            "0.25 ms on average") in summary.render()
    assert "engines meanwhile" not in Summary(rows=1, parts=1).render()  # nothing to say without statistics


def test_waiting_adds_the_blocks_time_to_what_the_job_waited_for():
    summary = Summary()
    for _ in range(2):
        with summary.waiting("writes"):
            threading.Event().wait(0.01)
    assert summary.waited_s["writes"] >= 0.02 and summary.waited_s["input"] == summary.waited_s["workers"] == 0


def test_the_timeline_keeps_the_first_sent_and_answered_and_the_last_answered():
    import time

    summary = Summary(rows=8_192, rows_written=8_192, parts=2, seconds=1.0, started=time.monotonic() - 0.5)
    assert "timeline" not in summary.render()  # nothing answered yet
    summary.mark("first sent")
    summary.mark("first answered")
    first = dict(summary.timeline)
    threading.Event().wait(0.02)
    summary.mark("first sent")  # a second part: the first times stay
    summary.mark("last answered", first_only=False)
    summary.mark("last answered", first_only=False)
    assert summary.timeline["first sent"] == first["first sent"] >= 0.5
    assert summary.timeline["last answered"] >= first["first answered"] + 0.02
    assert "timeline: first part sent at 0.5 s, first answered at 0.5 s, last answered at 0.5 s, done at 1.0 s" \
        in summary.render()
    assert "started" not in summary.to_dict() and summary.to_dict()["timeline"] == summary.timeline


def test_the_regions_line_says_what_setting_up_and_first_filling_them_cost():
    from cluster.shm_arena import RegionSetup

    assert region_costs([]) == {} and "shared memory:" not in Summary(rows=1, parts=1).render()
    setups = [RegionSetup(128 << 20, s, f) for s, f in ((0.010, 0.030), (0.020, 0.050), (0.090, None))]
    costs = region_costs(setups)
    assert costs == {"count": 3, "mb": 128.0, "setup_ms": [20.0, 90.0], "first_fill_ms": [50.0, 50.0]}
    text = Summary(rows=1, parts=1, regions=costs).render()
    assert ("shared memory: 3 regions of 128 MB (one per part in flight or being written), each created and "
            "registered in 20 ms (median; at most 90), its first inputs copied in 50 ms (at most 50)") in text


def test_the_timeline_says_when_the_first_part_was_read_where_regions_were_made_for_it():
    summary = Summary(rows=10, parts=1, started=time.monotonic())
    for mark in ("first read", "regions ready", "first sent", "first answered", "last answered"):
        summary.mark(mark)
    assert "timeline: first part read at 0.0 s, regions ready at 0.0 s, first part sent at 0.0 s" in summary.render()
