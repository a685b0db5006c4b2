"""Install Triton's perf_analyzer (the C++ load generator) into a scratch directory.

PyPI's ``perf-analyzer`` package is an empty placeholder; the ``tritonclient==2.41.0``
manylinux wheel still carries the binary (``tritonclient-2.41.0.data/data/bin/perf_analyzer``).
It needs Debian's ``libb64-0d`` and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12``
wheel; no GPU is needed to run it). This script, idempotent and quiet when done already:

1. downloads the wheel with pip and takes the binary out of it;
2. installs ``nvidia-cuda-runtime-cu12`` into the same directory (``pip --target``);
3. apt-installs ``libb64-0d`` when it is missing (as root, or with sudo -n);
4. writes ``DIR/bin/perf_analyzer``, a wrapper that sets ``LD_LIBRARY_PATH`` and runs it.

    python scripts/install_perf_analyzer.py [DIR]     # default: <the venv>/perf-analyzer
    DIR/bin/perf_analyzer -m digits-mlp -u 127.0.0.1:8000 -i http

Prints the wrapper's path last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DIR = Path(sys.prefix) / "perf-analyzer"  # in the venv that runs this script
WHEEL = "tritonclient==2.41.0"
MEMBER = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"


def say(msg: str) -> None:
    print(f"[perf_analyzer] {msg}", file=sys.stderr, flush=True)


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def _binary(target: Path) -> None:
    say(f"downloading the {WHEEL} wheel (about 10 MB) for its perf_analyzer binary ...")
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "--no-deps", "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
             "--python-version", "3.11", "-d", tmp, WHEEL)
        wheel = next(Path(tmp).glob("tritonclient-2.41.0-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.chmod(0o755)


def _libb64() -> None:
    if subprocess.run(["sh", "-c", "ldconfig -p | grep -q libb64.so.0d"]).returncode == 0:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit("perf_analyzer needs libb64.so.0d (Debian/Ubuntu: apt-get install libb64-0d)")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    say("apt-get install libb64-0d ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "libb64-0d"]):
        done = subprocess.run(sudo + step, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(step)} failed:\n{(done.stderr or done.stdout)[-2000:]}")


def _wrapper(directory: Path, real: Path, cudart: Path) -> Path:
    libs = cudart / "nvidia" / "cuda_runtime" / "lib"
    wrapper = directory / "bin" / "perf_analyzer"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def install(directory: Path = DEFAULT_DIR) -> Path:
    """The wrapper's path, installing what is missing."""
    directory.mkdir(parents=True, exist_ok=True)
    real = directory / "perf_analyzer.bin"
    if not real.is_file():
        _binary(real)
    cudart = directory / "cudart"
    if not (cudart / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12").is_file():
        say(f"installing {CUDART} (libcudart.so.12) into {cudart} ...")
        _pip("install", "--no-deps", "--target", str(cudart), CUDART)
    _libb64()
    wrapper = _wrapper(directory, real, cudart)
    done = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True)
    if "error while loading shared libraries" in done.stderr:
        raise SystemExit(f"perf_analyzer does not start: {done.stderr.strip()}")
    return wrapper


def main(argv: list[str]) -> int:
    print(install(Path(argv[0]).resolve() if argv else DEFAULT_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
