"""Compiles the decision core (`gateway/core`) to C extensions with mypyc.

    python scripts/compile_core.py [--package DIR] [--force]

DIR is a `gateway` package directory (default: this checkout's). The modules
go to DIR/core/_compiled/ with a manifest of the sources they were built from;
`gateway.core` loads them only while those sources are unchanged (an edited
decide.py runs as Python until it is compiled again) and only on the same
interpreter. The core is strictly typed already, so mypyc compiles it as it
is; it runs 1.4-2x faster (docs/performance.md).

Needs mypy (which ships mypyc) importable by this interpreter and a C compiler.
When either is missing it says so and exits 0: the core then runs as Python,
with the same decisions (tests/test_compiled_core.py compares the two).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The pure decision core, leaves first (the order is only for the log).
MODULES = ("state", "cache", "capture", "identity", "transforms", "findmycar", "ecall", "decide")
COMPILED_DIR = "_compiled"
MANIFEST = "manifest.json"
REPO = Path(__file__).resolve().parents[1]

# Typing for compilation only: the strict check is `mypy` in the test command.
# Compiling needs the types of the core and of what it calls, not the whole
# project's dev tooling (pydantic's plugin, stub packages).
MYPY_INI = """\
[mypy]
python_version = 3.11
follow_imports = silent
ignore_missing_imports = True
"""


def sources_digest(core: Path) -> dict[str, str]:
    return {
        f"{name}.py": hashlib.sha256((core / f"{name}.py").read_bytes()).hexdigest()
        for name in MODULES
    }


def manifest_for(core: Path) -> dict[str, object]:
    return {
        "cache_tag": sys.implementation.cache_tag,
        "extension_suffix": importlib.machinery.EXTENSION_SUFFIXES[0],
        "sources": sources_digest(core),
    }


def up_to_date(core: Path) -> bool:
    path = core / COMPILED_DIR / MANIFEST
    try:
        return bool(json.loads(path.read_text()) == manifest_for(core))
    except (OSError, ValueError):
        return False


def _missing_tool() -> str | None:
    if importlib.util.find_spec("mypyc") is None:
        return "mypy (mypyc) is not installed for this interpreter"
    compiler = os.environ.get("CC", "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) on PATH"
    return None


def compile_core(package: Path, force: bool = False) -> int:
    core = package / "core"
    if not force and up_to_date(core):
        print("decision core: compiled build is up to date", file=sys.stderr)
        return 0
    missing = _missing_tool()
    if missing is not None:
        print(f"decision core: not compiled ({missing}); it runs as Python", file=sys.stderr)
        return 0
    telematics = importlib.util.find_spec("telematics")
    if telematics is None or not telematics.submodule_search_locations:
        print("decision core: the telematics package is not importable", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="compile-core-") as tmp:
        work = Path(tmp)
        skip = shutil.ignore_patterns("__pycache__", COMPILED_DIR, "*.so")
        shutil.copytree(package, work / "gateway", ignore=skip)
        shutil.copytree(
            next(iter(telematics.submodule_search_locations)), work / "telematics", ignore=skip
        )
        (work / "mypy.ini").write_text(MYPY_INI)
        files = [f"gateway/core/{name}.py" for name in MODULES]
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", "--config-file", "mypy.ini", *files],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            print("decision core: mypyc failed; it runs as Python", file=sys.stderr)
            return 1
        staged = core / f"{COMPILED_DIR}.new"
        shutil.rmtree(staged, ignore_errors=True)
        (staged / "gateway" / "core").mkdir(parents=True)
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        for name in MODULES:
            built = work / "gateway" / "core" / f"{name}{suffix}"
            shutil.copy2(built, staged / "gateway" / "core" / built.name)
        # mypyc's shared library for the group of modules, imported by name.
        for shared in work.glob(f"*__mypyc{suffix}"):
            shutil.copy2(shared, staged / shared.name)
        (staged / MANIFEST).write_text(json.dumps(manifest_for(core), indent=2) + "\n")
    target = core / COMPILED_DIR
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    print(f"decision core: compiled {len(MODULES)} modules into {target}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--package", type=Path, default=REPO / "gateway")
    parser.add_argument("--force", action="store_true", help="compile even when up to date")
    args = parser.parse_args(argv)
    return compile_core(args.package.resolve(), args.force)


if __name__ == "__main__":
    raise SystemExit(main())
