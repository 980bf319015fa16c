"""Data types shared by the scenario, the fleet runtime, the recorder and the checker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf.message import Message

from telematics.v1 import common_pb2, privacy_pb2

LOCATION_MODE_NAMES: dict[int, str] = {
    common_pb2.LOCATION_MODE_UNSPECIFIED: "UNSPECIFIED",
    common_pb2.LOCATION_OFF: "OFF",
    common_pb2.LOCATION_APPROXIMATE: "APPROXIMATE",
    common_pb2.LOCATION_PRECISE: "PRECISE",
}
APP_IDS = ("music", "weather", "podcast")
CONTRACT_FEATURES = (
    "remote_control",
    "find_my_car",
    "charging",
    "energy_consumption",
    "digital_key",
)
CONSENT_FEATURES = ("online_navigation", "online_search", "voice_recognition")
ALL_FEATURES = (*CONTRACT_FEATURES, *CONSENT_FEATURES, *(f"third_party.{app}" for app in APP_IDS))


@dataclass(frozen=True)
class Settings:
    """One snapshot of a car's privacy screen."""

    revision: int
    privacy_mode: bool
    location: int  # common_pb2.LocationMode value
    features: dict[str, bool]

    def enabled(self, feature: str) -> bool:
        return self.features.get(feature, False)

    @property
    def location_name(self) -> str:
        return LOCATION_MODE_NAMES.get(self.location, str(self.location))

    def to_proto(self, vin: str, seq: int, timestamp_ms: int) -> privacy_pb2.PrivacySettings:
        message = privacy_pb2.PrivacySettings(
            revision=self.revision,
            privacy_mode=self.privacy_mode,
            location=cast(common_pb2.LocationMode, self.location),
        )
        message.header.vin = vin
        message.header.seq = seq
        message.header.timestamp_ms = timestamp_ms
        for name, enabled in sorted(self.features.items()):
            message.features[name] = enabled
        return message

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "privacy_mode": self.privacy_mode,
            "location": self.location,
            "features": dict(sorted(self.features.items())),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(
            revision=int(data["revision"]),
            privacy_mode=bool(data["privacy_mode"]),
            location=int(data["location"]),
            features={str(k): bool(v) for k, v in data["features"].items()},
        )


# What a scenario event is for; the checker derives expectations from it.
PURPOSE_TELEMETRY = "telemetry"
PURPOSE_STRAY_LOCATION = "stray_location"  # tbox/location nobody asked for
PURPOSE_FMC_RESPONSE = "fmc_response"  # tbox/location answering find_my_car
PURPOSE_MALFORMED = "malformed"  # undecodable payload: must never arrive
PURPOSE_SPOOFED = "spoofed"  # header.vin differs from the topic VIN: must never arrive
MUST_NOT_ARRIVE = frozenset({PURPOSE_MALFORMED, PURPOSE_SPOOFED})


@dataclass
class PublishEvent:
    t_ms: int
    unit: str  # "tbox" or "avn"
    stream: str  # "tbox/status", "avn/app/music", ...
    message: Message | None  # header is filled in at publish time
    purpose: str = PURPOSE_TELEMETRY
    raw_payload: bytes | None = None  # for malformed injections
    header_vin: str | None = None  # for spoofed injections
    nonce: str = ""  # app streams: what the checker matches on (never the VIN)
    # Store and forward (a tunnel, an underground car park): captured at this
    # time, buffered, uploaded at t_ms with its capture timestamp and revision.
    captured_ms: int | None = None


@dataclass
class SettingsEvent:
    t_ms: int
    settings: Settings
    # A settings flood: revisions sent back to back just before `settings`, without
    # waiting for their PrivacyApplied (only the last one is waited for).
    flood: tuple[Settings, ...] = ()


@dataclass
class CommandEvent:
    t_ms: int
    command: str
    request_id: str
    args: dict[str, str] = field(default_factory=dict)
    # find_my_car: what the TBOX answers with, if the command reaches it.
    response: Message | None = None


@dataclass
class MessageEvent:
    """The backend sends a message-centre message (alert, service advert) to the car."""

    t_ms: int
    category: str
    request_id: str


@dataclass
class OperatorEvent:
    """What a DPO does to the car through the gateway's control API."""

    t_ms: int
    action: str  # OWNERSHIP_CHANGE or OBJECTION
    feature: str = ""  # an objection: the legitimate-interest feature
    # An ownership change: the new owner's first settings, sent once it is done.
    new_settings: Settings | None = None


OWNERSHIP_CHANGE = "ownership_change"
OBJECTION = "objection"

ScenarioEvent = PublishEvent | SettingsEvent | CommandEvent | MessageEvent | OperatorEvent
