#!/usr/bin/env python3
"""Install tensorrt-stubs for mypy, outside site-packages, with its syntax errors fixed.

Why not ``pip install tensorrt-stubs``:

- it requires ``tensorrt==10.13.0.35``, whose libraries wheel is a placeholder that
  downloads from NVIDIA's own index, unreachable here (so: ``--no-deps``);
- in site-packages its ``tensorrt/__init__.pyi`` makes ``import tensorrt`` succeed as
  an empty namespace package, so code that probes for TensorRT thinks it is there
  (so: ``--target <venv>/trt-stubs``, found by mypy through MYPYPATH);
- 10.13.0.35.1 is not valid Python in two ways mypy refuses: plugin parameters
  named ``in`` (a keyword; renamed ``in_``) and parameters without a default after
  ones with a default (``add_scale_nd``; given ``= ...``). Every stub file is parsed
  afterwards to check nothing else is left.

Usage: python scripts/install_trt_stubs.py [--target DIR]   (default: <venv>/trt-stubs)
Then:  MYPYPATH=<venv>/trt-stubs mypy workers/engines/tensorrt/
"""

from __future__ import annotations

import argparse
import ast
import keyword
import re
import subprocess
import sys
from pathlib import Path

STUBS_REQUIREMENT = "tensorrt-stubs==10.13.0.35.1"
DEFAULT_TARGET = Path(sys.prefix) / "trt-stubs"
# A keyword used as a parameter name: "(in: ..." or ", in: ...".
_KEYWORD_PARAMETER = re.compile(r"([(,]\s*)(" + "|".join(keyword.kwlist) + r")(\s*:)")


_DEF_LINE = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$")


def fix_keyword_parameters(text: str) -> tuple[str, int]:
    return _KEYWORD_PARAMETER.subn(lambda m: f"{m.group(1)}{m.group(2)}_{m.group(3)}", text)


def _split_parameters(params: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in params:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def fix_default_order(text: str) -> tuple[str, int]:
    """Give ``= ...`` to parameters without a default that follow one with a default."""
    fixed, lines = 0, []
    for line in text.splitlines(keepends=True):
        match = _DEF_LINE.match(line.rstrip("\n"))
        if match:
            params = _split_parameters(match.group(2))
            seen_default = False
            for i, param in enumerate(params):
                bare = param.strip()
                if bare.startswith("*") or bare == "/":
                    break  # keyword-only parameters may follow defaults
                if "=" in bare:
                    seen_default = True
                elif seen_default and bare:
                    params[i] = f"{param} = ..."
                    fixed += 1
            line = match.group(1) + ",".join(params) + match.group(3) + ("\n" if line.endswith("\n") else "")
        lines.append(line)
    return "".join(lines), fixed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    args = parser.parse_args()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--upgrade", "--target", str(args.target), STUBS_REQUIREMENT],
        check=True,
    )
    fixed = 0
    for stub in sorted(args.target.rglob("*.pyi")):
        text, renamed = fix_keyword_parameters(stub.read_text())
        text, defaulted = fix_default_order(text)
        count = renamed + defaulted
        if count:
            stub.write_text(text)
            fixed += count
        ast.parse(text, filename=str(stub))  # raises SyntaxError if anything is left
    print(f"{STUBS_REQUIREMENT} in {args.target} ({fixed} parameter(s) fixed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
