#!/usr/bin/env python3
"""The soak of the simulated fleet (``benchmarks/soak.py``): ``scripts/soak.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout: its root holds the package

from benchmarks.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
