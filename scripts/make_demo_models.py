#!/usr/bin/env python3
"""Write the demo ONNX models (digits-mlp, cnn-small) into models/ (git-ignored)."""

import argparse
from pathlib import Path

from cluster.demo import make_demo_models

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models"))
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args()
    for name, path in make_demo_models(args.out, force=args.force).items():
        print(f"{name}: {path}")
