#!/usr/bin/env bash
# Install the dev dependencies (and Chromium + Fashion-MNIST for the real-component tests), then
# run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh --browser
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,dev,ray]"
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest -q "$@"
