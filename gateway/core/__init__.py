"""The pure decision core: no I/O, no clock, no globals it mutates."""

from gateway.core.decide import (
    ApplySettings,
    CommandDecision,
    Decision,
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    decide,
    decide_command,
    refused_result,
    state_from_snapshot,
)
from gateway.core.state import LocationAnchor, LocationMode, SettingsSnapshot, VehicleState

__all__ = [
    "ApplySettings",
    "CommandDecision",
    "Decision",
    "DecisionContext",
    "Drop",
    "DropReason",
    "Forward",
    "LocationAnchor",
    "LocationMode",
    "SettingsSnapshot",
    "VehicleState",
    "decide",
    "decide_command",
    "refused_result",
    "state_from_snapshot",
]
