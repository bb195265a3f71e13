#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv in .venv: torch's local CPU wheel first (a looser
# pin would pull multi-GB CUDA builds), then the project with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# the browser test of `storefed serve`'s page (tests/test_serve.py) drives Debian's chromium
# through its chromedriver; as root on Debian/Ubuntu, install them when missing (CI does)
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            chromium chromium-driver >/dev/null
    else
        echo "setup.sh: chromium + chromium-driver missing (not root or no apt-get): the" \
             "browser test will be skipped" >&2
    fi
fi
