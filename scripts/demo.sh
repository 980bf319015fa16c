#!/usr/bin/env bash
# The main job: a private mosquitto, the gateway on the default config, a
# simulated fleet, then the conformance checker's summary and HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m sim demo "$@"
