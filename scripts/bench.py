#!/usr/bin/env python3
"""The benchmarks (``benchmarks/cli.py``; also ``fleet bench``): ``scripts/bench.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout: its root holds the package

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
