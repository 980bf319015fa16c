"""The pure modules of the per-message path compiled to C with mypyc (the
decision core and the MQTT codec), when `scripts/compile_native.py` has built
them: the set-up scripts and the container image do.

A package of such modules calls `prefer_compiled(__name__, __path__)` before
importing them: its compiled modules are then found first. They are used only
while every source they were built from is unchanged (an edited decide.py runs
as Python at once, with a warning) and on the interpreter they were built for;
GATEWAY_NATIVE=python runs the sources. Both decide alike
(tests/test_compiled_modules.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import MutableSequence
from pathlib import Path

BUILD_DIR = "_compiled"  # in the gateway package
MANIFEST = "manifest.json"
PACKAGE = Path(__file__).parent
# What the compiled modules were type-checked against besides themselves (in
# the gateway package; and the protobuf stubs): mypyc builds those types in and
# checks them at run time, so a change there makes the build stale too.
DEPENDENCIES = ("policy.py",)

log = logging.getLogger(__name__)


def sources_digest(package: Path, modules: list[str]) -> dict[str, str]:
    """sha256 of each compiled module's source ("core/decide.py"), of its
    dependencies, and of the telematics package's stubs ("telematics/...")."""
    files = {f"{module}.py": package / f"{module}.py" for module in modules}
    files.update({name: package / name for name in DEPENDENCIES})
    spec = importlib.util.find_spec("telematics")
    if spec is not None and spec.submodule_search_locations:
        stubs = Path(next(iter(spec.submodule_search_locations)))
        for stub in sorted(stubs.rglob("*.pyi")):
            files[f"telematics/{stub.relative_to(stubs).as_posix()}"] = stub
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}


def interpreter() -> dict[str, str]:
    return {
        "cache_tag": str(sys.implementation.cache_tag),
        "extension_suffix": importlib.machinery.EXTENSION_SUFFIXES[0],
    }


def file_digest(path: Path) -> str | None:
    """sha256 of a file; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def damaged(root: Path, files: dict[str, str]) -> list[str]:
    """The built files (relative to `root`) missing or not as recorded."""
    return [name for name, digest in files.items() if file_digest(root / name) != digest]


@functools.cache
def build() -> Path | None:
    """The compiled build, when it is whole, matches its sources and this
    interpreter, and loads; otherwise None (the sources run)."""
    if os.environ.get("GATEWAY_NATIVE", "").lower() == "python":
        return None
    root = PACKAGE / BUILD_DIR
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        modules = [str(m) for m in manifest["modules"]]
        recorded = dict(manifest["sources"])
        files = {str(name): str(digest) for name, digest in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not modules or {k: manifest.get(k) for k in interpreter()} != interpreter():
        return None
    try:
        current = sources_digest(PACKAGE, modules)
    except OSError:
        return None
    changed = sorted(
        n for n in current.keys() | recorded.keys() if current.get(n) != recorded.get(n)
    )
    if changed:
        log.warning(
            "the compiled modules were built from other sources (%s): running them as"
            " Python (build them again with scripts/compile_native.py)",
            ", ".join(changed),
        )
        return None
    # A truncated or damaged library would crash the process as it loads.
    bad = damaged(root, files)
    shared = [name.split(".", 1)[0] for name in files if "/" not in name]
    if bad or len(shared) != 1:
        log.warning(
            "the compiled build is incomplete or damaged (%s): running as Python",
            ", ".join(bad or files),
        )
        return None
    # mypyc's shared library of the group is imported by its top-level name.
    sys.path.append(str(root))
    try:
        importlib.import_module(shared[0])
    except (ImportError, OSError) as exc:  # another libc, a truncated file
        sys.path.remove(str(root))
        log.warning("the compiled build does not load (%s): running as Python", exc)
        return None
    return root


def prefer_compiled(package: str, path: MutableSequence[str]) -> bool:
    """Put `package`'s compiled modules first on its `__path__` (when built)."""
    root = build()
    if root is None:
        return False
    path.insert(0, str(root.joinpath(*package.split("."))))
    return True


def active() -> bool:
    return build() is not None
