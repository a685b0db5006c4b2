from workers.stats import RequestStats, merge


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_replicas_add_up():
    clock = Clock()
    a, b = RequestStats(clock), RequestStats(clock)
    for _ in range(3):
        a.record("m", "1", 0.010)
    b.record("m", "1", 0.030)
    b.record("m", "1", 0.5, error="InvalidInput")
    clock.t += 10
    merged = merge([a.report(), b.report()], now=clock.t)
    m = merged["models"]["m"]
    assert (m["success"], m["failure"], m["failure_by_reason"]) == (4, 1, {"InvalidInput": 1})
    assert m["request_duration_us_sum"] == 3 * 10_000 + 30_000 + 500_000
    assert m["rate_per_s"] == 4 / 10 and m["p50_ms"] == 10.0
    assert merged["uptime_s"] == 10


def test_old_latencies_leave_the_window_but_counters_stay():
    clock = Clock()
    s = RequestStats(clock)
    s.record("m", "1", 0.01)
    clock.t += 120
    m = merge([s.report()], now=clock.t)["models"]["m"]
    assert m["success"] == 1 and m["rate_per_s"] == 0 and m["p50_ms"] is None


def test_rate_counts_every_request_not_just_the_latency_sample():
    clock = Clock()
    s = RequestStats(clock)
    for i in range(5000):  # more than the latency sample keeps (MAX_RECENT)
        clock.t = 1000.0 + i / 1000  # 1,000 requests a second for 5 s
        s.record("m", "1", 0.002)
    clock.t = 1010.0
    m = merge([s.report()], now=clock.t)["models"]["m"]
    assert m["rate_per_s"] == 5000 / 10
    assert m["p50_ms"] == 2.0
