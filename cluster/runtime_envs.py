"""The Python environment of each GPU type: prepared once per host, then handed to its workers
through Ray's per-actor ``runtime_env`` (``py_executable``).

Why not Ray's ``runtime_env={"pip": [...]}``: inside a virtualenv, Ray 2.60 clones the whole
virtualenv per environment and per Ray session (measured: 1.5 GB and 27 s for one
``onnxruntime==1.31.1`` on the 2-core machine, again after every `ray start`, and never
removed with the session's directory). Here an environment is a small virtualenv holding only
the type's packages, layered over the fleet's own environment (a ``.pth`` adds its
site-packages after the venv's own, so the type's ONNX Runtime wins and everything else is
shared): ~70 MB and ~5 s once per host (pip's cache warm), reused by every later fleet.

An environment is keyed by its requirements (``runtime_policy.env_key``) and marked ready only
after pip succeeded; a file lock keeps two workers from preparing the same one at once.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from workers.errors import NotReady

from cluster.config import FleetConfig
from cluster.env import runtime_cache_root
from cluster.runtime_policy import env_key

READY = "fleet-ready.json"
PIP_TIMEOUT_S = 600


def environment_dir(packages: tuple[str, ...], root: Path | None = None) -> Path:
    return (root or runtime_cache_root()) / env_key(packages)


def prepare_environment(packages: tuple[str, ...], root: Path | None = None) -> str:
    """The python of an environment with ``packages`` over this interpreter's own; made once."""
    where = environment_dir(packages, root)
    python = where / "bin" / "python"
    if (where / READY).is_file():
        return str(python)
    where.parent.mkdir(parents=True, exist_ok=True)
    with open(where.parent / f"{where.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker of this host may be preparing it right now
        if (where / READY).is_file():
            return str(python)
        shutil.rmtree(where, ignore_errors=True)  # a half-made one from an interrupted attempt
        t0 = time.monotonic()
        _run([sys.executable, "-m", "venv", "--without-pip", str(where)], packages, where)
        purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                               text=True).strip())
        # the fleet's own packages, after the environment's: one import line processes their .pth files too
        bases = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
        (purelib / "_fleet_base.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in dict.fromkeys(bases)) + "\n")
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", *packages],
             packages, where)
        (where / READY).write_text(json.dumps({"packages": list(packages), "seconds": round(time.monotonic() - t0, 1),
                                               "base": sys.executable}))
    return str(python)


def _run(cmd: list[str], packages: tuple[str, ...], where: Path) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NotReady(f"preparing the environment for {', '.join(packages)} at {where} took over {PIP_TIMEOUT_S} s "
                       f"(is PyPI or your index reachable from this host?)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise NotReady(f"could not prepare the environment for {', '.join(packages)} at {where} "
                       f"(`{' '.join(cmd[:4])} ...` exited {proc.returncode}):\n{tail}")


def environment_info(packages: tuple[str, ...], root: Path | None = None) -> dict | None:
    """What the ready marker says (time it took), or None when this host has not prepared it."""
    marker = environment_dir(packages, root) / READY
    return json.loads(marker.read_text()) if marker.is_file() else None


def wanted_environments(config: FleetConfig) -> dict[tuple[str, ...], str]:
    """Requirements -> the nodes that want them, for the declared nodes of ``config``."""
    profiles = config.runtime_profiles()
    wanted: dict[tuple[str, ...], list[str]] = {}
    for node in config.nodes:
        for device in node.simulated_devices():
            profile = profiles.for_device(device)
            packages = profile.packages(simulated=True) if profile else ()
            if packages:
                wanted.setdefault(packages, []).append(node.name)
    return {p: ", ".join(dict.fromkeys(n)) for p, n in wanted.items()}
