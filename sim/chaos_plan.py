"""What a chaos run does, and when: a pure function of the seed and the run's size.

`make_plan` lays out the faults on the fleet's wall clock and `augment`
adds the chaos traffic to the fleet's scenario (so the ground truth knows
every message, and the checker judges it like any other):

- eCalls at a steady pace from random cars, to measure the eCall lane;
- app messages just under the backend broker's packet limit, from cars whose
  settings allow the app at that moment: pseudonymization (a longer topic
  ref, user properties) pushes them over the limit on the gateway's egress;
- settings floods: a few cars send dozens of revisions back to back; the last
  one restores the settings the car had, so the rest of its scenario holds
  (its later revisions are renumbered above the flood).

Infrastructure faults (gateway kill -9, backend ACL refusals, backend outage,
vehicle-side broker restart) take turns, one at a time, in a seeded order;
fake-VIN floods are placed independently and may overlap them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from sim import identifiers
from sim.contract import PASS, decide_message
from sim.model import PURPOSE_TELEMETRY, PublishEvent, Settings, SettingsEvent
from sim.policy import Policy
from sim.scenario import Scenario, VehicleScenario, _change_settings, geo_point
from telematics.v1 import streams_pb2

KILL = "gateway_kill"
ACL_DENY = "backend_acl_deny"
BACKEND_OUTAGE = "backend_outage"
VEHICLE_RESTART = "vehicle_broker_restart"
# Faults 1, 3 and 4 at once (opt-in): the gateway is killed and restarted while the
# backend broker is down, and near-limit messages are decided before it is back.
KILL_IN_OUTAGE = "gateway_kill_in_backend_outage"
FAKE_VIN_FLOOD = "fake_vin_flood"
SETTINGS_FLOOD = "settings_flood"
OVERSIZED = "oversized_app_message"
INFRA_FAULTS = (KILL, ACL_DENY, BACKEND_OUTAGE, VEHICLE_RESTART, KILL_IN_OUTAGE)
# Streams an ACL window may deny: frequent ones, so the window refuses something.
ACL_CANDIDATES = ("tbox/status", "tbox/connectivity", "tbox/battery", "avn/nav", "tbox/trip")
PACKET_LIMIT = 4096  # the backend broker's max_packet_size; ordinary messages stay far below
OVERSIZE_MARGIN = 48  # the car's packet is this far under the limit; egress grows by ~130+
FAKE_VIN_SERIAL_BASE = 500_000  # fleet VINs use serials from 100000: no collision


@dataclass(frozen=True)
class ChaosProfile:
    vehicles: int
    duration_s: float  # simulated
    speedup: float
    kills: int
    acl_windows: int
    backend_outages: int
    vehicle_restarts: int
    settings_flood_cars: int
    flood_revisions: int
    fake_vin_floods: int
    fake_vins: int  # per flood
    oversized: int  # near-limit app messages in the run
    ecall_every_s: float  # wall seconds between injected eCalls
    acl_window_s: float
    outage_s: float
    vehicle_down_s: float
    kills_in_outage: int = 0  # KILL_IN_OUTAGE faults (opt-in: `sim chaos --compound`)

    @property
    def wall_s(self) -> float:
        return self.duration_s / self.speedup


SHORT = ChaosProfile(
    vehicles=12,
    duration_s=3 * 3600,
    speedup=240,  # 45 s of fleet time
    kills=2,
    acl_windows=1,
    backend_outages=1,
    vehicle_restarts=1,
    settings_flood_cars=2,
    flood_revisions=40,
    fake_vin_floods=1,
    fake_vins=2000,
    oversized=8,
    ecall_every_s=1.0,
    acl_window_s=5.0,
    outage_s=4.0,
    vehicle_down_s=2.0,
)
LONG = ChaosProfile(
    vehicles=30,
    duration_s=10 * 3600,
    speedup=100,  # 6 minutes of fleet time
    kills=6,
    acl_windows=3,
    backend_outages=3,
    vehicle_restarts=2,
    settings_flood_cars=4,
    flood_revisions=100,
    fake_vin_floods=2,
    fake_vins=5000,
    oversized=40,
    ecall_every_s=1.5,
    acl_window_s=12.0,
    outage_s=8.0,
    vehicle_down_s=3.0,
)


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float  # planned start, wall seconds after the fleet's clock started
    duration_s: float = 0.0
    stream: str = ""  # ACL_DENY: the denied stream
    count: int = 0  # FAKE_VIN_FLOOD: how many made-up VINs

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", 0)}


@dataclass
class ChaosPlan:
    seed: int
    profile: ChaosProfile
    faults: list[Fault]
    packet_limit: int = PACKET_LIMIT
    # Filled in by augment(): what was added to the scenario.
    settings_floods: list[dict[str, object]] = field(default_factory=list)
    oversized: list[dict[str, object]] = field(default_factory=list)
    ecalls: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for fault in self.faults if fault.kind == kind)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "profile": dataclasses.asdict(self.profile),
            "packet_limit": self.packet_limit,
            "faults": [fault.to_json() for fault in self.faults],
            "settings_floods": self.settings_floods,
            "oversized_app_messages": self.oversized,
            "injected_ecalls": self.ecalls,
        }


def settings_at(vehicle: VehicleScenario, t_ms: int) -> Settings | None:
    """The settings the car has sent last by `t_ms` (None: none yet). Of events at the
    same time the later one in the list counts, as the fleet's stable sort keeps them."""
    best: SettingsEvent | None = None
    for event in vehicle.events:
        if (
            isinstance(event, SettingsEvent)
            and event.t_ms <= t_ms
            and (best is None or event.t_ms >= best.t_ms)
        ):
            best = event
    return None if best is None else best.settings


def make_plan(seed: int, profile: ChaosProfile, scenario: Scenario, policy: Policy) -> ChaosPlan:
    rng = random.Random(f"chaos:{seed}")
    wall = profile.wall_s
    first, last = 0.12 * wall, 0.80 * wall
    kinds = (
        [KILL] * profile.kills
        + [ACL_DENY] * profile.acl_windows
        + [BACKEND_OUTAGE] * profile.backend_outages
        + [VEHICLE_RESTART] * profile.vehicle_restarts
        + [KILL_IN_OUTAGE] * profile.kills_in_outage
    )
    rng.shuffle(kinds)
    faults: list[Fault] = []
    slot = (last - first) / max(len(kinds), 1)
    for n, kind in enumerate(kinds):
        at = first + n * slot + rng.uniform(0, 0.25) * slot
        if kind == ACL_DENY:
            duration = min(profile.acl_window_s, 0.7 * slot)
            stream = _busiest_stream(rng, scenario, policy, profile, at, duration)
            faults.append(Fault(kind, round(at, 2), round(duration, 2), stream=stream))
        elif kind in (BACKEND_OUTAGE, KILL_IN_OUTAGE):
            faults.append(Fault(kind, round(at, 2), round(min(profile.outage_s, 0.6 * slot), 2)))
        elif kind == VEHICLE_RESTART:
            duration = min(profile.vehicle_down_s, 0.5 * slot)
            faults.append(Fault(kind, round(at, 2), round(duration, 2)))
        else:
            faults.append(Fault(kind, round(at, 2)))
    for _ in range(profile.fake_vin_floods):
        at = rng.uniform(first, last)
        faults.append(Fault(FAKE_VIN_FLOOD, round(at, 2), count=profile.fake_vins))
    faults.sort(key=lambda fault: fault.at_s)
    return ChaosPlan(seed, profile, faults)


def _sim_ms(scenario: Scenario, profile: ChaosProfile, wall_offset_s: float) -> int:
    return scenario.sim_start_ms + int(wall_offset_s * profile.speedup * 1000)


def _busiest_stream(
    rng: random.Random,
    scenario: Scenario,
    policy: Policy,
    profile: ChaosProfile,
    at_s: float,
    duration_s: float,
) -> str:
    """A stream the fleet will send (and the policy let through) during the window:
    chosen at random among the busiest, weighted by how many such messages the
    scenario has then."""
    start = _sim_ms(scenario, profile, at_s)
    end = _sim_ms(scenario, profile, at_s + duration_s)
    counts: Counter[str] = Counter()
    for vehicle in scenario.vehicles:
        for event in vehicle.events:
            if (
                isinstance(event, PublishEvent)
                and start <= event.t_ms < end
                and event.stream in ACL_CANDIDATES
                and event.purpose == PURPOSE_TELEMETRY
                and decide_message(policy, event.stream, settings_at(vehicle, event.t_ms), False)
                == PASS
            ):
                counts[event.stream] += 1
    if not counts:
        return ACL_CANDIDATES[0]
    # Only busy ones: a window that refuses nothing would test nothing.
    busiest = max(counts.values())
    streams = sorted(s for s, n in counts.items() if 2 * n >= busiest)
    return rng.choices(streams, weights=[counts[s] for s in streams])[0]


def augment(plan: ChaosPlan, scenario: Scenario, policy: Policy) -> None:
    """Add the chaos traffic to `scenario` (in place)."""
    rng = random.Random(f"chaos-traffic:{plan.seed}")
    profile = plan.profile
    wall = profile.wall_s
    vehicles = scenario.vehicles
    # eCalls at a steady pace, from random cars (known or not: eCall always passes).
    t = 0.03 * wall
    while t < 0.95 * wall:
        vehicle = rng.choice(vehicles)
        _add_ecall(rng, vehicle, _sim_ms(scenario, profile, t))
        plan.ecalls += 1
        t += profile.ecall_every_s * rng.uniform(0.6, 1.4)
    # Near-limit app messages from cars whose settings let the app through.
    for n in range(profile.oversized):
        at = wall * (0.05 + 0.85 * (n + rng.random()) / max(profile.oversized, 1))
        t_ms = _sim_ms(scenario, profile, at)
        added = _add_oversized(rng, vehicles, t_ms, plan.packet_limit, policy)
        if added is not None:
            plan.oversized.append({"vin": added[0], "app": added[1], "at_s": round(at, 2)})
    # A restart during a backend outage gets near-limit messages while the backend is away.
    for fault in plan.faults:
        if fault.kind == KILL_IN_OUTAGE:
            for share in (0.4, 0.7):
                at = fault.at_s + share * fault.duration_s
                added = _add_oversized(
                    rng, vehicles, _sim_ms(scenario, profile, at), plan.packet_limit, policy
                )
                if added is not None:
                    plan.oversized.append(
                        {"vin": added[0], "app": added[1], "at_s": round(at, 2)}
                    )
    # Settings floods from a few cars that have settings by then.
    for _ in range(profile.settings_flood_cars):
        at = rng.uniform(0.15 * wall, 0.8 * wall)
        t_ms = _sim_ms(scenario, profile, at)
        candidates = [
            v
            for v in vehicles
            if settings_at(v, t_ms) is not None
            and v.vin not in {str(f["vin"]) for f in plan.settings_floods}
        ]
        if not candidates:
            continue
        vehicle = rng.choice(candidates)
        _add_settings_flood(rng, vehicle, t_ms, profile.flood_revisions)
        plan.settings_floods.append(
            {"vin": vehicle.vin, "at_s": round(at, 2), "revisions": profile.flood_revisions}
        )
    for vehicle in vehicles:
        vehicle.events.sort(key=lambda event: event.t_ms)


def _add_ecall(rng: random.Random, vehicle: VehicleScenario, t_ms: int) -> None:
    vehicle.events.append(
        PublishEvent(
            t_ms,
            "tbox",
            "tbox/ecall",
            streams_pb2.ECall(
                trigger=rng.choice((streams_pb2.ECALL_MANUAL, streams_pb2.ECALL_AUTOMATIC)),
                position=geo_point(vehicle.trajectory.at(t_ms), rng),
                recent_positions=[
                    geo_point(vehicle.trajectory.at(t_ms - lag), rng)
                    for lag in (30_000, 20_000, 10_000)
                ],
                passengers=rng.randint(1, 4),
                vehicle_type="M1",
                propulsion="electric",
            ),
        )
    )


def _add_oversized(
    rng: random.Random,
    vehicles: list[VehicleScenario],
    t_ms: int,
    limit: int,
    policy: Policy,
) -> tuple[str, str] | None:
    candidates: list[tuple[VehicleScenario, str]] = []
    for vehicle in vehicles:
        settings = settings_at(vehicle, t_ms)
        for app in ("music", "weather", "podcast"):
            if decide_message(policy, f"avn/app/{app}", settings, False) == PASS:
                candidates.append((vehicle, app))
    if not candidates:
        return None
    vehicle, app = rng.choice(candidates)
    nonce = identifiers.make_token(rng, 24)
    topic_len = len(f"vehicle/{vehicle.vin}/avn/app/{app}")
    # PUBLISH: fixed header (1 + 2 length bytes), topic (2 + n), packet id (2),
    # properties length (1, MQTT 5): the car's packet ends OVERSIZE_MARGIN under the limit.
    target = limit - OVERSIZE_MARGIN - (1 + 2 + 2 + topic_len + 2 + 1)
    message = _sized_app_message(app, nonce, vehicle.vin, t_ms, target)
    vehicle.events.append(
        PublishEvent(t_ms, "avn", f"avn/app/{app}", message, nonce=nonce)
    )
    return vehicle.vin, app


def _sized_app_message(
    app: str, nonce: str, vin: str, t_ms: int, target: int
) -> streams_pb2.AppTraffic:
    """An AppTraffic whose serialized size (with a typical header) is `target` bytes."""
    blob = 0
    for _ in range(8):
        body = json.dumps({"nonce": nonce, "event": "bulk_sync", "blob": "x" * blob}).encode()
        message = streams_pb2.AppTraffic(
            app_id=app, content_type="application/json", payload=body
        )
        probe = streams_pb2.AppTraffic()
        probe.CopyFrom(message)
        probe.header.vin = vin
        probe.header.seq = 1000
        probe.header.timestamp_ms = t_ms
        size = len(probe.SerializeToString())
        if size == target:
            break
        blob = max(0, blob + target - size)
    return message


def _add_settings_flood(
    rng: random.Random, vehicle: VehicleScenario, t_ms: int, revisions: int
) -> None:
    before = settings_at(vehicle, t_ms)
    assert before is not None
    flood: list[Settings] = []
    current = before
    for n in range(1, revisions):
        changed = _change_settings(rng, current)
        current = dataclasses.replace(changed, revision=before.revision + n)
        flood.append(current)
    last = dataclasses.replace(before, revision=before.revision + revisions)
    # Later revisions of this car move up above the flood; their content is unchanged.
    events = []
    for event in vehicle.events:
        if isinstance(event, SettingsEvent) and event.t_ms > t_ms:
            event = SettingsEvent(
                event.t_ms,
                dataclasses.replace(event.settings, revision=event.settings.revision + revisions),
                tuple(
                    dataclasses.replace(s, revision=s.revision + revisions) for s in event.flood
                ),
            )
        events.append(event)
    events.append(SettingsEvent(t_ms, last, tuple(flood)))
    vehicle.events = events
