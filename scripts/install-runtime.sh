#!/bin/sh
# Installs what the gateway needs to run into a virtual environment without
# pip: its dependencies (read from pyproject.toml), or the project itself.
# Never the simulator, the benchmarks, the tests or the dev tools. The
# Dockerfile runs it in two layers (dependencies, then the source); a test
# runs it the same way in a fresh directory.
#
#   sh scripts/install-runtime.sh deps VENV      # needs only pyproject.toml
#   sh scripts/install-runtime.sh project VENV   # needs the source, adds no dependency
#   sh scripts/install-runtime.sh compile VENV   # the per-message path to C (mypyc):
#       needs compile_native.py beside it and a C compiler; mypy is installed
#       into a directory of its own for the build and removed, never into VENV
#
# Run from the directory holding pyproject.toml; PYTHON (default python3) is
# the interpreter whose pip does the installing.
set -eu
mode="${1:-}"
venv="${2:-}"
python="${PYTHON:-python3}"
if [ -z "$venv" ] || { [ "$mode" != deps ] && [ "$mode" != project ] && [ "$mode" != compile ]; }; then
  echo "usage: $0 deps|project|compile VENV" >&2
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
elif [ "$mode" = project ]; then
  install --no-deps .
else
  tools="$(mktemp -d)"
  # The dev environment's mypy and protobuf stubs (what the tested build was
  # compiled with) and setuptools (mypyc builds the extensions with it).
  requirements="$(mktemp)"
  "$python" -c 'import tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
for r in dev:
    if r.startswith(("mypy", "types-protobuf", "setuptools")):
        print(r)' >"$requirements"
  "$python" -m pip --disable-pip-version-check install --quiet --target "$tools" \
    --requirement "$requirements"
  rm -f "$requirements"
  # -I: the installed package, not the source tree beside this script.
  package="$("$venv/bin/python" -I -c 'import gateway, os; print(os.path.dirname(gateway.__file__))')"
  PYTHONPATH="$tools" "$venv/bin/python" "$(dirname "$0")/compile_native.py" --package "$package"
  rm -rf "$tools"
  "$venv/bin/python" -I -c 'import gateway.compiled, sys; sys.exit(not gateway.compiled.active())' \
    || { echo "the compiled modules were not built" >&2; exit 1; }
fi
