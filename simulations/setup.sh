#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv in .venv: torch's local CPU wheel first (a looser
# pin would pull multi-GB CUDA builds), then the project with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
