"""The designs under attack: the real core, and deliberately weakened ones.

Weakened variants are emulated here, around the real core (which still makes
every consent decision and every other transform); nothing in the gateway or
its configuration can be switched to behave like them.

- `real`: the decision core as it is, default policy.
- `v1`: the contract-v1 gateway that the 2026-11 attacks beat:
  * approximate value = centre of the grid cell that contains the truth (no
    secret per-car shift), refreshed at most once per interval measured on the
    car's timestamps (so a car whose clocks disagree or jump resets it);
  * odometer, trip distance, duration and average speed forwarded exact;
  * consent checked at arrival only (capture time and stated revision ignored);
  * find-my-car: every command the core does not refuse for its settings
    opens a window (policy length) in which every fix passes under the
    location mode, no per-command limit and no hourly cap (emulated here on
    the car's applied settings, so the core's rule-17 checks never apply).
- `noise`: approximate value = truth plus fresh random noise of up to half a
  cell per axis on every report (not sticky): the averaging pitfall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from google.protobuf.message import Message

from bench.privacy.driver import (
    Gateway,
    Outcome,
    WireMessage,
    clear_capture_metadata,
)
from bench.privacy.fleet import CarEvent
from gateway.core import LocationMode
from gateway.core.transforms import GridOffset, coarsen_position
from gateway.policy import CompiledPolicy, CompiledStream
from telematics.v1 import command_pb2, common_pb2

NO_SHIFT = GridOffset(0.5, 0.5)  # fractions 0.5 map to a zero shift: the cell centre
SIDE_FIELDS = {
    "tbox/status": ("odometer_km",),
    "tbox/trip": ("distance_km", "duration_s", "average_speed_kmh", "odometer_km", "energy_kwh"),
}
# Refusals that exist only to enforce contract rule 17 (v1 would have accepted).
RULE_17_REFUSALS = ("rate_limited", "find_my_car_limit")


class Variant:
    name = "real"
    description = "the decision core as it is, default policy"

    def __init__(self, policy: CompiledPolicy | None = None) -> None:
        self.gateway = Gateway(policy)
        self.policy = self.gateway.policy

    def vehicle(self, vin: str, event: CarEvent, now: float) -> Outcome:
        return self.gateway.vehicle_message(f"vehicle/{vin}/{event.relative}", event.payload, now)

    def command(
        self, vin: str, name: str, request_id: str, now: float
    ) -> tuple[bool, str, WireMessage | None]:
        return self.gateway.command(vin, name, request_id, now)


def _approximated(gateway: Gateway, vin: str, stream: CompiledStream, out: Message) -> list[str]:
    """GeoPoint fields the core forwarded under approximate location (the
    weakened designs replace them with their own value)."""
    if stream.legal_obligation or gateway.settings_allow(vin, stream.feature) is not (
        LocationMode.APPROXIMATE
    ):
        return []
    return [g.name for g in stream.geo_fields if not g.repeated and out.HasField(g.name)]


@dataclass
class _Anchor:
    car_ms: int
    latitude: float
    longitude: float


class V1Variant(Variant):
    name = "v1"
    description = (
        "contract v1: cell centre, refresh on car time, exact odometer and trip figures,"
        " consent at arrival only, find-my-car without limits"
    )

    def __init__(self, policy: CompiledPolicy | None = None) -> None:
        super().__init__(policy)
        self.anchors: dict[str, _Anchor] = {}
        self.windows: dict[str, float] = {}

    def vehicle(self, vin: str, event: CarEvent, now: float) -> Outcome:
        stream = self.gateway.stream(event.relative)
        if stream is None or event.relative == "avn/privacy":
            return super().vehicle(vin, event, now)
        original = stream.message_cls.FromString(event.payload)
        car_ms = original.header.timestamp_ms or int(now * 1000)  # type: ignore[attr-defined]
        if stream.requires_window:
            return self._v1_window(vin, event, stream, original, car_ms, now)
        blind = stream.message_cls.FromString(event.payload)
        clear_capture_metadata(blind)  # consent at arrival only
        outcome = self.gateway.vehicle_message(
            f"vehicle/{vin}/{event.relative}", blind.SerializeToString(), now
        )
        if not outcome.wire:
            return outcome
        wires = []
        for wire in outcome.wire:
            out = stream.message_cls.FromString(wire.payload)
            for name in _approximated(self.gateway, vin, stream, out):
                truth = getattr(original, name)
                if not truth.ByteSize():
                    continue
                is_position = any(g.name == name and g.is_position for g in stream.geo_fields)
                lat, lon = self._v1_value(vin, truth, car_ms, is_position)
                point: common_pb2.GeoPoint = getattr(out, name)
                point.Clear()
                point.latitude, point.longitude = lat, lon
                point.horizontal_accuracy_m = self.policy.cell_size_m
            for name in SIDE_FIELDS.get(event.relative, ()):
                setattr(out, name, getattr(original, name))
            out.header.timestamp_ms = original.header.timestamp_ms  # type: ignore[attr-defined]
            out.header.seq = original.header.seq  # type: ignore[attr-defined]  # v1: the car's
            wires.append(WireMessage(wire.t, wire.topic, out.SerializeToString(), wire.properties))
        return Outcome(tuple(wires), outcome.dropped)

    def _v1_window(
        self,
        vin: str,
        event: CarEvent,
        stream: CompiledStream,
        original: Message,
        car_ms: int,
        now: float,
    ) -> Outcome:
        """Contract v1 rule 10: inside a window every fix passes, under the
        location mode; nothing ties a fix to the command that opened it."""
        if self.windows.get(vin, 0.0) <= now:
            return Outcome((), dropped="no_find_my_car_window")
        mode = self.gateway.settings_allow(vin, stream.feature)
        if mode is None or mode is LocationMode.OFF:
            return Outcome((), dropped="v1_refused")
        done = []
        for geo in stream.geo_fields:
            point: common_pb2.GeoPoint = getattr(original, geo.name)
            if mode is LocationMode.APPROXIMATE and point.ByteSize():
                lat, lon = self._v1_value(vin, point, car_ms, geo.is_position)
                point.Clear()
                point.latitude, point.longitude = lat, lon
                point.horizontal_accuracy_m = self.policy.cell_size_m
                done.append(f"coarsen:{geo.name}")
        properties = (
            ("policy-version", self.policy.version),
            ("feature", stream.feature),
            ("legal-basis", stream.legal_basis),
            ("retention-days", str(stream.retention_days)),
            ("transforms", ",".join(done)),
        )
        topic = f"tsp/{vin}/{event.relative}"
        return Outcome((WireMessage(now, topic, original.SerializeToString(), properties),))

    def _v1_value(
        self, vin: str, truth: common_pb2.GeoPoint, car_ms: int, is_position: bool
    ) -> tuple[float, float]:
        if is_position:
            anchor = self.anchors.get(vin)
            if anchor is not None and abs(car_ms - anchor.car_ms) < self.policy.refresh_interval_ms:
                return anchor.latitude, anchor.longitude
        lat, lon = coarsen_position(
            truth.latitude, truth.longitude, self.policy.cell_size_m, NO_SHIFT
        )
        if is_position:
            self.anchors[vin] = _Anchor(car_ms, lat, lon)
        return lat, lon

    def command(
        self, vin: str, name: str, request_id: str, now: float
    ) -> tuple[bool, str, WireMessage | None]:
        accepted, reason, forwarded = self.gateway.command(vin, name, request_id, now)
        if not accepted and reason in RULE_17_REFUSALS:
            accepted, reason = True, "forwarded"
            command = command_pb2.Command(
                request_id=request_id, command=name, issued_at_ms=int(now * 1000)
            )
            forwarded = WireMessage(now, f"vehicle/{vin}/cmd/{name}", command.SerializeToString())
        if accepted and name == "find_my_car":
            self.windows[vin] = now + self.policy.window_s
        return accepted, reason, forwarded


class NoiseVariant(Variant):
    name = "noise"
    description = "truth plus fresh random noise (up to half a cell per axis) on every report"

    def __init__(self, policy: CompiledPolicy | None = None) -> None:
        super().__init__(policy)
        self.rng = random.Random(7)

    def vehicle(self, vin: str, event: CarEvent, now: float) -> Outcome:
        outcome = super().vehicle(vin, event, now)
        stream = self.gateway.stream(event.relative)
        if stream is None or not outcome.wire:
            return outcome
        original = stream.message_cls.FromString(event.payload)
        wires = []
        half_lat = self.policy.cell_size_m / 111_320.0 / 2
        half_lon = half_lat / 0.667  # Munich: cos(48.1 deg)
        for wire in outcome.wire:
            out: Message = stream.message_cls.FromString(wire.payload)
            for name in _approximated(self.gateway, vin, stream, out):
                truth = getattr(original, name)
                point: common_pb2.GeoPoint = getattr(out, name)
                point.latitude = truth.latitude + self.rng.uniform(-half_lat, half_lat)
                point.longitude = truth.longitude + self.rng.uniform(-half_lon, half_lon)
            wires.append(WireMessage(wire.t, wire.topic, out.SerializeToString(), wire.properties))
        return Outcome(tuple(wires), outcome.dropped)
