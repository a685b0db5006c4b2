#!/usr/bin/env bash
# Run the test suite: unit tests (no Ray), integration tests (real Ray on this
# machine); GPU tests are skipped without a GPU.  Extra args go to pytest.
EXTRAS=dev source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# Debian packages some tests need, installed when missing: headless Chromium (the status-page
# test) and redis-server (the head-failure test: GCS fault tolerance keeps its tables in Redis).
# On CI (CI=true) a missing piece fails its tests instead of skipping them (tests/needs.py).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "installing ${missing[*]} (for the status-page and head-failure tests) ..." >&2
  apt_log="$(mktemp)"
  if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1; then
    echo "could not install ${missing[*]}; apt said:" >&2
    tail -n 20 "$apt_log" >&2
    echo "the tests that need them will be skipped (on CI: they fail)" >&2
  fi
  rm -f "$apt_log"
fi
# Triton's perf_analyzer (tests/integration/shared_fleet/test_perf_analyzer.py): into .venv/perf-analyzer when missing.
if [ ! -x .venv/perf-analyzer/bin/perf_analyzer ]; then
  python scripts/install_perf_analyzer.py >/dev/null || echo "perf_analyzer could not be installed; its tests will be skipped (on CI: they fail)" >&2
fi
exec python -m pytest "$@"
