"""Per-vehicle privacy state as the decision core sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from telematics.v1 import common_pb2

# ISO 3779: 17 characters, no I, O or Q.
_VIN_CHARS = "[A-HJ-NPR-Z0-9]{17}"
# \A..\Z, not ^..$: Python's `$` also matches before a trailing newline.
VIN_PATTERN: Final = re.compile(rf"\A{_VIN_CHARS}\Z")
# The same for JSON Schema / OpenAPI, whose ECMA-262 `$` is the end of input
# (and which has no \Z).
VIN_SCHEMA_PATTERN = f"^{_VIN_CHARS}$"


def is_valid_vin(vin: str) -> bool:
    return VIN_PATTERN.fullmatch(vin) is not None


class LocationMode(IntEnum):
    UNSPECIFIED = common_pb2.LOCATION_MODE_UNSPECIFIED
    OFF = common_pb2.LOCATION_OFF
    APPROXIMATE = common_pb2.LOCATION_APPROXIMATE
    PRECISE = common_pb2.LOCATION_PRECISE

    @property
    def effective(self) -> LocationMode:
        """UNSPECIFIED (or anything unknown) is enforced as OFF: fail closed."""
        # A dictionary lookup: the comparison of enum members costs ten times as much.
        return EFFECTIVE_MODES.get(self, LocationMode.OFF)

    @classmethod
    def parse(cls, value: int | str) -> LocationMode:
        if isinstance(value, str):
            name = value.strip().upper().removeprefix("LOCATION_")
            if name == "MODE_UNSPECIFIED":
                name = "UNSPECIFIED"
            return cls[name]
        # Dictionary lookup: Enum's call protocol is slow, and restart parses a million.
        return _MODES_BY_VALUE.get(value, cls.UNSPECIFIED)


_MODES_BY_VALUE: dict[int, LocationMode] = {int(m): m for m in LocationMode}
EFFECTIVE_MODES: Final = {m: m for m in (LocationMode.APPROXIMATE, LocationMode.PRECISE)}


@dataclass(frozen=True, slots=True)
class SettingsSnapshot:
    """A PrivacySettings snapshot as applied (what the store persists)."""

    vin: str
    revision: int
    privacy_mode: bool
    location: LocationMode
    features: dict[str, bool] = field(hash=False)
    applied_at: float  # gateway wall clock, epoch seconds
    policy_version: str
    source: str = "vehicle"


_STRICTNESS: Final = {  # lower is stricter; anything unknown is enforced as OFF
    LocationMode.OFF: 0,
    LocationMode.UNSPECIFIED: 0,
    LocationMode.APPROXIMATE: 1,
    LocationMode.PRECISE: 2,
}


def strictest(older: SettingsSnapshot, newer: SettingsSnapshot) -> SettingsSnapshot:
    """One snapshot allowing only what both allowed (privacy mode if either,
    the coarser location, a feature only if on in both), named after `newer`.

    Compacting settings history with it keeps every later check conservative:
    nothing is ever taken as allowed that one of the merged snapshots refused.
    """
    location = min(older.location, newer.location, key=_STRICTNESS.__getitem__)
    features = {
        name: older.features.get(name, False) and newer.features.get(name, False)
        for name in older.features.keys() | newer.features.keys()
    }
    return SettingsSnapshot(
        vin=newer.vin,
        revision=newer.revision,
        privacy_mode=older.privacy_mode or newer.privacy_mode,
        location=location if location is not LocationMode.UNSPECIFIED else LocationMode.OFF,
        features=features,
        applied_at=older.applied_at,
        policy_version=newer.policy_version,
        source=newer.source,
    )


@dataclass(frozen=True, slots=True)
class FindMyCarCommand:
    """An accepted find-my-car command of one car (contract rule 17).

    Kept for an hour after acceptance (the commands-per-hour cap counts it)
    and durable, so a restart neither resets the cap nor re-opens spent fixes.
    """

    request_id: str
    accepted_at: float  # gateway clock, epoch seconds
    until: float  # end of its window (exclusive)
    fixes: int = 0  # fixes forwarded as answers to it


@dataclass(frozen=True, slots=True)
class VehicleState:
    """What the hot path needs to decide a message of one vehicle.

    `enabled` holds only feature ids the active policy knows, interned, so a
    million vehicles share the same few strings.
    """

    revision: int
    privacy_mode: bool
    location: LocationMode
    enabled: frozenset[str]
    window_until: float = 0.0  # find-my-car window end, gateway epoch seconds
    restricted: bool = False  # GDPR Art. 18: only legal-obligation streams, whatever the car says
    # Find-my-car commands of the last hour, oldest first; empty (and the state
    # shared with other cars) for the cars that did not send one.
    # `window_until` is then the end of the latest of their windows.
    find_my_car: tuple[FindMyCarCommand, ...] = ()
    # Features objected to (Art. 21, legitimate-interest features): off
    # whatever the car's toggles say; kept across settings changes.
    objected: frozenset[str] = frozenset()
    # The policy version the car's consent was given under (what it covers).
    consent_version: str = ""

    def window_open(self, now: float) -> bool:
        return now < self.window_until


@dataclass(frozen=True, slots=True)
class LocationAnchor:
    """The one coarse location of a vehicle the backend may learn per refresh
    interval (contract rule 13), and the side values frozen with it (rule 14).

    Set when an approximate value refreshes; shared by every unit and stream of
    the vehicle and by every field that says where the car is or was. Only the
    gateway's clock moves it: `refreshed_at` is gateway epoch seconds, never a
    car timestamp, so no old, future, missing or disagreeing car clock can make
    the value refresh sooner. `odometer_km` is the odometer reading of the
    message that refreshed it (None when that message had none and no earlier
    anchor did): odometer fields publish it, so their steps coincide with the
    coarse value's and time no grid crossing.
    """

    refreshed_at: float
    latitude: float
    longitude: float
    odometer_km: float | None = None

    def due(self, now: float, interval_s: float) -> bool:
        """Whether a new coarse value may be published at gateway time `now`.

        A gateway clock that went back (now < refreshed_at) is not a reason to
        refresh early: the anchor holds until the clock passes it again.
        """
        return now - self.refreshed_at >= interval_s
