#!/usr/bin/env bash
# Start forward-fleet on this machine with the demo models; Ctrl-C stops it all.
#   scripts/run.sh [extra `fleet up` options, e.g. --config configs/hetero-sim.yaml]
EXTRAS=demo source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec fleet up --config "${FLEET_CONFIG:-configs/local.yaml}" --demo --foreground "$@"
