# Shared by run.sh and test.sh: make .venv and install the project with EXTRAS,
# quietly, and only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "forward-fleet needs Python 3.11+; $("$PY" --version 2>&1) found (set PYTHON=...)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || { echo "creating .venv ..." >&2; "$PY" -m venv .venv; }
stamp=".venv/.installed-${EXTRAS:-base}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing forward-fleet[${EXTRAS:-}] into .venv (first run takes a few minutes) ..." >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}" >&2
  if [ "${EXTRAS:-}" = dev ]; then  # type stubs for mypy on the TensorRT backend (kept out of site-packages)
    .venv/bin/python scripts/install_trt_stubs.py >&2
  fi
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export ORT_DISABLE_TELEMETRY=1 RAY_USAGE_STATS_ENABLED=0
