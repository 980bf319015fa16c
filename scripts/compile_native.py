"""Compiles the pure modules of the per-message path to C extensions with mypyc:
the decision core (`gateway/core`) and the MQTT codec.

    python scripts/compile_native.py [--package DIR] [--force]

DIR is a `gateway` package directory (default: this checkout's). The modules
go to DIR/_compiled/ with a manifest of the sources they were built from;
`gateway.compiled` loads them only while those sources are unchanged (an edited
decide.py runs as Python until it is built again) and only on the same
interpreter. These modules are strictly typed already, so mypyc compiles them
as they are (docs/performance.md has what it gains).

Needs mypy (which ships mypyc) and setuptools importable by this interpreter,
and a C compiler. When one is missing it says so and exits 0: the modules then
run as Python, with the same results (tests/test_compiled_modules.py compares
the two).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
# Paths in the gateway package, without ".py". Pure, synchronous and typed;
# one mypyc group (calls between them stay native).
MODULES = [
    "core/state",
    "core/cache",
    "core/capture",
    "core/identity",
    "core/transforms",
    "core/findmycar",
    "core/ecall",
    "core/header_peek",
    "core/decide",
    "edges/mqtt_codec",
]

# Typing for compilation only: the strict check is `mypy` in the test command.
# Compiling needs the types of these modules and of what they call, not the
# project's dev tooling (pydantic's plugin, stub packages).
MYPY_INI = """\
[mypy]
python_version = 3.11
follow_imports = silent
ignore_missing_imports = True
"""


def package_helpers(package: Path) -> ModuleType:
    """`gateway.compiled` of the package being built: the manifest is what it checks."""
    sys.path.insert(0, str(package.parent))
    try:
        from gateway import compiled
    finally:
        sys.path.pop(0)
    return compiled


def manifest_for(package: Path) -> dict[str, object]:
    """What gateway.compiled checks, and the mypy that built it."""
    from mypy.version import __version__ as mypy_version

    helpers = package_helpers(package)
    return {
        "modules": MODULES,
        **helpers.interpreter(),
        "sources": helpers.sources_digest(package, MODULES),
        "mypy": mypy_version,
    }


def up_to_date(package: Path) -> bool:
    helpers = package_helpers(package)
    root = package / helpers.BUILD_DIR
    try:
        recorded = json.loads((root / helpers.MANIFEST).read_text())
        files = dict(recorded.pop("files"))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == manifest_for(package) and not helpers.damaged(root, files)


def _missing_tool() -> str | None:
    for module in ("mypyc", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed for this interpreter"
    compiler = os.environ.get("CC", "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) on PATH"
    return None


def compile_native(package: Path, force: bool = False) -> int:
    missing = _missing_tool()
    if missing is not None:
        print(f"compiled modules: not built ({missing}); they run as Python", file=sys.stderr)
        return 0
    # One build at a time per package (two set-ups at once would interleave).
    lock_name = hashlib.sha256(str(package).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"compile-native-{lock_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and up_to_date(package):
            print("compiled modules: up to date", file=sys.stderr)
            return 0
        return _build(package)


def _build(package: Path) -> int:
    telematics = importlib.util.find_spec("telematics")
    if telematics is None or not telematics.submodule_search_locations:
        print("compiled modules: the telematics package is not importable", file=sys.stderr)
        return 1
    helpers = package_helpers(package)
    build_dir = helpers.BUILD_DIR
    manifest = manifest_for(package)
    suffix = str(manifest["extension_suffix"])
    staged = Path(tempfile.mkdtemp(prefix=f"{build_dir}.new-", dir=package))
    with tempfile.TemporaryDirectory(prefix="compile-native-") as tmp:
        work = Path(tmp)
        skip = shutil.ignore_patterns("__pycache__", f"{build_dir}*", "*.so")
        shutil.copytree(package, work / "gateway", ignore=skip)
        shutil.copytree(
            next(iter(telematics.submodule_search_locations)), work / "telematics", ignore=skip
        )
        (work / "mypy.ini").write_text(MYPY_INI)
        done = subprocess.run(
            [
                *(sys.executable, "-m", "mypyc", "--config-file", "mypy.ini"),
                *(f"gateway/{module}.py" for module in MODULES),
            ],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            shutil.rmtree(staged, ignore_errors=True)
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            print("compiled modules: mypyc failed; they run as Python", file=sys.stderr)
            return 1
        names = [f"gateway/{module}{suffix}" for module in MODULES]
        # mypyc's shared library of the group, imported by its top-level name.
        names += [shared.name for shared in work.glob(f"*__mypyc{suffix}")]
        for name in names:
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / name, staged / name)
        manifest["files"] = {name: helpers.file_digest(staged / name) for name in names}
        (staged / helpers.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # A process starting in between finds no build and runs the sources.
    target = package / build_dir
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    print(f"compiled modules: built {len(MODULES)} into {target}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--package", type=Path, default=REPO / "gateway")
    parser.add_argument("--force", action="store_true", help="build even when up to date")
    args = parser.parse_args(argv)
    return compile_native(args.package.resolve(), args.force)


if __name__ == "__main__":
    raise SystemExit(main())
