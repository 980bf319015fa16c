#!/usr/bin/env bash
# Idempotent set-up used by the demo and test commands: mosquitto (and the
# openssl tool the tests use) from Debian's packages when missing, a virtual
# environment with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (Debian package)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v openssl >/dev/null 2>&1; then  # the TLS 1.2 test server of the tests
  echo "== installing openssl (Debian package)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating virtual environment (.venv)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing the project and its dependencies" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The decision core and the MQTT codec compiled to C (mypyc, from the dev
# dependencies): a C compiler and the interpreter's headers from Debian's
# packages when missing. Rebuilt only when their sources changed; if they
# cannot be built they run as Python (the same results, slower) and the tests
# say so.
if ! command -v cc >/dev/null 2>&1 \
  || ! .venv/bin/python -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then
  echo "== installing a C compiler and the Python headers (Debian packages gcc, python3-dev)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Optional: without them the modules run as Python (and the tests say so).
  { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc python3-dev >/dev/null; } \
    || echo "== could not install gcc and python3-dev" >&2
fi
.venv/bin/python scripts/compile_native.py \
  || echo "== the compiled modules were not built: they run as Python" >&2
