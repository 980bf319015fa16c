#!/bin/sh
# Installs what the gateway needs to run into a virtual environment without
# pip: its dependencies (read from pyproject.toml), or the project itself.
# Never the simulator, the benchmarks, the tests or the dev tools. The
# Dockerfile runs it in two layers (dependencies, then the source); a test
# runs it the same way in a fresh directory.
#
#   sh scripts/install-runtime.sh deps VENV      # needs only pyproject.toml
#   sh scripts/install-runtime.sh project VENV   # needs the source, adds no dependency
#
# Run from the directory holding pyproject.toml; PYTHON (default python3) is
# the interpreter whose pip does the installing.
set -eu
mode="${1:-}"
venv="${2:-}"
python="${PYTHON:-python3}"
if [ -z "$venv" ] || { [ "$mode" != deps ] && [ "$mode" != project ]; }; then
  echo "usage: $0 deps|project VENV" >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || "$python" -m venv --without-pip "$venv"
install() {
  "$python" -m pip --python "$venv/bin/python" --disable-pip-version-check install "$@"
}
if [ "$mode" = deps ]; then
  requirements="$(mktemp)"
  "$python" -c 'import tomllib
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(requirement)' >"$requirements"
  install --requirement "$requirements"
  rm -f "$requirements"
else
  install --no-deps .
fi
