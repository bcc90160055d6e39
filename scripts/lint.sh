#!/usr/bin/env bash
# ruff + mypy (strict) over the package. The design card's folders install
# under one import name through setuptools' package-dir mapping; mypy cannot
# follow the editable-install import hook, so it checks a tree of symlinks
# laid out as the installed package (build/typecheck/boldstream/...).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check . >/dev/null 2>&1 || { echo "ruff format would change files (run: ruff format .)"; ruff format --check . || true; exit 1; }
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/boldstream"
for f in boldstream/*; do ln -s "$PWD/$f" "$tree/boldstream/$(basename "$f")"; done
for layer in receiver stream analysis sinks config; do ln -s "$PWD/$layer" "$tree/boldstream/$layer"; done
cd "$tree"
mypy --config-file ../../pyproject.toml --explicit-package-bases --cache-dir ../mypy-cache boldstream
