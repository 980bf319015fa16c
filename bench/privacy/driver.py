"""The one place the privacy benchmark touches the decision core.

Everything else in bench.privacy works on what a backend subscribed to
`tsp/#` receives (`WireMessage`: topic, payload, user properties, arrival on
the gateway clock). When the core's signatures change (settings history and
parked messages, per-car location anchors on the gateway clock, find-my-car
request ids and hourly caps), only this module follows:

- `Gateway.vehicle_message`: one vehicle message in, what reaches the backend out
  (`decide(ctx, topic, payload, states, anchors, now, histories=...)`, keeping
  anchors, capture-time settings intervals and parked messages as the service
  does);
- `Gateway.command`: one backend command in, its result out (`decide_command`);
- `Gateway.settings_allow`: the car's applied settings, for the weakened
  variants that emulate a v1 rule themselves (find-my-car without limits);
- `stamp_header`: fills `Header` (settings_revision only where the schema has it);
- `find_my_car_cap`, `side_field_step_km`: policy values the targets use.

The gateway clock is simulated: `now` is seconds on the gateway's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from gateway.core import (
    ApplySettings,
    DecisionContext,
    Drop,
    Forward,
    Hold,
    LocationAnchor,
    LocationMode,
    VehicleState,
    decide,
    decide_command,
)
from gateway.core.capture import CaptureHistory, Interval, append
from gateway.policy import CompiledPolicy, CompiledStream, load_policy
from telematics.v1 import command_pb2, common_pb2

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "config" / "policy.yaml"
# The operator key of the simulated gateway: the adversary never sees it.
BENCH_KEY = bytes(range(100, 132))
# Contract rule 17 leaves the hourly cap to the operator; until the policy
# states one, targets use this (a person looking for their car a few times).
DEFAULT_FIND_MY_CAR_CAP_PER_HOUR = 4
HEADER_HAS_REVISION = "settings_revision" in common_pb2.Header.DESCRIPTOR.fields_by_name
CAPTURE_INTERVALS = 32  # [limits] capture_intervals_per_vehicle, default


@dataclass(frozen=True, slots=True)
class WireMessage:
    """One message as the backend receives it."""

    t: float  # arrival, gateway clock (s)
    topic: str
    payload: bytes
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one vehicle message did: forwarded (maybe later), dropped or applied."""

    wire: tuple[WireMessage, ...]
    dropped: str = ""  # drop reason, "" when forwarded or settings


def stamp_header(
    message: Message, vin: str, seq: int, timestamp_ms: int, settings_revision: int
) -> None:
    header: common_pb2.Header = message.header  # type: ignore[attr-defined]
    header.vin = vin
    header.seq = seq
    header.timestamp_ms = timestamp_ms
    if HEADER_HAS_REVISION and settings_revision:
        setattr(header, "settings_revision", settings_revision)  # noqa: B010


def clear_capture_metadata(message: Message) -> None:
    """What a gateway checking consent at arrival only would look at: nothing."""
    header: common_pb2.Header = message.header  # type: ignore[attr-defined]
    header.timestamp_ms = 0
    if HEADER_HAS_REVISION:
        header.ClearField("settings_revision")


def find_my_car_cap(policy: CompiledPolicy) -> int:
    """Find-my-car commands a car accepts per hour (contract rule 17)."""
    for name in ("max_per_hour", "commands_per_hour", "max_commands_per_hour"):
        value = getattr(policy.document.find_my_car, name, None)
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return DEFAULT_FIND_MY_CAR_CAP_PER_HOUR


def side_field_step_km(policy: CompiledPolicy) -> float | None:
    """The policy's trip-distance step under approximate (rule 14), None when
    the policy forwards it exact."""
    return trip_field_step(policy, "distance_km")


def trip_field_step(policy: CompiledPolicy, name: str) -> float | None:
    """The policy's step for a `tbox/trip` field (public: the published policy
    says it), None when the field passes exact."""
    route = policy.route("tbox/trip")
    if route is None:
        return None
    steps = dict(getattr(route[0], "generalize_fields", ()))
    step = steps.get(name)
    return float(step) if step else None


class Gateway:
    """The real decision core with its per-car state, in process."""

    def __init__(self, policy: CompiledPolicy | None = None, key: bytes = BENCH_KEY) -> None:
        self.policy = policy if policy is not None else load_policy(POLICY)
        self.ctx = DecisionContext(policy=self.policy, key=key)
        self.states: dict[str, VehicleState] = {}
        self.anchors: dict[str, LocationAnchor] = {}
        self.histories: dict[str, CaptureHistory] = {}
        # Messages stating a revision not applied yet (rule 12), per car:
        # (revision, topic, payload), released when that revision is applied.
        self.parked: dict[str, list[tuple[int, str, bytes]]] = {}

    def stream(self, relative: str) -> CompiledStream | None:
        route = self.policy.route(relative)
        return None if route is None else route[0]

    def vehicle_message(self, topic: str, payload: bytes, now: float) -> Outcome:
        decision = decide(
            self.ctx, topic, payload, self.states, self.anchors, now, histories=self.histories
        )
        if isinstance(decision, Forward):
            if decision.state is not None:  # a find-my-car fix spent its command
                self.states[decision.vin] = decision.state
            if decision.anchor is not None:
                self.anchors[decision.vin] = decision.anchor
            return Outcome(
                (WireMessage(now, decision.topic, decision.payload, decision.user_properties),)
            )
        if isinstance(decision, Hold):
            self.parked.setdefault(decision.vin, []).append((decision.revision, topic, payload))
            return Outcome((), dropped="parked")
        if isinstance(decision, ApplySettings):
            vin, revision = decision.snapshot.vin, decision.snapshot.revision
            self.states[vin] = decision.state
            self.histories[vin] = append(
                self.histories.get(vin),
                Interval(revision, revision, decision.snapshot.applied_at, decision.state),
                CAPTURE_INTERVALS,
            )
            # Parked messages of this revision or older are decided now, in order.
            released: list[WireMessage] = []
            waiting = []
            for stated, parked_topic, parked_payload in self.parked.pop(vin, []):
                if stated <= revision:
                    released.extend(self.vehicle_message(parked_topic, parked_payload, now).wire)
                else:
                    waiting.append((stated, parked_topic, parked_payload))
            if waiting:
                self.parked[vin] = waiting
            return Outcome(tuple(released))
        assert isinstance(decision, Drop)
        return Outcome((), dropped=decision.reason.value)

    def command(
        self, vin: str, name: str, request_id: str, now: float
    ) -> tuple[bool, str, WireMessage | None]:
        """(accepted, reason, the command as forwarded to the car or None)."""
        command = command_pb2.Command(
            request_id=request_id, command=name, issued_at_ms=int(now * 1000)
        )
        decision = decide_command(
            self.ctx, f"tsp/{vin}/cmd/{name}", command.SerializeToString(), self.states, now
        )
        if decision is None:
            return False, "not_a_command", None
        if decision.state is not None:
            self.states[vin] = decision.state
        forwarded = None
        if decision.accepted and decision.forward_topic and decision.forward_payload:
            forwarded = WireMessage(now, decision.forward_topic, decision.forward_payload)
        return decision.accepted, decision.reason, forwarded

    def settings_allow(self, vin: str, feature: str) -> LocationMode | None:
        """The car's applied settings (weakened variants emulate v1 rules on
        them): None when `feature` may not pass, else the location mode."""
        state = self.states.get(vin)
        if state is None or state.restricted or state.privacy_mode:
            return None
        if feature not in state.enabled:
            return None
        return state.location.effective
