#!/usr/bin/env bash
# The test suite: unit tests and real peers (DCMTK, dcm2niix, Chromium) on loopback.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
