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
    refused_result,
    state_from_snapshot,
)
from gateway.core.state import CoarseFix, LocationMode, SettingsSnapshot, VehicleState

__all__ = [
    "ApplySettings",
    "CoarseFix",
    "CommandDecision",
    "Decision",
    "DecisionContext",
    "Drop",
    "DropReason",
    "Forward",
    "Hold",
    "LocationMode",
    "SettingsSnapshot",
    "VehicleState",
    "decide",
    "decide_command",
    "refused_result",
    "state_from_snapshot",
]
