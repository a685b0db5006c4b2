"""Run one phase and print its result as one line ``BENCH_RESULT {...}`` on stdout (logs go to stderr).

    python -m benchmarks.phases PHASE SPEC.json

``benchmarks.runner`` starts this from the checkout's root, one process per phase.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from benchmarks.phases import PHASES, RESULT_MARK, module_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("spec", type=Path, help="the phase's spec, as JSON")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = importlib.import_module(module_name(args.phase)).run(spec)
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
