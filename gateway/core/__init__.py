"""The pure decision core: no I/O, no clock, no globals it mutates."""

from gateway.core.decide import (
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
from gateway.core.state import (
    FindMyCarCommand,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
)

__all__ = [
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
