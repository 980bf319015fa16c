"""The pure decision core against the wire contract's "Decisions" list.

Every test runs `decide` / `decide_command` with the shipped default policy;
no broker, no clock (time is passed in).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import re
from pathlib import Path

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import (
    ApplySettings,
    CommandDecision,
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
    decide,
    decide_command,
    state_from_snapshot,
)
from gateway.core.decide import applied_message, kept_features, split_vehicle_topic
from gateway.core.identity import pseudonymize_vehicle_field
from gateway.core.transforms import (
    coarse_cell_degrees,
    coarsen_position,
    grid_offset,
    normalize_mac,
    pseudonym,
    pseudonymize_field,
)
from gateway.policy import load_policy, parse_policy
from telematics.v1 import command_pb2, common_pb2, privacy_pb2, streams_pb2

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
OTHER_VIN = "WVWZZZ1JZXW000002"
NOW = 1_800_000_000.0
TS_MS = 1_800_000_000_000
HEX32 = re.compile(r"^[0-9a-f]{32}$")

# Relative topic -> (feature id that enables it, message class)
STREAMS: dict[str, tuple[str, type[Message]]] = {
    "tbox/status": ("remote_control", streams_pb2.VehicleStatus),
    "tbox/alarm": ("remote_control", streams_pb2.Alarm),
    "tbox/location": ("find_my_car", streams_pb2.Location),
    "tbox/battery": ("charging", streams_pb2.BatteryStatus),
    "tbox/trip": ("energy_consumption", streams_pb2.Trip),
    "tbox/digital_key": ("digital_key", streams_pb2.DigitalKeyEvent),
    "tbox/connectivity": ("remote_control", streams_pb2.Connectivity),
    "tbox/ecall": ("ecall", streams_pb2.ECall),
    "avn/nav": ("online_navigation", streams_pb2.NavRequest),
    "avn/search": ("online_search", streams_pb2.SearchQuery),
    "avn/voice": ("voice_recognition", streams_pb2.VoiceChunk),
    "avn/app/music": ("third_party.music", streams_pb2.AppTraffic),
}
CONSENT_STREAMS = [s for s in STREAMS if s != "tbox/ecall"]
LOCATION_PURPOSE = {"tbox/location", "avn/nav"}
ALL_FEATURES = {feature: True for feature, _ in STREAMS.values()}
COMMANDS = ["find_my_car", "lock", "unlock", "climate", "horn_lights"]


def _geo(lat: float, lon: float) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(
        latitude=lat,
        longitude=lon,
        altitude_m=512.5,
        heading_deg=93.0,
        speed_kmh=47.5,
        horizontal_accuracy_m=3.5,
    )


def geo_fields(cls: type[Message]) -> list[str]:
    return [
        f.name
        for f in cls.DESCRIPTOR.fields
        if f.message_type is not None and f.message_type.full_name == "telematics.v1.GeoPoint"
    ]


def sample(stream: str, vin: str = VIN, ts_ms: int = TS_MS, seq: int = 1) -> Message:
    """A fully populated message of the stream, every GeoPoint set to a distinct place."""
    app_stream = stream.removeprefix("avn/app/") if stream.startswith("avn/app/") else None
    if app_stream is not None:
        stream = "avn/app/music"  # every app stream carries AppTraffic
    _, cls = STREAMS[stream]
    msg = cls()
    msg.header.vin = vin  # type: ignore[attr-defined]
    msg.header.seq = seq  # type: ignore[attr-defined]
    msg.header.timestamp_ms = ts_ms  # type: ignore[attr-defined]
    for i, name in enumerate(geo_fields(cls)):
        point = _geo(48.137154 + 0.05 * i, 11.576124 + 0.07 * i)
        fd = cls.DESCRIPTOR.fields_by_name[name]
        if fd.is_repeated:
            getattr(msg, name).extend([point, _geo(48.2, 11.6), _geo(48.3, 11.7)])
        else:
            getattr(msg, name).CopyFrom(point)
    extra: dict[str, dict[str, object]] = {
        "tbox/status": {"fuel_level_pct": 55.0, "doors_locked": True, "odometer_km": 12345.6},
        "tbox/alarm": {"type": streams_pb2.ALARM_SECURITY, "detail": "glass break"},
        "tbox/battery": {"state_of_charge_pct": 80.0, "charging": True, "evse_id": "DE*ABC*E123"},
        "tbox/trip": {"trip_id": "t-1", "distance_km": 12.5, "energy_kwh": 2.25},
        "tbox/digital_key": {"key_id": "k-1", "bluetooth_mac": "aa-bb-cc-dd-ee-ff"},
        "tbox/connectivity": {
            "ip_address": "10.20.30.40",
            "iccid": "8949020000000000001",
            "imsi": "262011234567890",
            "network_type": "LTE",
        },
        "tbox/ecall": {"trigger": streams_pb2.ECALL_AUTOMATIC, "passengers": 2},
        "avn/nav": {"route_id": "r-1", "traffic_requested": True},
        "avn/search": {"text": "pharmacy near me", "category": "health"},
        "avn/voice": {"session_id": "voice-session-42", "chunk_index": 3, "audio": b"\x01\x02"},
        "avn/app/music": {"app_id": "music", "content_type": "audio/ogg", "payload": b"song"},
    }
    for name, value in extra.get(stream, {}).items():
        setattr(msg, name, value)
    if app_stream is not None:
        msg.app_id = app_stream  # type: ignore[attr-defined]
    return msg


def state(
    features: dict[str, bool] | None = None,
    location: LocationMode = LocationMode.PRECISE,
    privacy_mode: bool = False,
    window_until: float = 0.0,
    revision: int = 1,
) -> VehicleState:
    snapshot = SettingsSnapshot(
        vin=VIN,
        revision=revision,
        privacy_mode=privacy_mode,
        location=location,
        features=dict(ALL_FEATURES if features is None else features),
        applied_at=NOW,
        policy_version=POLICY.version,
    )
    return state_from_snapshot(POLICY, snapshot, window_until)


def run(
    stream: str,
    st: VehicleState | None,
    msg: Message | None = None,
    *,
    anchors: dict[str, LocationAnchor] | None = None,
    now: float = NOW,
    vin: str = VIN,
) -> Forward | Drop | ApplySettings:
    payload = (msg if msg is not None else sample(stream, vin)).SerializeToString()
    states = {vin: st} if st is not None else {}
    return decide(CTX, f"vehicle/{vin}/{stream}", payload, states, anchors or {}, now)


def open_window() -> float:
    return NOW + 60.0


def forwarded(decision: object) -> Forward:
    assert isinstance(decision, Forward), decision
    return decision


def dropped(decision: object, reason: DropReason) -> Drop:
    assert isinstance(decision, Drop), decision
    assert decision.reason is reason, decision
    return decision


def settings_payload(
    revision: int,
    features: dict[str, bool] | None = None,
    location: int = common_pb2.LOCATION_PRECISE,
    privacy_mode: bool = False,
    vin: str = VIN,
) -> bytes:
    msg = privacy_pb2.PrivacySettings(
        revision=revision,
        privacy_mode=privacy_mode,
        location=location,  # type: ignore[arg-type]
        features=ALL_FEATURES if features is None else features,
    )
    msg.header.vin = vin
    msg.header.timestamp_ms = TS_MS
    return msg.SerializeToString()


def apply(
    payload: bytes, current: VehicleState | None = None, vin: str = VIN
) -> Forward | Drop | ApplySettings:
    states = {vin: current} if current is not None else {}
    return decide(CTX, f"vehicle/{vin}/avn/privacy", payload, states, {}, NOW)


def command(
    name: str,
    st: VehicleState | None,
    *,
    payload: bytes | None = None,
    vin: str = VIN,
    now: float = NOW,
) -> CommandDecision:
    if payload is None:
        payload = command_pb2.Command(
            request_id="req-1", command=name, issued_at_ms=TS_MS
        ).SerializeToString()
    states = {vin: st} if st is not None else {}
    decision = decide_command(CTX, f"tsp/{vin}/cmd/{name}", payload, states, now)
    assert decision is not None
    return decision


def window_for(stream: str) -> float:
    return open_window() if stream == "tbox/location" else 0.0


# ------------------------------------------------------------------ sanity


def test_stream_table_matches_default_policy() -> None:
    keys = set(POLICY.exact_routes) | {r.stream.key for r in POLICY.template_routes}
    assert keys == {s if s != "avn/app/music" else "avn/app/{app_id}" for s in STREAMS}


# ------------------------------------------------- (1) unknown vehicle


@pytest.mark.parametrize("stream", CONSENT_STREAMS)
def test_unknown_vehicle_drops_every_consent_stream(stream: str) -> None:
    d = dropped(run(stream, None), DropReason.UNKNOWN_VEHICLE)
    assert d.vin == VIN
    assert d.stream == POLICY.route(stream)[0].key  # type: ignore[index]


def test_unknown_vehicle_ecall_forwarded_byte_identical() -> None:
    msg = sample("tbox/ecall")
    payload = msg.SerializeToString()
    fwd = forwarded(decide(CTX, f"vehicle/{VIN}/tbox/ecall", payload, {}, {}, NOW))
    assert fwd.payload == payload
    assert fwd.topic == f"tsp/{VIN}/tbox/ecall"
    assert fwd.transforms == ()


# ----------------------------------------------------- (2) privacy mode


@pytest.mark.parametrize("stream", CONSENT_STREAMS)
def test_privacy_mode_drops_everything_but_ecall(stream: str) -> None:
    st = state(privacy_mode=True, window_until=open_window())
    dropped(run(stream, st), DropReason.PRIVACY_MODE)


def test_privacy_mode_still_forwards_ecall() -> None:
    msg = sample("tbox/ecall")
    fwd = forwarded(run("tbox/ecall", state(privacy_mode=True), msg))
    assert fwd.payload == msg.SerializeToString()


@pytest.mark.parametrize("name", COMMANDS)
def test_privacy_mode_refuses_commands(name: str) -> None:
    d = command(name, state(privacy_mode=True))
    assert not d.accepted
    assert d.reason == "privacy_mode"
    assert d.forward_topic is None and d.forward_payload is None and d.state is None


# ------------------------------------------------------ (3) feature off


@pytest.mark.parametrize("stream", CONSENT_STREAMS)
def test_feature_off_drops_stream(stream: str) -> None:
    feature = STREAMS[stream][0]
    st = state({**ALL_FEATURES, feature: False}, window_until=window_for(stream))
    d = dropped(run(stream, st), DropReason.FEATURE_DISABLED)
    assert d.detail == feature
    # ...and the same stream passes with only that feature switched on.
    forwarded(run(stream, state({feature: True}, window_until=window_for(stream))))


def test_feature_missing_from_snapshot_is_off() -> None:
    dropped(run("tbox/status", state({})), DropReason.FEATURE_DISABLED)


def test_ecall_cannot_be_switched_off() -> None:
    st = state({feature: False for feature in ALL_FEATURES}, location=LocationMode.OFF)
    msg = sample("tbox/ecall")
    assert forwarded(run("tbox/ecall", st, msg)).payload == msg.SerializeToString()


# ---------------------------------------------------- (4) location modes

GEO_CASES = [
    (stream, name) for stream in CONSENT_STREAMS for name in geo_fields(STREAMS[stream][1])
]


@pytest.mark.parametrize("mode", list(LocationMode))
def test_default_policy_sends_no_trip_location(mode: LocationMode) -> None:
    """Energy statistics (mileage, consumption, speed, time) list no location
    data in the notice (L522-530): the default policy removes trip start and
    end under every location mode."""
    default = load_policy(ROOT / "config" / "policy.yaml")
    st = state({"energy_consumption": True}, location=mode)
    msg = sample("tbox/trip")
    msg.start.latitude, msg.start.longitude = 48.1, 11.5
    msg.end.latitude, msg.end.longitude = 48.2, 11.6
    ctx = DecisionContext(default, KEY)
    out = streams_pb2.Trip.FromString(
        forwarded(
            decide(ctx, f"vehicle/{VIN}/tbox/trip", msg.SerializeToString(), {VIN: st}, {}, NOW)
        ).payload
    )
    assert not out.HasField("start") and not out.HasField("end")
    assert out.trip_id == "t-1"  # the statistics themselves pass


def test_an_objected_feature_is_dropped_whatever_the_toggle_says() -> None:
    st = dataclasses.replace(state(), objected=frozenset({"remote_control"}))
    dropped = run("tbox/status", st)
    assert isinstance(dropped, Drop) and dropped.reason is DropReason.OBJECTED
    assert isinstance(run("tbox/status", state()), Forward)


def test_a_consent_given_under_a_version_covers_only_what_it_defined() -> None:
    ctx = DecisionContext(POLICY, KEY, consent_scopes={"2026.1.1": frozenset({"avn/nav"})})
    old = dataclasses.replace(state(), consent_version="2026.1.1")
    payload = sample("avn/nav").SerializeToString()
    dropped = decide(ctx, f"vehicle/{VIN}/avn/nav", payload, {VIN: old}, {}, NOW)
    assert isinstance(dropped, Drop) and dropped.reason is DropReason.CONSENT_OUTDATED
    current = dataclasses.replace(state(), consent_version=POLICY.version)
    assert isinstance(
        decide(ctx, f"vehicle/{VIN}/avn/nav", payload, {VIN: current}, {}, NOW), Forward
    )
    # Contract streams are not consents; a version never stored is not judged.
    status = sample("tbox/status").SerializeToString()
    assert isinstance(
        decide(ctx, f"vehicle/{VIN}/tbox/status", status, {VIN: old}, {}, NOW), Forward
    )
    unknown = dataclasses.replace(state(), consent_version="1999.1.1")
    assert isinstance(
        decide(ctx, f"vehicle/{VIN}/avn/nav", payload, {VIN: unknown}, {}, NOW), Forward
    )


def test_settings_record_the_version_the_car_showed_when_it_is_known() -> None:
    ctx = DecisionContext(POLICY, KEY, consent_scopes={"2026.1.1": frozenset({"avn/nav"})})
    for stated, recorded, reprompt in (
        ("2026.1.1", "2026.1.1", True),
        ("", POLICY.version, False),
        ("1999.1.1", POLICY.version, False),
        (POLICY.version, POLICY.version, False),
    ):
        msg = privacy_pb2.PrivacySettings(revision=5, location=common_pb2.LOCATION_PRECISE)
        msg.header.vin = VIN
        msg.policy_version = stated
        d = decide(ctx, f"vehicle/{VIN}/avn/privacy", msg.SerializeToString(), {}, {}, NOW)
        assert isinstance(d, ApplySettings), stated
        assert d.snapshot.policy_version == recorded == d.state.consent_version
        assert privacy_pb2.PrivacyApplied.FromString(d.applied_payload).reprompt is reprompt


def test_geo_cases_cover_every_geopoint_field() -> None:
    assert {name for _, name in GEO_CASES} >= {
        "position",
        "charging_location",
        "start",
        "end",
        "destination",
    }
    assert len(GEO_CASES) == 9


@pytest.mark.parametrize(("stream", "field"), GEO_CASES)
def test_location_off_clears_geopoints_or_drops_location_streams(stream: str, field: str) -> None:
    st = state(location=LocationMode.OFF, window_until=window_for(stream))
    decision = run(stream, st)
    if stream in LOCATION_PURPOSE:
        dropped(decision, DropReason.LOCATION_OFF)
        return
    fwd = forwarded(decision)
    out = STREAMS[stream][1].FromString(fwd.payload)
    assert not out.HasField(field)
    assert f"clear:{field}" in fwd.transforms


@pytest.mark.parametrize("stream", ["tbox/location", "avn/nav"])
def test_location_purpose_streams_pass_when_location_on(stream: str) -> None:
    for mode in (LocationMode.APPROXIMATE, LocationMode.PRECISE):
        forwarded(run(stream, state(location=mode, window_until=window_for(stream))))


@pytest.mark.parametrize(("stream", "field"), GEO_CASES)
def test_location_approximate_coarsens_geopoints(stream: str, field: str) -> None:
    msg = sample(stream)
    original = getattr(msg, field)
    st = state(location=LocationMode.APPROXIMATE, window_until=window_for(stream))
    fwd = forwarded(run(stream, st, msg))
    point = getattr(STREAMS[stream][1].FromString(fwd.payload), field)
    if (stream, field) == ("tbox/trip", "start"):
        # Where the car was, with no anchor yet: the anchor this report sets
        # (from the end), never a second fresh value.
        original = msg.end  # type: ignore[attr-defined]
    assert point.altitude_m == 0 and point.heading_deg == 0 and point.speed_kmh == 0
    assert point.horizontal_accuracy_m == POLICY.cell_size_m
    assert (point.latitude, point.longitude) != (original.latitude, original.longitude)
    dlat, dlon = coarse_cell_degrees(POLICY.cell_size_m, point.latitude)
    # Within one cell per axis: half a cell of secret shift, half of snapping.
    assert abs(point.latitude - original.latitude) <= dlat + 1e-9
    assert abs(point.longitude - original.longitude) <= dlon + 1e-9
    expected = coarsen_position(
        original.latitude, original.longitude, POLICY.cell_size_m, grid_offset(KEY, VIN)
    )
    assert (point.latitude, point.longitude) == expected
    assert f"coarsen:{field}" in fwd.transforms


@pytest.mark.parametrize(("stream", "field"), GEO_CASES)
def test_location_precise_keeps_geopoints(stream: str, field: str) -> None:
    msg = sample(stream)
    st = state(location=LocationMode.PRECISE, window_until=window_for(stream))
    fwd = forwarded(run(stream, st, msg))
    out = STREAMS[stream][1].FromString(fwd.payload)
    assert getattr(out, field) == getattr(msg, field)
    assert not any(t.endswith(f":{field}") for t in fwd.transforms)


@pytest.mark.parametrize(
    ("mode", "kept"),
    [(LocationMode.OFF, False), (LocationMode.APPROXIMATE, False), (LocationMode.PRECISE, True)],
)
def test_evse_id_cleared_unless_precise(mode: LocationMode, kept: bool) -> None:
    fwd = forwarded(run("tbox/battery", state(location=mode)))
    out = streams_pb2.BatteryStatus.FromString(fwd.payload)
    assert out.evse_id == ("DE*ABC*E123" if kept else "")
    assert ("clear:evse_id" in fwd.transforms) is not kept
    assert out.state_of_charge_pct == 80.0  # the rest of the message survives


@pytest.mark.parametrize("mode", list(LocationMode))
def test_ecall_untouched_in_every_location_mode(mode: LocationMode) -> None:
    msg = sample("tbox/ecall")
    assert len(msg.recent_positions) == 3  # type: ignore[attr-defined]
    fwd = forwarded(run("tbox/ecall", state(location=mode), msg))
    assert fwd.payload == msg.SerializeToString()
    assert dict(fwd.user_properties)["transforms"] == ""


# ---------------------------------------------- (5) approximate refresh


def _status_at(lat: float, lon: float, ts_ms: int) -> Message:
    msg = sample("tbox/status", ts_ms=ts_ms)
    msg.position.CopyFrom(_geo(lat, lon))  # type: ignore[attr-defined]
    return msg


def test_approximate_position_reuses_anchor_within_refresh_interval() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    first = forwarded(run("tbox/status", st, _status_at(48.137, 11.576, TS_MS)))
    anchor = first.anchor
    assert anchor is not None and anchor.refreshed_at == NOW
    out1 = streams_pb2.VehicleStatus.FromString(first.payload).position
    assert (anchor.latitude, anchor.longitude) == (out1.latitude, out1.longitude)

    # 10 km away, a minute later (gateway clock): the coarse value does not move.
    second = forwarded(
        run(
            "tbox/status",
            st,
            _status_at(48.227, 11.676, TS_MS + 60_000),
            anchors={VIN: anchor},
            now=NOW + 60,
        )
    )
    out2 = streams_pb2.VehicleStatus.FromString(second.payload).position
    assert (out2.latitude, out2.longitude) == (anchor.latitude, anchor.longitude)
    assert out2.horizontal_accuracy_m == POLICY.cell_size_m
    assert out2.altitude_m == 0 and out2.speed_kmh == 0 and out2.heading_deg == 0
    assert second.anchor is None

    # Just inside the interval: still the old value.
    edge = NOW + POLICY.refresh_interval_ms / 1000 - 0.001
    third = forwarded(
        run("tbox/status", st, _status_at(48.227, 11.676, TS_MS), anchors={VIN: anchor}, now=edge)
    )
    out3 = streams_pb2.VehicleStatus.FromString(third.payload).position
    assert (out3.latitude, out3.longitude) == (anchor.latitude, anchor.longitude)


def test_approximate_position_refreshes_after_interval() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    anchor = LocationAnchor(NOW, 10.0, 10.0)
    later = NOW + POLICY.refresh_interval_ms / 1000
    fwd = forwarded(
        run("tbox/status", st, _status_at(48.227, 11.676, TS_MS), anchors={VIN: anchor}, now=later)
    )
    out = streams_pb2.VehicleStatus.FromString(fwd.payload).position
    expected = coarsen_position(48.227, 11.676, POLICY.cell_size_m, grid_offset(KEY, VIN))
    assert (out.latitude, out.longitude) == expected
    assert fwd.anchor == LocationAnchor(later, *expected, odometer_km=12345.6)


def test_refresh_uses_gateway_clock_not_vehicle_timestamp() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    anchor = LocationAnchor(NOW, 10.0, 10.0)
    # Vehicle clock a day later, gateway clock 1 s later: no refresh.
    fwd = forwarded(
        run(
            "tbox/status",
            st,
            _status_at(48.2, 11.6, TS_MS + 86_400_000),
            anchors={VIN: anchor},
            now=NOW + 1,
        )
    )
    out = streams_pb2.VehicleStatus.FromString(fwd.payload).position
    assert (out.latitude, out.longitude) == (10.0, 10.0)
    assert fwd.anchor is None


def test_anchor_of_another_vehicle_is_not_used() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    anchors = {OTHER_VIN: LocationAnchor(NOW, 10.0, 10.0)}
    fwd = forwarded(run("tbox/status", st, _status_at(48.2, 11.6, TS_MS + 1), anchors=anchors))
    out = streams_pb2.VehicleStatus.FromString(fwd.payload).position
    assert (out.latitude, out.longitude) != (10.0, 10.0)


def test_destination_coarsened_per_message_despite_anchor() -> None:
    msg = sample("avn/nav", ts_ms=TS_MS + 1000)
    anchor = LocationAnchor(NOW, 10.0, 10.0)
    fwd = forwarded(
        run(
            "avn/nav",
            state(location=LocationMode.APPROXIMATE),
            msg,
            anchors={VIN: anchor},
            now=NOW + 1,
        )
    )
    out = streams_pb2.NavRequest.FromString(fwd.payload)
    src = msg.destination  # type: ignore[attr-defined]
    expected = coarsen_position(
        src.latitude, src.longitude, POLICY.cell_size_m, grid_offset(KEY, VIN)
    )
    assert (out.destination.latitude, out.destination.longitude) == expected
    # Its current position does follow the anchor; the destination never moves it.
    assert (out.position.latitude, out.position.longitude) == (10.0, 10.0)
    assert fwd.anchor is None


# ------------------------------------------- (5b) positions without a fix

# GPS without a fix reports NaN; broken units report anything. None of it may
# reach the backend, nor stop the rest of the message.
BAD_COORDINATES = [
    (math.nan, 11.5),
    (48.1, math.nan),
    (math.inf, 11.5),
    (48.1, -math.inf),
    (90.000001, 11.5),
    (-91.0, 11.5),
    (48.1, 180.5),
    (48.1, -181.0),
]
LOCATION_ON = [LocationMode.APPROXIMATE, LocationMode.PRECISE]


def _with_point(stream: str, field: str, lat: float, lon: float) -> Message:
    msg = sample(stream)
    getattr(msg, field).CopyFrom(_geo(lat, lon))
    return msg


@pytest.mark.parametrize("mode", LOCATION_ON)
@pytest.mark.parametrize(("lat", "lon"), BAD_COORDINATES)
@pytest.mark.parametrize(("stream", "field"), GEO_CASES)
def test_invalid_point_is_cleared_and_message_forwarded(
    stream: str, field: str, lat: float, lon: float, mode: LocationMode
) -> None:
    msg = _with_point(stream, field, lat, lon)
    fwd = forwarded(run(stream, state(location=mode, window_until=window_for(stream)), msg))
    out = STREAMS[stream][1].FromString(fwd.payload)
    assert not out.HasField(field)
    assert f"invalid_position:{field}" in fwd.transforms
    assert not any(
        t.endswith(f":{field}") and not t.startswith("invalid_position:") for t in fwd.transforms
    )
    assert fwd.anchor is None or field != "position"
    # The other location fields are still treated as usual.
    for other in geo_fields(STREAMS[stream][1]):
        if other != field:
            assert out.HasField(other)
            if mode is LocationMode.PRECISE:
                assert getattr(out, other) == getattr(msg, other)
            else:
                assert f"coarsen:{other}" in fwd.transforms


@pytest.mark.parametrize("mode", LOCATION_ON)
@pytest.mark.parametrize(("lat", "lon"), [(90.0, 180.0), (-90.0, -180.0), (0.0, 0.0)])
def test_extreme_valid_coordinates_are_kept(lat: float, lon: float, mode: LocationMode) -> None:
    fwd = forwarded(
        run("tbox/status", state(location=mode), _with_point("tbox/status", "position", lat, lon))
    )
    out = streams_pb2.VehicleStatus.FromString(fwd.payload).position
    assert math.isfinite(out.latitude) and math.isfinite(out.longitude)
    assert -90 <= out.latitude <= 90 and -180 <= out.longitude <= 180
    assert not any(t.startswith("invalid_position:") for t in fwd.transforms)
    if mode is LocationMode.PRECISE:
        assert (out.latitude, out.longitude) == (lat, lon)


def test_invalid_position_never_sets_the_refresh_anchor() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    fwd = forwarded(run("tbox/status", st, _status_at(math.nan, math.nan, TS_MS)))
    assert fwd.anchor is None
    # After the interval, an invalid point neither moves the old anchor...
    anchor = LocationAnchor(NOW, 10.0, 10.0)
    late = NOW + POLICY.refresh_interval_ms / 1000
    fwd = forwarded(
        run("tbox/status", st, _status_at(math.inf, 11.6, TS_MS), anchors={VIN: anchor}, now=late)
    )
    assert fwd.anchor is None
    assert not streams_pb2.VehicleStatus.FromString(fwd.payload).HasField("position")
    # ...and within it, the invalid point is cleared rather than replaced by the anchor.
    fwd = forwarded(
        run(
            "tbox/status", st, _status_at(math.nan, 11.6, TS_MS), anchors={VIN: anchor}, now=NOW + 1
        )
    )
    assert fwd.anchor is None
    assert not streams_pb2.VehicleStatus.FromString(fwd.payload).HasField("position")
    # The next valid point after the interval anchors as usual.
    fwd = forwarded(
        run("tbox/status", st, _status_at(48.2, 11.6, TS_MS), anchors={VIN: anchor}, now=late + 1)
    )
    assert fwd.anchor is not None and fwd.anchor.refreshed_at == late + 1


# A stream carrying repeated GeoPoints that is not a legal obligation (the
# default policy's only one, ECall.recent_positions, is never transformed).
TRACK_POLICY = parse_policy(
    (ROOT / "config" / "policy.yaml")
    .read_text(encoding="utf-8")
    .replace(
        "\nstreams:\n",
        "\nstreams:\n  tbox/track:\n    message: ECall\n    feature: remote_control\n"
        "    retention_days: 1\n    fields: {position: position, recent_positions: place,"
        " trigger: keep, passengers: keep, vehicle_type: keep, propulsion: keep}\n",
    )
)
TRACK_CTX = DecisionContext(TRACK_POLICY, KEY)


def _track(
    points: list[tuple[float, float]], mode: LocationMode
) -> tuple[Forward, streams_pb2.ECall]:
    msg = streams_pb2.ECall(passengers=1)
    msg.header.vin, msg.header.timestamp_ms = VIN, TS_MS
    msg.recent_positions.extend(_geo(lat, lon) for lat, lon in points)
    st = state_from_snapshot(
        TRACK_POLICY,
        SettingsSnapshot(VIN, 1, False, mode, {"remote_control": True}, NOW, TRACK_POLICY.version),
    )
    d = decide(TRACK_CTX, f"vehicle/{VIN}/tbox/track", msg.SerializeToString(), {VIN: st}, {}, NOW)
    fwd = forwarded(d)
    return fwd, streams_pb2.ECall.FromString(fwd.payload)


def test_track_policy_has_a_repeated_geo_field() -> None:
    stream, _ = TRACK_POLICY.route("tbox/track")  # type: ignore[misc]
    assert [(g.name, g.repeated) for g in stream.geo_fields] == [
        ("position", False),
        ("recent_positions", True),
    ]


@pytest.mark.parametrize(("lat", "lon"), BAD_COORDINATES)
def test_invalid_points_dropped_from_repeated_field_approximate(lat: float, lon: float) -> None:
    fwd, out = _track([(48.1, 11.5), (lat, lon), (48.3, 11.7)], LocationMode.APPROXIMATE)
    offset = grid_offset(KEY, VIN)
    # Places where the car was: every point shows the one anchor (set from the
    # latest valid point), never a track of fresh coarse values.
    anchored = coarsen_position(48.3, 11.7, POLICY.cell_size_m, offset)
    assert [(p.latitude, p.longitude) for p in out.recent_positions] == [anchored, anchored]
    assert all(
        p.speed_kmh == 0 and p.heading_deg == 0 and p.altitude_m == 0 for p in out.recent_positions
    )
    assert "invalid_position:recent_positions" in fwd.transforms
    assert "coarsen:recent_positions" in fwd.transforms


@pytest.mark.parametrize(("lat", "lon"), BAD_COORDINATES)
def test_invalid_points_dropped_from_repeated_field_precise(lat: float, lon: float) -> None:
    fwd, out = _track([(48.1, 11.5), (lat, lon), (48.3, 11.7)], LocationMode.PRECISE)
    assert list(out.recent_positions) == [_geo(48.1, 11.5), _geo(48.3, 11.7)]
    assert fwd.transforms == ("invalid_position:recent_positions",)


@pytest.mark.parametrize("mode", LOCATION_ON)
def test_repeated_field_of_only_invalid_points_is_emptied(mode: LocationMode) -> None:
    fwd, out = _track([(math.nan, math.nan), (math.inf, 0.0)], mode)
    assert len(out.recent_positions) == 0
    assert fwd.transforms == ("invalid_position:recent_positions",)


def test_ecall_with_invalid_points_is_still_forwarded_untouched() -> None:
    msg = sample("tbox/ecall")
    msg.position.latitude = math.nan  # type: ignore[attr-defined]
    msg.recent_positions[1].longitude = math.inf  # type: ignore[attr-defined]
    for mode in LocationMode:
        fwd = forwarded(run("tbox/ecall", state(location=mode), msg))
        assert fwd.payload == msg.SerializeToString()
        assert fwd.transforms == ()


coordinates = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 90.0, -90.0, 180.0, -180.0]
)


@settings(max_examples=300, deadline=None)
@given(
    lat=coordinates,
    lon=coordinates,
    mode=st.sampled_from(LOCATION_ON),
    stream_field=st.sampled_from(GEO_CASES),
)
def test_any_coordinates_forward_only_valid_points(
    lat: float, lon: float, mode: LocationMode, stream_field: tuple[str, str]
) -> None:
    stream, field = stream_field
    msg = _with_point(stream, field, lat, lon)
    fwd = forwarded(run(stream, state(location=mode, window_until=window_for(stream)), msg))
    out = STREAMS[stream][1].FromString(fwd.payload)
    for name in geo_fields(STREAMS[stream][1]):
        if out.HasField(name):
            point = getattr(out, name)
            assert -90 <= point.latitude <= 90 and -180 <= point.longitude <= 180


# ---------------------------------------------------------- (6) identifiers


def test_bluetooth_mac_is_keyed_pseudonym() -> None:
    fwd = forwarded(run("tbox/digital_key", state()))
    out = streams_pb2.DigitalKeyEvent.FromString(fwd.payload)
    assert HEX32.match(out.bluetooth_mac)
    # Keyed per vehicle (one phone in two cars gives two unrelated values).
    assert out.bluetooth_mac == pseudonymize_vehicle_field(
        KEY, "bluetooth_mac", "aa-bb-cc-dd-ee-ff", VIN
    )
    assert out.bluetooth_mac == pseudonym(
        KEY, f"bluetooth_mac/{VIN}", normalize_mac("AA:BB:CC:DD:EE:FF")
    )
    assert b"aa-bb" not in fwd.payload and b"AA:BB" not in fwd.payload
    assert "hmac:bluetooth_mac" in fwd.transforms
    other = DecisionContext(POLICY, b"\x01" * 32)
    again = decide(
        other,
        f"vehicle/{VIN}/tbox/digital_key",
        sample("tbox/digital_key").SerializeToString(),
        {VIN: state()},
        {},
        NOW,
    )
    other_mac = streams_pb2.DigitalKeyEvent.FromString(forwarded(again).payload).bluetooth_mac
    assert other_mac != out.bluetooth_mac


def test_voice_session_id_is_keyed_pseudonym() -> None:
    fwd = forwarded(run("avn/voice", state()))
    out = streams_pb2.VoiceChunk.FromString(fwd.payload)
    assert HEX32.match(out.session_id)
    assert out.session_id == pseudonymize_field(KEY, "session_id", "voice-session-42")
    assert out.session_id == pseudonym(KEY, "voice_session", "voice-session-42")
    assert out.audio == b"\x01\x02" and out.chunk_index == 3
    assert b"voice-session-42" not in fwd.payload


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.20.30.40", "10.20.30.0"),
        ("2001:db8:abcd:12:1::5", "2001:db8:abcd::"),
        ("::ffff:192.0.2.77", "192.0.2.0"),
        ("not-an-ip", ""),
        ("10.20.30.40/32", ""),
    ],
)
def test_connectivity_ids_removed_ip_truncated(ip: str, expected: str) -> None:
    msg = sample("tbox/connectivity")
    msg.ip_address = ip  # type: ignore[attr-defined]
    fwd = forwarded(run("tbox/connectivity", state(), msg))
    out = streams_pb2.Connectivity.FromString(fwd.payload)
    assert out.ip_address == expected
    assert out.iccid == "" and out.imsi == ""
    assert b"262011234567890" not in fwd.payload and b"8949020000000000001" not in fwd.payload
    assert out.network_type == "LTE"
    assert dict(fwd.user_properties)["transforms"] == (
        "truncate_ip:ip_address,remove:iccid,remove:imsi"
    )


def test_app_stream_pseudonymizes_vin() -> None:
    fwd = forwarded(run("avn/app/music", state({"third_party.music": True})))
    ref = fwd.topic.split("/")[1]
    assert fwd.topic == f"apps/{ref}/avn/app/music"
    assert HEX32.match(ref) and ref != VIN
    assert ref == pseudonym(KEY, "vin/music|app_providers", VIN)
    out = streams_pb2.AppTraffic.FromString(fwd.payload)
    assert out.header.vin == ref
    assert out.payload == b"song"
    assert VIN not in fwd.topic
    assert VIN.encode() not in fwd.payload
    assert "pseudonymize:vin" in fwd.transforms
    assert fwd.vin == VIN  # internal bookkeeping keeps the real VIN


def test_app_pseudonyms_differ_per_app_and_per_vehicle() -> None:
    st = state({"third_party.music": True, "third_party.weather": True})
    music = forwarded(run("avn/app/music", st)).topic.split("/")[1]
    weather = forwarded(run("avn/app/weather", st)).topic.split("/")[1]
    other = decide(
        CTX,
        f"vehicle/{OTHER_VIN}/avn/app/music",
        sample("avn/app/music", OTHER_VIN).SerializeToString(),
        {OTHER_VIN: st},
        {},
        NOW,
    )
    assert len({music, weather, forwarded(other).topic.split("/")[1]}) == 3


def test_vin_inside_app_payload_is_dropped() -> None:
    msg = sample("avn/app/music")
    msg.payload = b'{"car": "' + VIN.encode() + b'"}'  # type: ignore[attr-defined]
    dropped(
        run("avn/app/music", state({"third_party.music": True}), msg), DropReason.VIN_IN_PAYLOAD
    )


def test_per_app_feature_enables_only_that_app() -> None:
    st = state({"third_party.music": True})
    forwarded(run("avn/app/music", st))
    d = dropped(run("avn/app/weather", st), DropReason.FEATURE_DISABLED)
    assert d.detail == "third_party.weather"
    # The base toggle alone enables no app.
    dropped(run("avn/app/music", state({"third_party": True})), DropReason.FEATURE_DISABLED)


@pytest.mark.parametrize("app", ["a.b", "x" * 65, "sp ace", "music\n"])
def test_app_id_outside_placeholder_syntax_is_unknown_topic(app: str) -> None:
    payload = sample("avn/app/music").SerializeToString()
    d = decide(CTX, f"vehicle/{VIN}/avn/app/{app}", payload, {VIN: state()}, {}, NOW)
    dropped(d, DropReason.UNKNOWN_TOPIC)


# ----------------------------------------------------------- user properties


@pytest.mark.parametrize("stream", list(STREAMS))
def test_every_forward_carries_user_properties(stream: str) -> None:
    fwd = forwarded(run(stream, state(window_until=window_for(stream))))
    props = dict(fwd.user_properties)
    assert [k for k, _ in fwd.user_properties] == [
        "policy-version",
        "feature",
        "legal-basis",
        "retention-days",
        "transforms",
        "recipient",
        "transfer-basis",
    ]
    route = POLICY.route(stream)
    assert route is not None
    rule = route[0]
    assert props["policy-version"] == POLICY.version == "2026.12.1"
    assert props["feature"] == STREAMS[stream][0] == fwd.feature
    assert props["legal-basis"] == rule.legal_basis
    assert props["legal-basis"] == (
        "legal_obligation"
        if stream == "tbox/ecall"
        else "consent"
        if stream.startswith("avn/")
        else "contract"
    )
    assert props["retention-days"] == str(rule.retention_days)
    assert props["transforms"] == ",".join(fwd.transforms)


def test_transforms_empty_when_nothing_applied() -> None:
    fwd = forwarded(run("tbox/status", state(location=LocationMode.PRECISE)))
    assert fwd.transforms == ()
    assert dict(fwd.user_properties)["transforms"] == ""


def test_transforms_list_every_step() -> None:
    fwd = forwarded(run("avn/nav", state(location=LocationMode.APPROXIMATE)))
    assert dict(fwd.user_properties)["transforms"] == "coarsen:position,coarsen:destination"


# ------------------------------------------------------------ unknown fields


def _unknown_field(number: int, data: bytes) -> bytes:
    tag = (number << 3) | 2
    out = bytearray()
    while True:
        byte = tag & 0x7F
        tag >>= 7
        out.append(byte | (0x80 if tag else 0))
        if not tag:
            break
    return bytes(out) + bytes([len(data)]) + data


@pytest.mark.parametrize("stream", CONSENT_STREAMS)
def test_unknown_fields_are_not_forwarded(stream: str) -> None:
    secret = b"HIDDEN-NEW-FIELD"
    payload = sample(stream).SerializeToString() + _unknown_field(99, secret)
    st = state(window_until=window_for(stream))
    fwd = forwarded(decide(CTX, f"vehicle/{VIN}/{stream}", payload, {VIN: st}, {}, NOW))
    assert secret not in fwd.payload


def test_unknown_fields_inside_submessages_are_not_forwarded() -> None:
    secret = b"NESTED-SECRET"
    header = sample("tbox/status").header.SerializeToString() + _unknown_field(50, secret)  # type: ignore[attr-defined]
    position = _geo(48.1, 11.5).SerializeToString() + _unknown_field(40, secret)
    payload = _unknown_field(1, header) + _unknown_field(17, position)
    fwd = forwarded(decide(CTX, f"vehicle/{VIN}/tbox/status", payload, {VIN: state()}, {}, NOW))
    assert secret not in fwd.payload
    assert streams_pb2.VehicleStatus.FromString(fwd.payload).position.latitude == 48.1


def test_ecall_conforming_is_byte_for_byte_and_unknown_fields_are_trimmed() -> None:
    """Contract v2 rule 18 (v1 forwarded unknown eCall fields byte for byte)."""
    conforming = sample("tbox/ecall").SerializeToString()
    fwd = forwarded(decide(CTX, f"vehicle/{VIN}/tbox/ecall", conforming, {}, {}, NOW))
    assert fwd.payload == conforming and fwd.transforms == ()
    payload = conforming + _unknown_field(99, b"future")
    fwd = forwarded(decide(CTX, f"vehicle/{VIN}/tbox/ecall", payload, {}, {}, NOW))
    assert fwd.payload == conforming and fwd.transforms == ("trim",)


# ----------------------------------------------------------------- (7) settings


def test_first_settings_apply() -> None:
    d = apply(
        settings_payload(
            3,
            {"remote_control": True, "online_search": False},
            location=common_pb2.LOCATION_APPROXIMATE,
        )
    )
    assert isinstance(d, ApplySettings)
    assert d.applied_topic == f"vehicle/{VIN}/avn/privacy/applied"
    applied = privacy_pb2.PrivacyApplied.FromString(d.applied_payload)
    assert (applied.vin, applied.revision, applied.policy_version) == (VIN, 3, POLICY.version)
    assert d.snapshot.vin == VIN and d.snapshot.revision == 3
    assert d.snapshot.features == {"remote_control": True, "online_search": False}
    assert d.snapshot.applied_at == NOW and d.snapshot.policy_version == POLICY.version
    assert d.state.revision == 3
    assert d.state.enabled == {"remote_control"} | POLICY.default_on
    assert d.state.location is LocationMode.APPROXIMATE
    assert not d.state.privacy_mode


def test_settings_with_privacy_mode() -> None:
    d = apply(settings_payload(1, privacy_mode=True))
    assert isinstance(d, ApplySettings)
    assert d.state.privacy_mode and d.snapshot.privacy_mode
    dropped(run("tbox/status", d.state), DropReason.PRIVACY_MODE)


@pytest.mark.parametrize("revision", [1, 4])
def test_lower_revision_is_stale_without_reannounce(revision: int) -> None:
    d = dropped(apply(settings_payload(revision), state(revision=5)), DropReason.STALE_REVISION)
    assert d.reannounce is None


def test_revision_zero_for_unknown_vehicle_is_stale() -> None:
    d = dropped(apply(settings_payload(0)), DropReason.STALE_REVISION)
    assert d.reannounce is None


def test_equal_revision_reannounces_applied_revision() -> None:
    # Different content, same revision: ignored, but the applied state is announced again.
    current = state({"remote_control": True}, revision=5)
    d = dropped(apply(settings_payload(5, {}), current), DropReason.STALE_REVISION)
    assert d.reannounce is not None
    topic, body = d.reannounce
    assert topic == f"vehicle/{VIN}/avn/privacy/applied"
    applied = privacy_pb2.PrivacyApplied.FromString(body)
    assert (applied.vin, applied.revision, applied.policy_version) == (VIN, 5, POLICY.version)
    assert d.reannounce == applied_message(CTX, VIN, 5)


def test_settings_vin_mismatch() -> None:
    d = dropped(apply(settings_payload(1, vin=OTHER_VIN)), DropReason.VIN_MISMATCH)
    assert d.detail == OTHER_VIN


@pytest.mark.parametrize("stream", list(STREAMS))
def test_telemetry_vin_mismatch(stream: str) -> None:
    st = state(window_until=window_for(stream))
    msg = sample(stream, vin=OTHER_VIN)
    dropped(run(stream, st, msg), DropReason.VIN_MISMATCH)


def test_missing_header_is_vin_mismatch() -> None:
    dropped(
        run("tbox/status", state(), streams_pb2.VehicleStatus(fuel_level_pct=1.0)),
        DropReason.VIN_MISMATCH,
    )


TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow


@pytest.mark.parametrize("stream", [*STREAMS, "avn/privacy"])
def test_undecodable_payload(stream: str) -> None:
    d = decide(CTX, f"vehicle/{VIN}/{stream}", TRUNCATED, {VIN: state()}, {}, NOW)
    dropped(d, DropReason.UNDECODABLE)


@pytest.mark.parametrize(
    "bad_vin", ["WVWZZZ1JZXW00000I", "SHORT", "wvwzzz1jzxw000001", "WVWZZZ1JZXW0000012", f"{VIN}\n"]
)
@pytest.mark.parametrize("stream", ["tbox/status", "tbox/ecall", "avn/privacy"])
def test_invalid_vin_in_topic(stream: str, bad_vin: str) -> None:
    if stream == "avn/privacy":
        payload = settings_payload(1, vin=bad_vin)
    else:
        payload = sample(stream, vin=bad_vin).SerializeToString()
    d = decide(CTX, f"vehicle/{bad_vin}/{stream}", payload, {}, {}, NOW)
    dropped(d, DropReason.INVALID_VIN)


@pytest.mark.parametrize(
    "topic",
    [
        f"vehicle/{VIN}/tbox/unknown",
        f"vehicle/{VIN}/tbox",
        f"vehicle/{VIN}",
        f"vehicle/{VIN}/",
        f"vehicle/{VIN}/avn/privacy/applied",
        f"vehicle/{VIN}/tbox/status/extra",
        f"other/{VIN}/tbox/status",
        f"tsp/{VIN}/tbox/status",
        "",
    ],
)
def test_unknown_topic(topic: str) -> None:
    payload = sample("tbox/status").SerializeToString()
    dropped(decide(CTX, topic, payload, {VIN: state()}, {}, NOW), DropReason.UNKNOWN_TOPIC)


@pytest.mark.parametrize("location", [common_pb2.LOCATION_MODE_UNSPECIFIED, 7])
def test_unspecified_location_is_enforced_as_off(location: int) -> None:
    d = apply(settings_payload(1, location=location))
    assert isinstance(d, ApplySettings)
    assert d.state.location.effective is LocationMode.OFF
    fwd = forwarded(run("tbox/status", d.state))
    assert not streams_pb2.VehicleStatus.FromString(fwd.payload).HasField("position")
    dropped(run("avn/nav", d.state), DropReason.LOCATION_OFF)


def test_unknown_feature_ids_are_ignored() -> None:
    d = apply(
        settings_payload(
            1,
            {"remote_control": True, "telepathy": True, "third_party.music": True, "ecall": False},
        )
    )
    assert isinstance(d, ApplySettings)
    assert d.state.enabled == {"remote_control", "third_party.music"} | POLICY.default_on
    # Neither enforced nor stored (an unbounded map a car controls); counted.
    assert "telepathy" not in d.snapshot.features and d.ignored_features == 1
    assert d.snapshot.features["ecall"] is False  # a policy feature, kept as sent


def test_per_app_consents_per_snapshot_are_capped_and_only_on_ones_kept() -> None:
    features = {f"third_party.app{i:03d}": True for i in range(500)}
    features |= {f"third_party.off{i:03d}": False for i in range(500)}
    features["third_party." + "x" * 200] = True
    d = apply(settings_payload(1, {"remote_control": False, **features}))
    assert isinstance(d, ApplySettings)
    kept = d.snapshot.features
    assert kept["remote_control"] is False
    assert sorted(k for k in kept if k.startswith("third_party.")) == [
        f"third_party.app{i:03d}" for i in range(64)
    ]
    assert d.ignored_features == 1001 + 1 - len(kept)
    assert len(d.state.enabled - POLICY.default_on) == 64


def test_settings_keep_an_open_window() -> None:
    current = state(window_until=open_window(), revision=1)
    d = apply(settings_payload(2), current)
    assert isinstance(d, ApplySettings)
    assert d.state.window_until == open_window()


def test_decide_does_not_mutate_inputs() -> None:
    st = state(location=LocationMode.APPROXIMATE)
    states = {VIN: st}
    fixes = {VIN: LocationAnchor(0, 1.0, 1.0)}
    before = (dict(states), dict(fixes))
    decide(
        CTX,
        f"vehicle/{VIN}/tbox/status",
        sample("tbox/status").SerializeToString(),
        states,
        fixes,
        NOW,
    )
    decide(CTX, f"vehicle/{VIN}/avn/privacy", settings_payload(9), states, fixes, NOW)
    assert (states, fixes) == before
    assert states[VIN] is st


# ---------------------------------------------------------- (8) arrival order


def test_newer_settings_disabling_feature_drop_next_message() -> None:
    first = apply(settings_payload(1, {"remote_control": True}))
    assert isinstance(first, ApplySettings)
    forwarded(run("tbox/status", first.state))
    second = apply(settings_payload(2, {"remote_control": False}), first.state)
    assert isinstance(second, ApplySettings)
    dropped(run("tbox/status", second.state), DropReason.FEATURE_DISABLED)
    # A late redelivery of the older, permissive settings changes nothing.
    late = apply(settings_payload(1, {"remote_control": True}), second.state)
    dropped(late, DropReason.STALE_REVISION)


def test_newer_settings_turning_location_off_clear_next_message() -> None:
    first = apply(settings_payload(1, location=common_pb2.LOCATION_PRECISE))
    assert isinstance(first, ApplySettings)
    second = apply(settings_payload(2, location=common_pb2.LOCATION_OFF), first.state)
    assert isinstance(second, ApplySettings)
    fwd = forwarded(run("tbox/status", second.state))
    assert not streams_pb2.VehicleStatus.FromString(fwd.payload).HasField("position")


# ------------------------------------------------------------ (10) find my car


def test_find_my_car_opens_window() -> None:
    st = state({"find_my_car": True}, location=LocationMode.PRECISE)
    d = command("find_my_car", st)
    assert d.accepted and d.reason == "forwarded"
    assert d.result_topic == f"tsp/{VIN}/cmd/find_my_car/result"
    result = command_pb2.CommandResult.FromString(d.result_payload)
    assert (result.request_id, result.command, result.accepted) == ("req-1", "find_my_car", True)
    assert d.forward_topic == f"vehicle/{VIN}/cmd/find_my_car"
    assert d.forward_payload is not None
    fwd_cmd = command_pb2.Command.FromString(d.forward_payload)
    assert (fwd_cmd.request_id, fwd_cmd.command) == ("req-1", "find_my_car")
    assert d.state is not None
    assert d.state.window_until == NOW + POLICY.window_s == NOW + 120
    assert d.state.enabled == st.enabled and d.state.revision == st.revision

    window_end = d.state.window_until
    dropped(run("tbox/location", st, now=NOW), DropReason.NO_WINDOW)
    forwarded(run("tbox/location", d.state, now=NOW))
    forwarded(run("tbox/location", d.state, now=window_end - 0.001))
    dropped(run("tbox/location", d.state, now=window_end), DropReason.NO_WINDOW)
    dropped(run("tbox/location", d.state, now=window_end + 3600), DropReason.NO_WINDOW)


def test_find_my_car_location_follows_location_mode() -> None:
    st = state({"find_my_car": True}, location=LocationMode.APPROXIMATE)
    d = command("find_my_car", st)
    assert d.state is not None
    fwd = forwarded(run("tbox/location", d.state))
    assert "coarsen:position" in fwd.transforms
    off = state({"find_my_car": True}, location=LocationMode.OFF, window_until=open_window())
    dropped(run("tbox/location", off), DropReason.LOCATION_OFF)


def test_command_without_command_field_is_filled_in() -> None:
    payload = command_pb2.Command(request_id="r2").SerializeToString()
    d = command("lock", state(), payload=payload)
    assert d.accepted and d.state is None  # lock opens no window
    assert d.forward_payload is not None
    assert command_pb2.Command.FromString(d.forward_payload).command == "lock"


@pytest.mark.parametrize(
    ("name", "st", "payload", "vin", "reason"),
    [
        ("find_my_car", None, None, VIN, "unknown_vehicle"),
        ("find_my_car", state(privacy_mode=True), None, VIN, "privacy_mode"),
        ("find_my_car", state({"remote_control": True}), None, VIN, "feature_disabled:find_my_car"),
        ("lock", state({"find_my_car": True}), None, VIN, "feature_disabled:remote_control"),
        ("self_destruct", state(), None, VIN, "unknown_command"),
        ("find_my_car", state(), TRUNCATED, VIN, "undecodable"),
        (
            "find_my_car",
            state(),
            command_pb2.Command(request_id="req-1", command="unlock").SerializeToString(),
            VIN,
            "command_mismatch",
        ),
        ("find_my_car", state(), None, "WVWZZZ1JZXW00000O", "invalid_vin"),
        ("find_my_car", state(), None, f"{VIN}\n", "invalid_vin"),
    ],
)
def test_command_refusals(
    name: str, st: VehicleState | None, payload: bytes | None, vin: str, reason: str
) -> None:
    d = command(name, st, payload=payload, vin=vin)
    assert not d.accepted
    assert d.reason == reason
    assert d.forward_topic is None and d.forward_payload is None and d.state is None
    assert d.result_topic == f"tsp/{vin}/cmd/{name}/result"
    result = command_pb2.CommandResult.FromString(d.result_payload)
    assert not result.accepted
    assert result.reason == reason
    assert result.command == name
    assert result.request_id == ("" if reason == "undecodable" else "req-1")


@pytest.mark.parametrize(
    "topic",
    [
        f"tsp/{VIN}/cmd/find_my_car/result",
        f"tsp/{VIN}/tbox/status",
        f"tsp/{VIN}/cmd",
        f"vehicle/{VIN}/cmd/find_my_car",
        f"tsp/{VIN}/xcmd/lock",
    ],
)
def test_non_command_topics_are_not_commands(topic: str) -> None:
    payload = command_pb2.Command(command="lock").SerializeToString()
    assert decide_command(CTX, topic, payload, {VIN: state()}, NOW) is None


def test_custom_prefixes() -> None:
    ctx = DecisionContext(POLICY, KEY, vehicle_prefix="fleet/v1/cars", backend_prefix="b/e")
    payload = sample("tbox/status").SerializeToString()
    fwd = forwarded(
        decide(ctx, f"fleet/v1/cars/{VIN}/tbox/status", payload, {VIN: state()}, {}, NOW)
    )
    assert fwd.topic == f"b/e/{VIN}/tbox/status"
    d = decide_command(
        ctx,
        f"b/e/{VIN}/cmd/lock",
        command_pb2.Command(command="lock").SerializeToString(),
        {VIN: state()},
        NOW,
    )
    assert d is not None and d.accepted
    assert d.forward_topic == f"fleet/v1/cars/{VIN}/cmd/lock"
    assert d.result_topic == f"b/e/{VIN}/cmd/lock/result"


@pytest.mark.parametrize("revision", [2**63, 2**64 - 1])
def test_unstorable_revision_is_refused(revision: int) -> None:
    # A uint64 revision the consent store cannot hold must never reach it.
    d = dropped(apply(settings_payload(revision)), DropReason.UNDECODABLE)
    assert d.detail == "revision out of range"


def test_largest_storable_revision_applies() -> None:
    assert isinstance(apply(settings_payload(2**63 - 1)), ApplySettings)


# ------------------------------------------------------------- robustness

any_stream = st.sampled_from([*STREAMS, "avn/privacy", "avn/app/x-1", "tbox/other"])
any_state = st.sampled_from(
    [
        None,
        state(),
        state(location=LocationMode.APPROXIMATE, window_until=open_window()),
        state(privacy_mode=True),
    ]
)


@settings(max_examples=200, deadline=None)
@given(stream=any_stream, payload=st.binary(max_size=200), st_=any_state)
def test_arbitrary_payloads_never_raise_or_leak(
    stream: str, payload: bytes, st_: VehicleState | None
) -> None:
    states = {VIN: st_} if st_ is not None else {}
    d = decide(CTX, f"vehicle/{VIN}/{stream}", payload, states, {}, NOW)
    assert isinstance(d, Forward | Drop | ApplySettings)
    if isinstance(d, Forward) and stream != "tbox/ecall":
        assert st_ is not None and not st_.privacy_mode


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from([*COMMANDS, "nope"]), payload=st.binary(max_size=100), st_=any_state)
def test_arbitrary_commands_never_raise(
    name: str, payload: bytes, st_: VehicleState | None
) -> None:
    states = {VIN: st_} if st_ is not None else {}
    d = decide_command(CTX, f"tsp/{VIN}/cmd/{name}", payload, states, NOW)
    assert d is not None
    result = command_pb2.CommandResult.FromString(d.result_payload)
    assert result.accepted == d.accepted and result.reason == d.reason
    if d.accepted:
        assert st_ is not None and not st_.privacy_mode


def test_an_off_for_a_feature_the_policy_does_not_know_yet_survives_a_policy_that_adds_it() -> None:
    """The car's screen already shows a feature the running policy lacks and the
    driver switched it off; a later policy adds it on by default. The stored
    snapshot must still say no (rule 8: a withdrawal always holds)."""
    src = (ROOT / "config" / "policy.yaml").read_text()
    version = POLICY.version
    later = parse_policy(
        src.replace(f'version: "{version}"', f'version: "{version}.1"').replace(
            "  ecall:\n    legal_basis: legal_obligation",
            "  driving_analytics:\n    legal_basis: legitimate_interest\n    default: true\n"
            "    description: x\n  ecall:\n    legal_basis: legal_obligation",
        )
    )
    assert "driving_analytics" in later.default_on  # the new policy really turns it on
    kept = kept_features(POLICY, {"remote_control": True, "driving_analytics": False})
    assert kept["driving_analytics"] is False
    snapshot = SettingsSnapshot(VIN, 3, False, LocationMode.APPROXIMATE, kept, 0.0, version)
    assert "driving_analytics" not in state_from_snapshot(later, snapshot).enabled
    # Bounded: a car cannot grow its stored snapshot with made-up offs.
    many = kept_features(POLICY, {f"made_up_{i:04d}": False for i in range(1000)})
    assert len(many) <= 40


def test_a_topic_naming_a_stored_subject_is_not_a_vehicle() -> None:
    """After a restart the service keeps a car not seen since under its
    subject (a keyed hash), in the same states map the decision reads. A
    message whose topic names that subject is no car's: dropped as an invalid
    VIN, never decided under the car's settings (nor published under the
    subject, which no backend may learn)."""
    from gateway.core.identity import subject as subject_of

    subject = subject_of(KEY, VIN)
    msg = sample("tbox/status", vin=subject)
    decision = decide(
        CTX,
        f"vehicle/{subject}/tbox/status",
        msg.SerializeToString(),
        {subject: state({"remote_control": True})},
        {},
        NOW,
    )
    dropped(decision, DropReason.INVALID_VIN)


def test_user_properties_are_remembered_per_feature_and_transforms_and_bounded() -> None:
    """The plain path's user properties come from a memo keyed by stream, route,
    feature and transforms: each call gets what `_properties` builds for exactly
    its arguments, and the memo stays bounded whatever features cars name
    (per-app features come from topics)."""
    decide_module = importlib.import_module("gateway.core.decide")  # not the function
    ctx = DecisionContext(POLICY, KEY)
    route = POLICY.route("tbox/status")
    assert route is not None
    stream = route[0]
    target = stream.plain_route or stream.routes[0]
    for i in range(6000):
        feature = f"third_party.app{i}"
        transforms = ("coarsen:position",) if i % 2 else ()
        got = ctx.properties(stream, feature, transforms, target)
        assert got == decide_module._properties(POLICY, stream, feature, transforms, target)
        assert dict(got)["feature"] == feature
        assert dict(got)["transforms"] == ",".join(transforms)
    assert 0 < len(ctx._properties_memo) <= decide_module._MEMO_ENTRIES
    # A policy swap (the service replaces its context so) starts with its own memo.
    swapped = dataclasses.replace(ctx, policy=POLICY)
    assert swapped._properties_memo is not ctx._properties_memo
    assert not swapped._properties_memo


def test_routes_are_remembered_and_bounded_and_unknown_topics_are_not() -> None:
    """The context remembers the policy's route per topic: the same answer as
    the policy for every topic, bounded whatever app ids cars send, nothing
    remembered for a topic no stream has, and a new memo with a new policy."""
    decide_module = importlib.import_module("gateway.core.decide")
    ctx = DecisionContext(POLICY, KEY)
    topics = ["tbox/status", "avn/nav", "tbox/nope", "avn/app/x/y", "avn/app/bad id"]
    topics += [f"avn/app/app{i}" for i in range(6000)]
    for _ in range(2):
        for relative in topics:
            assert ctx.route(relative) == POLICY.route(relative), relative
    assert 0 < len(ctx._routes_memo) <= decide_module._MEMO_ENTRIES
    assert not {"tbox/nope", "avn/app/x/y", "avn/app/bad id"} & set(ctx._routes_memo)
    assert ctx.route("avn/app/app5999") == (POLICY.route("avn/app/app5999"))
    swapped = dataclasses.replace(ctx, policy=POLICY)
    assert not swapped._routes_memo


def test_the_inline_topic_split_agrees_with_split_vehicle_topic() -> None:
    """`decide` splits the topic inline (hot path); the rest of the gateway
    calls `split_vehicle_topic`. Both must refuse exactly the same topics."""
    segments = ["", "vehicle", "vehicles", "v", VIN, "tbox", "status", "a", "b"]
    for prefix in ("vehicle", "v", "a/b", ""):
        ctx = DecisionContext(POLICY, KEY, vehicle_prefix=prefix)
        topics = {
            "",
            "/",
            "//",
            prefix,
            f"{prefix}/",
            f"{prefix}//x",
            f"{prefix}x/{VIN}/tbox/status",
        }
        for n in range(1, 5):
            for parts in itertools.product(segments, repeat=n):
                topics.add("/".join(parts))
        for topic in topics:
            got = decide(ctx, topic, b"", {}, {}, NOW)
            refused = (
                isinstance(got, Drop)
                and got.reason is DropReason.UNKNOWN_TOPIC
                and got.vin == ""
                and got.detail == topic
            )
            assert refused == (split_vehicle_topic(prefix, topic) is None), (prefix, topic)
