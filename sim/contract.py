"""What the wire contract says must happen to each message and command.

Shared by the checker (judging a recording) and the fleet's live display
(predicting drops while the run is going).
"""

from __future__ import annotations

from sim.model import Settings
from sim.policy import Policy
from telematics.v1 import common_pb2

PASS = "pass"
AMBIGUOUS = "ambiguous"
ACCEPT = "accept"
LOCATION_ON = frozenset({common_pb2.LOCATION_APPROXIMATE, common_pb2.LOCATION_PRECISE})


def decide_message(
    policy: Policy, stream: str, settings: Settings | None, window_open: bool | None
) -> str:
    """PASS, AMBIGUOUS (window edge) or the reason the gateway must drop the message.

    `window_open` is whether a find-my-car window was open when the message was
    published; None when it was too close to a window boundary to tell.
    """
    rule = policy.rule_for(stream)
    if rule is None:
        return "unknown_stream"
    if policy.is_legal_obligation(stream):
        return PASS
    if settings is None:
        return "unknown_vehicle"
    if settings.privacy_mode:
        return "privacy_mode"
    if not settings.enabled(policy.feature_for(stream)):
        return "feature_off"
    if rule.location_purpose and settings.location not in LOCATION_ON:
        return "location_off"
    if rule.requires_window:
        if window_open is None:
            return AMBIGUOUS
        if not window_open:
            return "outside_window"
    return PASS


def decide_command(policy: Policy, command: str, settings: Settings | None) -> str:
    """ACCEPT or the reason the gateway must refuse the command."""
    feature = policy.commands.get(command)
    if feature is None:
        return "unknown_command"
    if settings is None:
        return "unknown_vehicle"
    if settings.privacy_mode:
        return "privacy_mode"
    if not settings.enabled(feature):
        return "feature_off"
    return ACCEPT
