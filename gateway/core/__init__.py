"""The pure decision core: no I/O, no clock, no globals it mutates.

Compiled to C when it has been built (see gateway.compiled); otherwise, or
with GATEWAY_NATIVE=python, it runs as Python, with the same decisions.
"""

from gateway.compiled import prefer_compiled

COMPILED = prefer_compiled(__name__, __path__)

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
