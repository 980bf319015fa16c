"""Contract rules 13 and 14 on the pure decision core: one location anchor per
car on the gateway's clock, and no track from side fields.

Every message here carries car timestamps chosen by an adversary; only the
gateway's `now` may move the coarse value.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf.message import Message

from gateway.core import (
    DecisionContext,
    Forward,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    decide,
    state_from_snapshot,
)
from gateway.core.transforms import coarsen_position, destination_offset, grid_offset
from gateway.policy import parse_policy
from telematics.v1 import common_pb2, streams_pb2

ROOT = Path(__file__).resolve().parents[1]
# The location mechanics are tested on every GeoPoint role; the default policy
# removes trip start and end (energy statistics carry no location, notice
# L522-530), so these tests put them back as a place and a position.
DEFAULT_POLICY_TEXT = (ROOT / "config" / "policy.yaml").read_text()
POLICY = parse_policy(
    DEFAULT_POLICY_TEXT.replace(
        "      start: remove\n      end: remove\n", "      start: place\n      end: position\n"
    ),
    source="default policy, trip start and end located",
)
KEY = bytes(range(32))
CTX = DecisionContext(POLICY, KEY)
VIN = "WVWZZZ1JZXW000001"
NOW = 1_800_000_000.0
TS_MS = 1_800_000_000_000
INTERVAL_S = POLICY.refresh_interval_ms / 1000
CELL = POLICY.cell_size_m
FEATURES = {
    "remote_control": True,
    "charging": True,
    "energy_consumption": True,
    "online_navigation": True,
    "online_search": True,
}
HOME = (48.137154, 11.576124)
AWAY = (48.227154, 11.676124)  # about 12 km from HOME


def _geo(lat: float, lon: float) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(
        latitude=lat,
        longitude=lon,
        altitude_m=512.5,
        heading_deg=93.0,
        speed_kmh=47.5,
        horizontal_accuracy_m=3.5,
    )


def _coarse(point: tuple[float, float]) -> tuple[float, float]:
    return coarsen_position(point[0], point[1], CELL, grid_offset(KEY, VIN))


def status(at: tuple[float, float], ts_ms: int, odometer: float = 12_345.6) -> Message:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0, odometer_km=odometer)
    msg.position.CopyFrom(_geo(*at))
    msg.header.timestamp_ms = ts_ms
    return msg


def nav(at: tuple[float, float] | None, ts_ms: int, dest: tuple[float, float]) -> Message:
    msg = streams_pb2.NavRequest(route_id="r")
    if at is not None:
        msg.position.CopyFrom(_geo(*at))
    msg.destination.CopyFrom(_geo(*dest))
    msg.header.timestamp_ms = ts_ms
    return msg


def trip(
    start: tuple[float, float], end: tuple[float, float], ts_ms: int, odometer: float = 12_400.0
) -> Message:
    msg = streams_pb2.Trip(
        trip_id="t",
        distance_km=12.3,
        energy_kwh=2.26,
        average_speed_kmh=47.0,
        duration_s=1234,
        odometer_km=odometer,
    )
    msg.start.CopyFrom(_geo(*start))
    msg.end.CopyFrom(_geo(*end))
    msg.header.timestamp_ms = ts_ms
    return msg


def battery(at: tuple[float, float], ts_ms: int) -> Message:
    msg = streams_pb2.BatteryStatus(state_of_charge_pct=60.0, charging=True, evse_id="DE*X*1")
    msg.charging_location.CopyFrom(_geo(*at))
    msg.header.timestamp_ms = ts_ms
    return msg


@dataclass
class Car:
    """Feeds `decide` the way the service does: anchors carried between messages."""

    mode: LocationMode = LocationMode.APPROXIMATE
    anchors: dict[str, LocationAnchor] = field(default_factory=dict)
    seq: int = 0

    def send(self, stream: str, msg: Message, now: float) -> Message:
        self.seq += 1
        msg.header.vin = VIN  # type: ignore[attr-defined]
        msg.header.seq = self.seq  # type: ignore[attr-defined]
        snapshot = SettingsSnapshot(VIN, 1, False, self.mode, FEATURES, NOW, POLICY.version)
        states = {VIN: state_from_snapshot(POLICY, snapshot)}
        decision = decide(
            CTX, f"vehicle/{VIN}/{stream}", msg.SerializeToString(), states, self.anchors, now
        )
        assert isinstance(decision, Forward), decision
        if decision.anchor is not None:
            self.anchors[VIN] = decision.anchor
        out = type(msg)()
        out.ParseFromString(decision.payload)
        return out


def latlon(point: common_pb2.GeoPoint) -> tuple[float, float]:
    return point.latitude, point.longitude


# ------------------------------------------------ rule 13: the gateway's clock


@pytest.mark.parametrize(
    ("first_ts", "second_ts"),
    [
        (TS_MS, TS_MS - 86_400_000),  # buffered old record
        (TS_MS, TS_MS + 86_400_000),  # clock in the future
        (TS_MS - 3_600_000, 0),  # missing timestamp
        (0, TS_MS + 3_600_000),  # missing, then a late clock
    ],
    ids=["old", "future", "missing", "missing-first"],
)
def test_no_car_timestamp_refreshes_sooner(first_ts: int, second_ts: int) -> None:
    car = Car()
    first = car.send("tbox/status", status(HOME, first_ts), NOW)
    second = car.send("tbox/status", status(AWAY, second_ts), NOW + 30)
    assert latlon(first.position) == latlon(second.position) == _coarse(HOME)  # type: ignore[attr-defined]


def test_tbox_and_avn_clocks_minutes_apart_share_one_anchor() -> None:
    car = Car()
    tbox_clock, avn_clock = TS_MS, TS_MS + 17 * 60_000  # the AVN runs 17 minutes ahead
    a = car.send("tbox/status", status(HOME, tbox_clock), NOW)
    b = car.send("avn/nav", nav(AWAY, avn_clock, dest=AWAY), NOW + 10)
    c = car.send("tbox/status", status(AWAY, tbox_clock + 20_000), NOW + 20)
    d = car.send(
        "avn/search",
        streams_pb2.SearchQuery(
            text="pharmacy",
            position=_geo(*AWAY),
            header=common_pb2.Header(timestamp_ms=avn_clock - 40 * 60_000),
        ),
        NOW + 30,
    )
    values = {latlon(m.position) for m in (a, b, c, d)}  # type: ignore[attr-defined]
    assert values == {_coarse(HOME)}


def test_refresh_at_most_once_per_interval_across_streams() -> None:
    rng = random.Random(7)
    car = Car()
    published: list[tuple[float, tuple[float, float]]] = []
    lat, lon = HOME
    for step in range(600):  # 10 hours, a message a minute, the car always moving
        now = NOW + 60 * step
        lat, lon = lat + 0.003, lon + 0.002
        ts = rng.choice([0, TS_MS + rng.randint(-(10**9), 10**9), int(now * 1000)])
        stream = rng.choice(["tbox/status", "avn/nav", "tbox/battery", "tbox/trip"])
        if stream == "tbox/status":
            out = car.send(stream, status((lat, lon), ts), now)
            points = [out.position]  # type: ignore[attr-defined]
        elif stream == "avn/nav":
            out = car.send(stream, nav((lat, lon), ts, dest=(lat + 0.5, lon)), now)
            points = [out.position]  # type: ignore[attr-defined]
        elif stream == "tbox/battery":
            out = car.send(stream, battery((lat, lon), ts), now)
            points = [out.charging_location]  # type: ignore[attr-defined]
        else:
            out = car.send(stream, trip((lat - 0.1, lon), (lat, lon), ts), now)
            points = [out.start, out.end]  # type: ignore[attr-defined]
        published += [(now, latlon(p)) for p in points]
    changes = [t for (t, v), (_, prev) in zip(published[1:], published, strict=False) if v != prev]
    assert len(changes) >= 30  # it does follow the car
    assert all(b - a >= INTERVAL_S for a, b in itertools.pairwise(changes))


def test_gateway_clock_going_back_does_not_refresh() -> None:
    car = Car(anchors={VIN: LocationAnchor(NOW, *_coarse(HOME))})
    # A car clock far ahead changes nothing either.
    out = car.send("tbox/status", status(AWAY, TS_MS + 10**9), NOW - 10 * INTERVAL_S)
    assert latlon(out.position) == _coarse(HOME)  # type: ignore[attr-defined]


def test_place_fields_move_the_anchor() -> None:
    car = Car(anchors={VIN: LocationAnchor(NOW, *_coarse(HOME))})
    # Within the interval, a trip report shows the anchor for both ends.
    out = car.send("tbox/trip", trip(HOME, AWAY, TS_MS), NOW + 60)
    assert latlon(out.start) == latlon(out.end) == _coarse(HOME)  # type: ignore[attr-defined]
    for point in (out.start, out.end):  # type: ignore[attr-defined]
        assert point.speed_kmh == 0 and point.heading_deg == 0 and point.altitude_m == 0
        assert point.horizontal_accuracy_m == CELL
    # After it, the trip end (where the car is) refreshes the anchor; the start
    # (where it was) shows the anchor that held before.
    out = car.send("tbox/trip", trip(HOME, AWAY, TS_MS), NOW + INTERVAL_S)
    assert latlon(out.end) == _coarse(AWAY)  # type: ignore[attr-defined]
    assert latlon(out.start) == _coarse(HOME)  # type: ignore[attr-defined]
    assert car.anchors[VIN].refreshed_at == NOW + INTERVAL_S
    # The status that follows shows the trip end's value, not a fresher one.
    later = car.send("tbox/status", status(HOME, TS_MS), NOW + INTERVAL_S + 60)
    assert latlon(later.position) == _coarse(AWAY)  # type: ignore[attr-defined]
    # A charging location counts as a refresh too.
    out = car.send("tbox/battery", battery(HOME, TS_MS), NOW + 2 * INTERVAL_S)
    assert latlon(out.charging_location) == _coarse(HOME)  # type: ignore[attr-defined]
    assert car.anchors[VIN].refreshed_at == NOW + 2 * INTERVAL_S


def test_destination_is_coarsened_without_moving_the_anchor() -> None:
    far = (52.52, 13.405)
    car = Car(anchors={VIN: LocationAnchor(NOW - 10 * INTERVAL_S, *_coarse(HOME))})
    # Interval over, but the request has no position: only a destination.
    out = car.send("avn/nav", nav(None, TS_MS, dest=far), NOW)
    expected = coarsen_position(far[0], far[1], CELL, destination_offset(KEY, VIN))
    assert latlon(out.destination) == expected  # type: ignore[attr-defined]
    assert out.destination.speed_kmh == 0  # type: ignore[attr-defined]
    assert car.anchors[VIN].refreshed_at == NOW - 10 * INTERVAL_S
    # With a position, the position anchors; the destination never does.
    out = car.send("avn/nav", nav(AWAY, TS_MS, dest=far), NOW + 1)
    assert car.anchors[VIN] == LocationAnchor(NOW + 1, *_coarse(AWAY))


def test_destinations_do_not_reveal_the_position_shift() -> None:
    """A backend that knows a destination exactly (it answered the search) gets
    an (exact, coarse) pair per request: on the position shift, enough pairs
    would pin the shift that hides where the car parks. Destinations use a shift
    of their own, so a destination at the parking spot itself is published on
    another grid point for most cars."""
    differ = 0
    for n in range(100):
        vin = f"WVWZZZ1JZ3W{n:06d}"
        dest = coarsen_position(*HOME, CELL, destination_offset(KEY, vin))
        parked = coarsen_position(*HOME, CELL, grid_offset(KEY, vin))
        differ += dest != parked
    assert differ > 25  # independent shifts: about half; the position shift: none


def test_parked_car_always_yields_the_same_value() -> None:
    car = Car()
    values = set()
    for hour in range(48):
        out = car.send("tbox/status", status(HOME, TS_MS + hour), NOW + 3600 * hour)
        values.add(latlon(out.position))  # type: ignore[attr-defined]
    assert values == {_coarse(HOME)}


# ------------------------------------------------- rule 14: side fields


def test_odometer_constant_between_refreshes() -> None:
    car = Car()
    seen: list[tuple[float, float, tuple[float, float]]] = []
    lat, lon = HOME
    for minute in range(120):
        lat += 0.002
        out = car.send(
            "tbox/status",
            status((lat, lon), TS_MS, odometer=10_000 + minute * 0.9),
            NOW + 60 * minute,
        )
        seen.append((NOW + 60 * minute, out.odometer_km, latlon(out.position)))  # type: ignore[attr-defined]
    for (_, odo_a, pos_a), (_, odo_b, pos_b) in itertools.pairwise(seen):
        assert (odo_a == odo_b) == (pos_a == pos_b)  # steps only with the coarse value
    assert {odo for _, odo, _ in seen} == {10_000 + m * 0.9 for m in range(0, 120, 15)}
    # A trip report within the interval shows the anchored reading, too.
    out = car.send(
        "tbox/trip", trip(HOME, (lat, lon), TS_MS, odometer=10_200.0), NOW + 60 * 119 + 30
    )
    assert out.odometer_km == seen[-1][1]  # type: ignore[attr-defined]


def test_odometer_without_an_anchor_is_removed() -> None:
    msg = status(HOME, TS_MS)
    msg.position.latitude = math.nan  # type: ignore[attr-defined]
    out = Car().send("tbox/status", msg, NOW)
    assert out.odometer_km == 0 and not out.HasField("position")  # type: ignore[attr-defined]


def test_trip_values_on_the_step_grid() -> None:
    out = Car().send("tbox/trip", trip(HOME, AWAY, TS_MS), NOW)
    assert out.distance_km == 10.0  # type: ignore[attr-defined]
    assert out.energy_kwh == 2.0  # type: ignore[attr-defined]
    assert out.average_speed_kmh == 50.0  # type: ignore[attr-defined]
    assert out.duration_s == 1200  # type: ignore[attr-defined]
    assert out.trip_id == "t"  # type: ignore[attr-defined]


def test_side_fields_removed_when_location_off() -> None:
    car = Car(mode=LocationMode.OFF)
    out = car.send("tbox/trip", trip(HOME, AWAY, TS_MS), NOW)
    for name in ("odometer_km", "distance_km", "energy_kwh", "average_speed_kmh", "duration_s"):
        assert getattr(out, name) == 0, name
    assert out.trip_id == "t"  # type: ignore[attr-defined]
    assert car.send("tbox/status", status(HOME, TS_MS), NOW).odometer_km == 0  # type: ignore[attr-defined]
    search = streams_pb2.SearchQuery(text="Hauptstrasse 5", category="address")
    out = car.send("avn/search", search, NOW)
    assert out.text == "" and out.category == "address"  # type: ignore[attr-defined]


def test_side_fields_kept_when_precise() -> None:
    out = Car(mode=LocationMode.PRECISE).send("tbox/trip", trip(HOME, AWAY, TS_MS), NOW)
    assert out.distance_km == 12.3 and out.duration_s == 1234  # type: ignore[attr-defined]
    assert out.odometer_km == 12_400.0  # type: ignore[attr-defined]


def test_search_text_cleared_when_approximate() -> None:
    """Typed text can hold an address or coordinates and has no coarse form."""
    search = streams_pb2.SearchQuery(text="52.516275, 13.377704", position=_geo(*HOME))
    out = Car().send("avn/search", search, NOW)
    assert out.text == ""  # type: ignore[attr-defined]
    assert latlon(out.position) == _coarse(HOME)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", list(LocationMode))
@pytest.mark.parametrize(
    ("detail", "kept"),
    [
        ("engine started", True),
        ("speed 87 km/h", False),
        ("parked at 48.137154,11.576124", False),
        ("Hauptstrasse 5, Munich", False),
    ],
)
def test_alarm_detail_only_as_a_listed_value(mode: LocationMode, detail: str, kept: bool) -> None:
    msg = streams_pb2.Alarm(type=streams_pb2.ALARM_SECURITY, detail=detail)
    msg.header.timestamp_ms = TS_MS
    out = Car(mode=mode).send("tbox/alarm", msg, NOW)
    assert out.detail == (detail if kept else "")  # type: ignore[attr-defined]
    assert out.type == streams_pb2.ALARM_SECURITY  # type: ignore[attr-defined]


def test_no_motion_in_any_geopoint_under_approximate() -> None:
    car = Car()
    for stream, msg in [
        ("tbox/status", status(HOME, TS_MS)),
        ("tbox/trip", trip(HOME, AWAY, TS_MS)),
        ("tbox/battery", battery(AWAY, TS_MS)),
        ("avn/nav", nav(AWAY, TS_MS, dest=HOME)),
    ]:
        for now in (NOW, NOW + 5, NOW + INTERVAL_S + 5):
            out = car.send(stream, msg, now)
            for fd in out.DESCRIPTOR.fields:
                if fd.message_type is None or fd.message_type.name != "GeoPoint":
                    continue
                if fd.name and out.HasField(fd.name):
                    point = getattr(out, fd.name)
                    assert (point.speed_kmh, point.heading_deg, point.altitude_m) == (0, 0, 0)
