#!/usr/bin/env bash
# The test command: set-up, lint, type check, then every test (unit,
# property, integration against real mosquitto brokers, fleet conformance).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff" >&2
.venv/bin/ruff check gateway sim tests proto bench
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
