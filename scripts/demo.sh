#!/usr/bin/env bash
# README's first command: install boldstream and run the demo (a simulated
# scanner sends a resting-state run to a live boldstream). Arguments go to
# `boldstream demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec boldstream demo "$@"
