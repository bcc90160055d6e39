#!/usr/bin/env bash
# Install boldstream into the current Python environment (idempotent).
#   scripts/setup.sh          the package and its runtime dependencies
#   scripts/setup.sh --test   also what the tests need: test tools from PyPI,
#                             heudiconv's sample DICOM files, and Debian's DCMTK
#                             (storescu/echoscu/storescp), dcm2niix and chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

export PIP_ROOT_USER_ACTION=ignore
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }

if [ "$want_test" = 1 ]; then
  need=()
  for tool in storescu echoscu storescp; do
    [ -x "/usr/bin/$tool" ] || need+=(dcmtk)
  done
  command -v dcm2niix >/dev/null || need+=(dcm2niix)
  # The dashboard's browser tests drive Debian's chromium through Playwright.
  [ -x /usr/bin/chromium ] || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # shellcheck disable=SC2046
    $sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
  fi
  pip_install -e '.[test]'
  # heudiconv's wheel carries real Siemens mosaic and XA Enhanced MR files;
  # only that data is used, so none of its dependencies are installed.
  python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('heudiconv') is None)" \
    || pip_install --no-deps heudiconv==1.5.1
else
  pip_install -e .
fi
