#!/usr/bin/env bash
# The test command: set-up, lint, type check, then every test (unit,
# property, integration against real mosquitto brokers, fleet conformance,
# deployment files: alert rules with promtool, systemd unit, manifests; the
# HTML report rendered in headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# promtool checks deploy/prometheus/alerts.yml: taken out of Debian's
# `prometheus` package into .venv/bin (installing the package would also
# start a Prometheus server).
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .venv/bin/promtool ]; then
  echo "== fetching promtool (Debian package prometheus)" >&2
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" .venv/bin/promtool
  rm -rf "$tmp"
fi
# The PostgreSQL store is tested on a private server the tests start (initdb
# and pg_ctl from Debian's package): the package creates no cluster of its own
# (createcluster.conf, kept as ours) and starts no service while installing.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "== installing the PostgreSQL server binaries (Debian package postgresql)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  blocker=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    blocker=/usr/sbin/policy-rc.d
    trap '$SUDO rm -f "$blocker"' EXIT
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$blocker" >/dev/null
    $SUDO chmod 0755 "$blocker"
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Dpkg::Options::=--force-confold postgresql >/dev/null
  if [ -n "$blocker" ]; then
    $SUDO rm -f "$blocker"
    trap - EXIT
  fi
fi
# The report test renders the HTML report in headless Chromium (Debian package).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian package, for the report rendering test)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "== ruff" >&2
.venv/bin/ruff check gateway sim tests proto bench scripts
echo "== mypy" >&2
.venv/bin/mypy
# The main run uses the decision core and MQTT codec compiled to C (the
# set-up builds them); their own tests run as Python as well, so the sources
# a failed build falls back to stay tested.
echo "== pytest: decision core and MQTT codec as Python" >&2
GATEWAY_NATIVE=python .venv/bin/python -m pytest -q -p no:cacheprovider -m "not integration" \
  tests/test_anchor.py tests/test_capture.py tests/test_capture_consent.py tests/test_decide.py \
  tests/test_find_my_car.py tests/test_identity.py tests/test_transforms.py \
  tests/test_mqtt_codec.py tests/test_recipients.py
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
