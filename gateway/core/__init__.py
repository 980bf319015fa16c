"""The pure decision core: no I/O, no clock, no globals it mutates.

Compiled to C with mypyc when `scripts/compile_core.py` has built it (the
set-up scripts and the container image do): its modules are then loaded from
`_compiled/`, but only while the sources they were built from are unchanged
and on the interpreter they were built for; otherwise, or with
GATEWAY_CORE=python, they run as Python, with the same decisions.
"""

import hashlib
import importlib.machinery
import json
import logging
import os
import sys
from pathlib import Path


def _compiled_build() -> Path | None:
    """The compiled build of this core, when it matches its sources."""
    if os.environ.get("GATEWAY_CORE", "").lower() == "python":
        return None
    here = Path(__file__).parent
    build = here / "_compiled"
    try:
        manifest = json.loads((build / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        manifest.get("cache_tag") != sys.implementation.cache_tag
        or manifest.get("extension_suffix") != importlib.machinery.EXTENSION_SUFFIXES[0]
    ):
        return None
    sources = manifest.get("sources")
    if not isinstance(sources, dict) or not sources:
        return None
    for name, digest in sources.items():
        try:
            current = hashlib.sha256((here / name).read_bytes()).hexdigest()
        except OSError:
            return None
        if current != digest:
            logging.getLogger(__name__).warning(
                "the compiled decision core was built from another %s: running it as Python"
                " (compile it again with scripts/compile_core.py)",
                name,
            )
            return None
    return build


_BUILD = _compiled_build()
if _BUILD is not None:
    # Its modules first on this package's path; mypyc's shared library of the
    # group is imported by its top-level name.
    __path__.insert(0, str(_BUILD / "gateway" / "core"))
    sys.path.append(str(_BUILD))
COMPILED = _BUILD is not None

# After the path is set: these load the compiled modules when there are any.
from gateway.core.decide import (  # noqa: E402
    ApplySettings,
    CommandDecision,
    Decision,
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    Hold,
    decide,
    decide_command,
    decide_message,
    expire_find_my_car,
    refused_result,
    state_from_snapshot,
    with_find_my_car,
)
from gateway.core.state import (  # noqa: E402
    FindMyCarCommand,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
)

__all__ = [
    "COMPILED",
    "ApplySettings",
    "CommandDecision",
    "Decision",
    "DecisionContext",
    "Drop",
    "DropReason",
    "FindMyCarCommand",
    "Forward",
    "Hold",
    "LocationAnchor",
    "LocationMode",
    "SettingsSnapshot",
    "VehicleState",
    "decide",
    "decide_command",
    "decide_message",
    "expire_find_my_car",
    "refused_result",
    "state_from_snapshot",
    "with_find_my_car",
]
