"""forward-fleet's benchmarks (``fleet bench``, ``scripts/bench.py``): the serving path against
what users would pick instead, on the same models and machine.

- ``cli``: the command line and the result document; ``plans`` says how each phase runs
  (Serve modes, specs), ``runner`` runs it, one process per phase;
- ``phases``: one module per phase, each with ``run(spec) -> dict``;
- ``common``, ``serve_modes``, ``httpbench``: what the phases share;
- ``loadgen`` (the load generator, standard library only) and ``ceiling`` (its own limit);
- ``report``: targets, table and chart from a result document;
- ``gpu`` (``scripts/gpu_bench.py``) and ``soak`` (``scripts/soak.py``): the GPU benchmark and the soak.

Nothing here is imported by ``cluster`` or ``workers`` except ``fleet bench``'s call of
``benchmarks.cli.main``. This file imports nothing: the triton phase imports the package
in PyTriton's environment.
"""
