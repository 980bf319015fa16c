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
import importlib.machinery
import json
import logging
import os
import sys
from collections.abc import MutableSequence
from pathlib import Path

BUILD_DIR = "_compiled"  # in the gateway package
MANIFEST = "manifest.json"
PACKAGE = Path(__file__).parent

log = logging.getLogger(__name__)


def sources_digest(package: Path, modules: list[str]) -> dict[str, str]:
    """sha256 of each module's source, by its path in the package ("core/decide.py")."""
    return {
        f"{module}.py": hashlib.sha256((package / f"{module}.py").read_bytes()).hexdigest()
        for module in modules
    }


def interpreter() -> dict[str, str]:
    return {
        "cache_tag": str(sys.implementation.cache_tag),
        "extension_suffix": importlib.machinery.EXTENSION_SUFFIXES[0],
    }


@functools.cache
def build() -> Path | None:
    """The compiled build, when it matches its sources and this interpreter."""
    if os.environ.get("GATEWAY_NATIVE", "").lower() == "python":
        return None
    root = PACKAGE / BUILD_DIR
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        modules = [str(m) for m in manifest["modules"]]
        recorded = dict(manifest["sources"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not modules or {k: manifest.get(k) for k in interpreter()} != interpreter():
        return None
    try:
        current = sources_digest(PACKAGE, modules)
    except OSError:
        return None
    changed = sorted(name for name, digest in current.items() if recorded.get(name) != digest)
    if changed:
        log.warning(
            "the compiled modules were built from other sources (%s): running them as"
            " Python (build them again with scripts/compile_native.py)",
            ", ".join(changed),
        )
        return None
    # mypyc's shared library of the group is imported by its top-level name.
    if str(root) not in sys.path:
        sys.path.append(str(root))
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
