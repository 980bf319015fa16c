"""A lean, seeded fleet for the privacy attack benchmark.

Same world as the simulator (sim.world: Munich, street-grid routes from
`road_route`, places drawn with `random_point_near`), but only the streams the
attacks need plus a representative mix, and a cheap motion model (constant
speed per road segment, a pause per corner) so a thousand cars over a week
generate in seconds per hundred cars. Every car is a pure function of
(seed, index): the same arguments give the same bytes.

What each car publishes (vehicle side, before the gateway):
- tbox/status every 30 s while driving, every 15 min parked (position, odometer);
- avn/nav every 60 s on navigated trips (position, destination);
- tbox/trip at each arrival (start, end, distance, duration, odometer);
- tbox/battery while charging at a home wallbox; tbox/connectivity,
  tbox/digital_key and avn/app/music as background mix.

Ground truth (true places, trip ends, what each message was captured under)
is kept beside the events for scoring only; attacks never see it.
"""

from __future__ import annotations

import bisect
import calendar
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from bench.privacy.driver import stamp_header
from sim.geo import Point, distance_m, interpolate
from sim.vin import make_fleet_vins
from sim.world import CITY_CENTRE, random_point_near, road_route
from telematics.v1 import common_pb2, privacy_pb2, streams_pb2

# Monday 2 March 2026, 00:00 on the simulated clock (the city's local time).
START_MS = calendar.timegm((2026, 3, 2, 0, 0, 0)) * 1000
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
PUBLIC_PLACES = 160  # shops, gyms, restaurants, public chargers: known to everyone
LATENCY_MS = 40  # car -> gateway on a live connection

# Event kinds: live traffic, or a record the car captured under settings that
# did not allow it and uploads later (store-and-forward).
LIVE = "live"
SETTINGS = "settings"
LATE_PRIVACY = "late:privacy_mode"
LATE_FEATURE_OFF = "late:feature_off"
LATE_LOCATION_OFF = "late:location_off"

CLOCK_KINDS = ("honest", "avn_skew", "tbox_jumps")
FEATURE_OF = {
    "tbox/status": "remote_control",
    "tbox/connectivity": "remote_control",
    "tbox/trip": "energy_consumption",
    "tbox/battery": "charging",
    "tbox/digital_key": "digital_key",
    "tbox/location": "find_my_car",
    "avn/nav": "online_navigation",
    "avn/app/music": "third_party.music",
}
LOCATION_PURPOSE = {"avn/nav", "tbox/location"}


@dataclass(frozen=True, slots=True)
class PublicPlace:
    kind: str
    point: Point


@dataclass(frozen=True, slots=True)
class CarEvent:
    arrival_ms: int  # gateway clock
    relative: str  # topic below vehicle/{vin}/
    payload: bytes
    capture_ms: int  # true capture time (the car's clock may say otherwise)
    kind: str
    allowed: bool  # ground truth: the settings at capture and arrival let it pass


@dataclass(frozen=True, slots=True)
class TripTruth:
    trip_id: str
    start: Point
    end: Point
    distance_km: float
    duration_s: int
    end_ms: int


@dataclass
class CarTruth:
    vin: str
    home: Point
    work: Point
    location: int  # common_pb2.LocationMode for the week (outside late-data windows)
    clock: str
    late_data: bool
    features: dict[str, bool]
    revision: int = 1  # the car's settings revision at the end of the week
    states_revision: bool = True  # Header.settings_revision filled (contract v2 car)
    trips: list[TripTruth] = field(default_factory=list)
    # Arrival (ms) of each parked status at home at night: for the averaging attack.
    positions: dict[int, Point] = field(default_factory=dict)  # capture_ms -> true point


@dataclass
class Car:
    truth: CarTruth
    events: list[CarEvent]


def public_places(seed: int) -> list[PublicPlace]:
    rng = random.Random(f"privacy-places:{seed}")
    kinds = ("shop", "shop", "restaurant", "leisure", "charger")
    return [
        PublicPlace(kinds[n % len(kinds)], random_point_near(rng, CITY_CENTRE, 300, 15_000))
        for n in range(PUBLIC_PLACES)
    ]


def fleet_vins(seed: int, count: int) -> list[str]:
    return make_fleet_vins(random.Random(f"privacy-fleet:{seed}"), count)


@dataclass
class _Route:
    points: list[Point]
    cum_m: list[float]
    cum_s: list[float]

    @property
    def length_m(self) -> float:
        return self.cum_m[-1]

    @property
    def duration_s(self) -> float:
        return self.cum_s[-1]

    def at(self, elapsed_s: float) -> tuple[Point, float]:
        """(position, distance travelled in m) after `elapsed_s` on the road."""
        if elapsed_s <= 0:
            return self.points[0], 0.0
        if elapsed_s >= self.cum_s[-1]:
            return self.points[-1], self.cum_m[-1]
        i = bisect.bisect_right(self.cum_s, elapsed_s) - 1
        span = self.cum_s[i + 1] - self.cum_s[i]
        fraction = 0.0 if span <= 0 else (elapsed_s - self.cum_s[i]) / span
        moved = self.cum_m[i] + (self.cum_m[i + 1] - self.cum_m[i]) * fraction
        return interpolate(self.points[i], self.points[i + 1], fraction), moved


def _route(rng: random.Random, a: Point, b: Point, driver: float) -> _Route:
    points = road_route(rng, a, b)
    cum_m, cum_s = [0.0], [0.0]
    for p, q in itertools.pairwise(points):
        length = distance_m(p, q)
        kmh = (70.0 if length > 2500 else 45.0 if length > 800 else 30.0) * driver
        pause = rng.uniform(5, 40)  # corner, traffic light
        cum_m.append(cum_m[-1] + length)
        cum_s.append(cum_s[-1] + length / (kmh / 3.6) + pause)
    return _Route(points, cum_m, cum_s)


def _day_intents(
    rng: random.Random, day: int, midnight: int, home: Point, work: Point, errands: list[Point]
) -> list[tuple[int, Point, int]]:
    """(earliest departure ms, destination, minimum stay min) for one day."""
    out: list[tuple[int, Point, int]] = []
    if day % 7 < 5:
        leave = midnight + 7 * HOUR_MS + int(rng.uniform(0, 1.5) * HOUR_MS)
        if rng.random() < 0.3:
            out.append((leave, errands[0], 10))
        out.append((leave, work, 60))
        if rng.random() < 0.3:
            lunch = midnight + 12 * HOUR_MS + int(rng.uniform(0, 0.5) * HOUR_MS)
            out += [(lunch, errands[1], 35), (lunch, work, 60)]
        back = midnight + 16 * HOUR_MS + int(rng.uniform(0.5, 2.5) * HOUR_MS)
        if rng.random() < 0.4:
            out.append((back, rng.choice(errands), 20))
        out.append((back, home, 30))
    else:
        late = midnight + 10 * HOUR_MS + int(rng.uniform(0, 2) * HOUR_MS)
        out += [(late, rng.choice(errands), 60), (late, home, 30)]
    if rng.random() < 0.3:
        evening = midnight + 19 * HOUR_MS + int(rng.uniform(0.5, 1.5) * HOUR_MS)
        out += [(evening, rng.choice(errands[2:]), 60), (evening, home, 30)]
    return out


@dataclass(frozen=True, slots=True)
class _Window:
    start_ms: int
    end_ms: int
    kind: str
    revision: int  # revision in force inside the window


class _Builder:
    """Collects one car's events with its clocks, settings and buffering."""

    def __init__(self, rng: random.Random, truth: CarTruth) -> None:
        self.rng = rng
        self.truth = truth
        self.vin = truth.vin
        self.events: list[CarEvent] = []
        self.seq: dict[str, int] = {"tbox": 0, "avn": 0}
        self.skew_ms = 0
        if truth.clock == "avn_skew":
            self.skew_ms = rng.choice((-1, 1)) * rng.randint(30, 180) * MINUTE_MS
        self.tbox_jump_ms: int | None = 0  # None: the clock reports nothing
        self.revision = 1
        self.timeline: list[tuple[int, int]] = []  # (applied at ms, revision)
        self.windows: list[_Window] = []

    def car_time(self, unit: str, capture_ms: int) -> int:
        if unit == "avn":
            return capture_ms + self.skew_ms
        if self.truth.clock == "tbox_jumps":
            return 0 if self.tbox_jump_ms is None else capture_ms + self.tbox_jump_ms
        return capture_ms

    def new_trip_clock(self) -> None:
        if self.truth.clock == "tbox_jumps":
            # RTC not yet synchronised at ignition: off, or reporting nothing.
            self.tbox_jump_ms = self.rng.choice(
                (0, 0, -40 * MINUTE_MS, 25 * MINUTE_MS, 90 * MINUTE_MS, None)
            )

    def revision_at(self, capture_ms: int) -> int:
        """The revision the car was under when it captured a record."""
        index = bisect.bisect_right(self.timeline, (capture_ms, 2**62)) - 1
        return self.timeline[max(index, 0)][1] if self.timeline else 1

    def window_at(self, capture_ms: int) -> _Window | None:
        for window in self.windows:
            if window.start_ms <= capture_ms < window.end_ms:
                return window
        return None

    def publish(self, capture_ms: int, relative: str, message: Message) -> None:
        unit = relative.split("/", 1)[0]
        self.seq[unit] += 1
        window = self.window_at(capture_ms)
        kind, arrival, revision = LIVE, capture_ms + LATENCY_MS, self.revision_at(capture_ms)
        if window is not None and (
            window.kind != LATE_FEATURE_OFF or FEATURE_OF[relative] == "energy_consumption"
        ):
            # Captured under settings that do not allow it: buffered, uploaded
            # after the window closes, stating the revision it was captured under.
            kind, revision = window.kind, window.revision
            arrival = window.end_ms + 5 * MINUTE_MS + self.seq[unit] * 50
        stated = revision if self.truth.states_revision else 0
        stamp_header(message, self.vin, self.seq[unit], self.car_time(unit, capture_ms), stated)
        feature_on = self.truth.features.get(FEATURE_OF[relative], False)
        location_ok = relative not in LOCATION_PURPOSE or self.truth.location in (
            common_pb2.LOCATION_APPROXIMATE,
            common_pb2.LOCATION_PRECISE,
        )
        self.events.append(
            CarEvent(
                arrival,
                relative,
                message.SerializeToString(),
                capture_ms,
                kind,
                kind == LIVE and feature_on and location_ok,
            )
        )

    def settings(
        self, t_ms: int, *, privacy: bool = False, off: str = "", location: int = 0
    ) -> None:
        features = dict(self.truth.features)
        if off:
            features[off] = False
        message = privacy_pb2.PrivacySettings(
            revision=self.revision,
            privacy_mode=privacy,
            location=location or self.truth.location,  # type: ignore[arg-type]
            features=features,
        )
        stamp_header(message, self.vin, 0, t_ms, 0)
        self.timeline.append((t_ms, self.revision))
        self.events.append(
            CarEvent(
                t_ms + LATENCY_MS, "avn/privacy", message.SerializeToString(), t_ms, SETTINGS, False
            )
        )


def build_car(seed: int, index: int, vin: str, places: list[PublicPlace], days: int) -> Car:
    rng = random.Random(f"privacy-car:{seed}:{index}")
    home = random_point_near(rng, CITY_CENTRE, 2_000, 14_000)
    work = random_point_near(rng, CITY_CENTRE, 0, 9_000)
    nearby = sorted(places, key=lambda p: distance_m(p.point, home))[:12]
    errands = [p.point for p in rng.sample(nearby, 4)]
    location = rng.choices(
        (common_pb2.LOCATION_APPROXIMATE, common_pb2.LOCATION_PRECISE, common_pb2.LOCATION_OFF),
        (0.8, 0.1, 0.1),
    )[0]
    clock = rng.choices(CLOCK_KINDS, (0.7, 0.15, 0.15))[0]
    adversarial_clock = clock != "honest"
    features = {
        "remote_control": True,
        "find_my_car": True,
        "charging": True,
        "energy_consumption": True,
        "digital_key": True,
        "online_navigation": adversarial_clock or rng.random() < 0.8,
        "online_search": rng.random() < 0.5,
        "third_party.music": rng.random() < 0.5,
    }
    late = location != common_pb2.LOCATION_OFF and rng.random() < 0.15
    truth = CarTruth(vin, home, work, location, clock, late, features)
    # Half the cars with late data are contract-v1 cars: no stated revision,
    # capture known only from the timestamp.
    truth.states_revision = not late or rng.random() < 0.5
    b = _Builder(rng, truth)
    b.settings(START_MS + 1_000)
    if late:
        _late_windows(b, START_MS + days * DAY_MS)
    navigates = 1.0 if adversarial_clock else rng.uniform(0.2, 0.9)
    driver = rng.uniform(0.85, 1.1)
    wallbox = rng.random() < 0.5
    phone_macs = [f"02:00:5e:{rng.randrange(256):02x}:{rng.randrange(256):02x}:{index % 256:02x}"]
    odometer = rng.uniform(3_000, 90_000)
    end_ms = START_MS + days * DAY_MS
    intents: list[tuple[int, Point, int]] = []
    for day in range(days):
        intents += _day_intents(rng, day, START_MS + day * DAY_MS, home, work, errands)
    here, arrived = home, START_MS
    trip_number = 0
    for depart_at, destination, min_stay in intents:
        if destination == here:
            continue
        depart = max(depart_at, arrived + min_stay * MINUTE_MS)
        route = _route(rng, here, destination, driver)
        if depart + route.duration_s * 1000 + 2 * MINUTE_MS >= end_ms:
            break
        _parked(b, here, arrived, depart, odometer, wallbox and here == home)
        trip_number += 1
        odometer = _drive(
            b, route, depart, odometer, trip_number, rng.random() < navigates, phone_macs
        )
        here, arrived = destination, depart + int(route.duration_s * 1000)
    _parked(b, here, arrived, end_ms, odometer, wallbox and here == home)
    b.events.sort(key=lambda e: e.arrival_ms)
    truth.revision = b.revision
    return Car(truth, b.events)


def _late_windows(b: _Builder, end_ms: int) -> None:
    """Privacy mode, a feature off and location off, each for a while; the car
    keeps capturing and uploads the records later (store-and-forward)."""
    mode = b.truth.location
    plan: list[tuple[int, int, str, Callable[[int], None]]] = [
        (
            START_MS + 18 * HOUR_MS,
            START_MS + 21 * HOUR_MS,
            LATE_PRIVACY,
            lambda t: b.settings(t, privacy=True),
        ),
        (
            START_MS + DAY_MS + 7 * HOUR_MS,
            START_MS + DAY_MS + 10 * HOUR_MS,
            LATE_LOCATION_OFF,
            lambda t: b.settings(t, location=common_pb2.LOCATION_OFF),
        ),
        (
            START_MS + DAY_MS + 16 * HOUR_MS,
            START_MS + DAY_MS + 23 * HOUR_MS,
            LATE_FEATURE_OFF,
            lambda t: b.settings(t, off="energy_consumption"),
        ),
    ]
    for start, end, kind, apply in plan:
        if end >= end_ms:
            continue  # not within the run
        b.revision += 1
        apply(start)
        b.windows.append(_Window(start, end, kind, b.revision))
        b.revision += 1
        b.settings(end, location=mode)


def _position(point: Point, rng: random.Random) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(
        latitude=round(point.lat, 7),
        longitude=round(point.lon, 7),
        altitude_m=520.0,
        horizontal_accuracy_m=round(rng.uniform(2.5, 9.0), 1),
    )


def _place(point: Point) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(latitude=round(point.lat, 7), longitude=round(point.lon, 7))


def _status(b: _Builder, t: int, point: Point, odometer: float, engine_on: bool) -> None:
    b.truth.positions[t] = point
    b.publish(
        t,
        "tbox/status",
        streams_pb2.VehicleStatus(
            charge_level_pct=60.0,
            engine_on=engine_on,
            handbrake_on=not engine_on,
            doors_locked=True,
            odometer_km=round(odometer, 2),
            position=_position(point, b.rng),
        ),
    )


def _parked(
    b: _Builder, place: Point, start: int, end: int, odometer: float, wallbox: bool
) -> None:
    for t in range(start + 10 * MINUTE_MS, end, 15 * MINUTE_MS):
        _status(b, t, place, odometer, False)
    for t in range(start + 20 * MINUTE_MS, end, 120 * MINUTE_MS):
        b.publish(
            t,
            "tbox/connectivity",
            streams_pb2.Connectivity(
                ip_address=f"10.{b.rng.randrange(256)}.{b.rng.randrange(256)}.7",
                iccid="8949020000000000001",
                imsi="262011234567890",
                network_type="LTE",
                signal_dbm=-80,
            ),
        )
    if wallbox and end - start > 4 * HOUR_MS:
        charge_end = min(end - 10 * MINUTE_MS, start + 3 * HOUR_MS)
        for t in range(start + 5 * MINUTE_MS, charge_end, 30 * MINUTE_MS):
            b.publish(
                t,
                "tbox/battery",
                streams_pb2.BatteryStatus(
                    state_of_charge_pct=70.0,
                    charging=True,
                    charging_location=_place(place),
                    evse_id="DE*HWB*E0001",
                ),
            )


def _drive(
    b: _Builder,
    route: _Route,
    depart: int,
    odometer: float,
    trip_number: int,
    navigated: bool,
    macs: list[str],
) -> float:
    rng = b.rng
    b.new_trip_clock()
    arrive = depart + int(route.duration_s * 1000)
    start, end = route.points[0], route.points[-1]
    b.publish(
        depart - 45_000,
        "tbox/digital_key",
        streams_pb2.DigitalKeyEvent(
            key_id="dk-1", action=streams_pb2.DIGITAL_KEY_UNLOCK, bluetooth_mac=macs[0]
        ),
    )
    for t in range(depart, arrive, 30_000):
        point, moved = route.at((t - depart) / 1000)
        _status(b, t, point, odometer + moved / 1000, True)
    if navigated:
        for t in range(depart + 20_000, arrive - 30_000, 60_000):
            point, _ = route.at((t - depart) / 1000)
            b.publish(
                t,
                "avn/nav",
                streams_pb2.NavRequest(
                    position=_position(point, rng),
                    destination=_place(end),
                    route_id=f"r{trip_number}",
                    traffic_requested=True,
                ),
            )
    if b.truth.features.get("third_party.music"):
        for t in range(depart + 30_000, arrive, 180_000):
            b.publish(
                t,
                "avn/app/music",
                streams_pb2.AppTraffic(
                    app_id="music", content_type="application/json", payload=b"{}"
                ),
            )
    distance_km = route.length_m / 1000
    odometer += distance_km
    duration_s = max(1, int(route.duration_s))
    trip_id = f"trip-{trip_number:04d}"
    b.truth.trips.append(TripTruth(trip_id, start, end, distance_km, duration_s, arrive))
    b.publish(
        arrive + 10_000,
        "tbox/trip",
        streams_pb2.Trip(
            trip_id=trip_id,
            start=_place(start),
            end=_place(end),
            distance_km=round(distance_km, 3),
            energy_kwh=round(distance_km * 0.17, 3),
            average_speed_kmh=round(distance_km / (duration_s / 3600), 1),
            duration_s=duration_s,
            odometer_km=round(odometer, 2),
        ),
    )
    _status(b, arrive + 30_000, end, odometer, False)
    b.publish(
        arrive + 40_000,
        "tbox/digital_key",
        streams_pb2.DigitalKeyEvent(
            key_id="dk-1", action=streams_pb2.DIGITAL_KEY_LOCK, bluetooth_mac=macs[0]
        ),
    )
    return odometer


def metres(point: Point) -> tuple[float, float]:
    """Local east/north metres from the city centre (equirectangular)."""
    cos0 = math.cos(math.radians(CITY_CENTRE.lat))
    return (
        (point.lon - CITY_CENTRE.lon) * 111_320.0 * cos0,
        (point.lat - CITY_CENTRE.lat) * 111_320.0,
    )
