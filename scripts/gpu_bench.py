#!/usr/bin/env python3
"""The GPU benchmark (``benchmarks/gpu.py``), run where the project is on PYTHONPATH:
``python3 scripts/gpu_bench.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout: its root holds the package

from benchmarks.gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
