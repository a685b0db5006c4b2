#!/usr/bin/env bash
# Run the test suite: unit tests (no Ray), integration tests (real Ray on this
# machine); GPU tests are skipped without a GPU.  Extra args go to pytest.
EXTRAS=dev source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# The status-page test drives headless Chromium (Debian package `chromium`): install it when missing.
# On CI (CI=true) a missing piece fails its tests instead of skipping them (tests/needs.py).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "installing chromium (for the status-page test) ..." >&2
  apt_log="$(mktemp)"
  if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$apt_log" 2>&1; then
    echo "could not install chromium; apt said:" >&2
    tail -n 20 "$apt_log" >&2
    echo "the status-page tests will be skipped (on CI: they fail)" >&2
  fi
  rm -f "$apt_log"
fi
# Triton's perf_analyzer (tests/integration/shared_fleet/test_perf_analyzer.py): into .venv/perf-analyzer when missing.
if [ ! -x .venv/perf-analyzer/bin/perf_analyzer ]; then
  python scripts/install_perf_analyzer.py >/dev/null || echo "perf_analyzer could not be installed; its tests will be skipped (on CI: they fail)" >&2
fi
exec python -m pytest "$@"
