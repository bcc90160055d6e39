#!/usr/bin/env bash
# The test suite (README's test command): sets up what the tests need, then runs
# unit tests and real peers (DCMTK, dcm2niix) on loopback. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
