#!/usr/bin/env bash
# The main job: install tinyfed and Fashion-MNIST, then a FedAvg run with a live table, a report
# and a plot. Extra arguments go to `tinyfed run` (e.g. --rounds 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[all]"
exec .venv/bin/tinyfed run "$@"
