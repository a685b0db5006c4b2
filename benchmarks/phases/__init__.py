"""The benchmark phases, one module each, each run in a process of its own:

    python -m benchmarks.phases PHASE SPEC.json      (from the checkout's root)

A phase module exposes ``run(spec: dict) -> dict``: ``{"rows": [...], "info": {...}}``
plus what the phase adds. A phase that starts Ray starts a fresh local instance and
tears it down before it returns; the Serve mode and every other switch come in the
process's environment, complete before it starts (``benchmarks.serve_modes.phase_env``).

Standard library only, as ``__main__`` is: the triton phase runs in PyTriton's own
environment, which has numpy and onnxruntime but not the project's dependencies.
"""

PHASES = ("bare", "fleet-http", "fleet-levers", "fleet-client", "naive-serve", "triton", "perf-analyzer", "router",
          "cold-start", "profile")
RESULT_MARK = "BENCH_RESULT "  # the line of a phase process's stdout that carries its result


def module_name(phase: str) -> str:
    """The module that runs ``phase``: ``fleet-http`` -> ``benchmarks.phases.fleet_http``."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    return f"{__name__}.{phase.replace('-', '_')}"
