#!/usr/bin/env bash
# Run the test suite: unit tests (no Ray), integration tests (real Ray on this
# machine); GPU tests are skipped without a GPU.  Extra args go to pytest.
EXTRAS=dev source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest "$@"
