#!/usr/bin/env bash
# Run the test suite: unit tests (no Ray), integration tests (real Ray on this
# machine); GPU tests are skipped without a GPU.  Extra args go to pytest.
EXTRAS=dev source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# The status-page test drives headless Chromium (Debian package `chromium`): install it when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "installing chromium (for the status-page test) ..." >&2
  { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "could not install chromium; the status-page test will be skipped" >&2
fi
exec python -m pytest "$@"
