"""A deterministic fleet scenario: who lives where, where they drive, what they publish.

`build_scenario(seed, ...)` is a pure function: the same arguments give the same
events, byte for byte. The runtime (sim.fleet) only decides *when in wall-clock
time* each event happens and records what the gateway answered.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.message import Message

from sim import identifiers
from sim.geo import Point, distance_m
from sim.model import (
    ALL_FEATURES,
    APP_IDS,
    CONSENT_FEATURES,
    CONTRACT_FEATURES,
    OBJECTION,
    OWNERSHIP_CHANGE,
    PURPOSE_MALFORMED,
    PURPOSE_SPOOFED,
    PURPOSE_STRAY_LOCATION,
    PURPOSE_TELEMETRY,
    CommandEvent,
    MessageEvent,
    OperatorEvent,
    PublishEvent,
    ScenarioEvent,
    Settings,
    SettingsEvent,
)
from sim.vin import make_fleet_vins
from sim.world import (
    CITY_CENTRE,
    CITY_NAME,
    Place,
    Sample,
    Trajectory,
    drive,
    random_point_near,
    road_route,
)
from telematics.v1 import common_pb2, streams_pb2

# Monday 2 March 2026, 06:30 UTC: the fleet wakes up at home.
DEFAULT_SIM_START_MS = calendar.timegm((2026, 3, 2, 6, 30, 0)) * 1000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
DAY_MS = 24 * HOUR_MS
BATTERY_KWH = 64.0
CONSUMPTION_KWH_PER_KM = 0.17
SEARCH_TEXTS = (
    ("Hausarzt Dr. Weber", "health"),
    ("Kita Sonnenschein", "childcare"),
    ("Apotheke Notdienst", "health"),
    ("Schnellladestation", "charging"),
    ("Pizza", "food"),
    ("Therme Erding", "leisure"),
    ("Baumarkt", "shopping"),
    ("Allianz Arena Parkplatz", "leisure"),
    ("Frauenklinik", "health"),
    ("Moschee", "religion"),
)
VOICE_LANGUAGES = ("de-DE", "en-GB", "tr-TR")
COMMANDS_WITH_FEATURE = ("lock", "unlock", "climate")
UNKNOWN_COMMAND = "open_trunk"  # not in the policy: the gateway must refuse it


@dataclass(frozen=True)
class VehicleProfile:
    index: int
    vin: str
    home: Place
    work: Place
    errands: tuple[Place, ...]
    chargers: tuple[Place, ...]
    driver_factor: float
    phone_macs: tuple[str, ...]
    imsi: str
    iccid: str
    prefers_ipv6: bool
    settings_start: str  # "normal", "delayed" (telemetry before settings) or "never"
    listens_music: bool
    listens_podcast: bool
    navigates: float  # probability of using online navigation on a drive
    find_my_car_per_hour: float
    ecall_probability: float
    initial_soc: float
    initial_odometer_km: float
    # Contract v2 cars answer find_my_car with the command's request_id; v1 cars
    # do not fill it (the gateway passes them the first fix of a window).
    fills_request_id: bool = True


@dataclass(frozen=True)
class Stay:
    place: Place
    start_ms: int
    end_ms: int
    charge_start_ms: int = 0  # 0 = not charging
    charge_end_ms: int = 0
    charge_kw: float = 0.0


@dataclass(frozen=True)
class Drive:
    origin: Place
    destination: Place
    samples: tuple[Sample, ...]
    distance_km: float

    @property
    def start_ms(self) -> int:
        return self.samples[0].t_ms

    @property
    def end_ms(self) -> int:
        return self.samples[-1].t_ms


Activity = Stay | Drive


@dataclass
class VehicleScenario:
    profile: VehicleProfile
    activities: list[Activity]
    trajectory: Trajectory
    events: list[ScenarioEvent] = field(default_factory=list)
    # (t_ms, state of charge %, odometer km): piecewise-linear energy history
    energy: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def vin(self) -> str:
        return self.profile.vin


@dataclass
class Scenario:
    seed: int
    sim_start_ms: int
    duration_ms: int
    vehicles: list[VehicleScenario]

    @property
    def sim_end_ms(self) -> int:
        return self.sim_start_ms + self.duration_ms


# A driver opens the privacy screen and changes one thing about once an hour
# (the fleet's default).
SETTINGS_CHANGES_PER_HOUR = 0.8


def _poisson_times(
    rng: random.Random, start_ms: int, end_ms: int, per_hour: float
) -> Iterator[int]:
    if per_hour <= 0:
        return
    t = start_ms + rng.expovariate(per_hour) * HOUR_MS
    while t < end_ms:
        yield int(t)
        t += rng.expovariate(per_hour) * HOUR_MS


def _make_profile(rng: random.Random, index: int, vin: str, count: int) -> VehicleProfile:
    home = Place(
        "home",
        "home",
        random_point_near(rng, CITY_CENTRE, 2_000, 14_000),
        identifiers.make_evse_id(rng, "HWB") if rng.random() < 0.6 else "",
    )
    work = Place("work", "work", random_point_near(rng, CITY_CENTRE, 0, 9_000))
    errands = tuple(
        Place(name, kind, random_point_near(rng, home.point, 800, 6_000))
        for name, kind in (
            ("supermarket", "shop"),
            ("bakery", "shop"),
            ("gym", "leisure"),
            ("restaurant", "restaurant"),
            ("parents", "leisure"),
        )
    )
    chargers = tuple(
        Place(
            f"charger-{n}",
            "charger",
            random_point_near(rng, CITY_CENTRE, 1_000, 12_000),
            identifiers.make_evse_id(rng, rng.choice(("ION", "EnB", "SWM", "TNK"))),
        )
        for n in range(3)
    )
    # The last vehicle of a fleet of five or more never sends settings (an unknown car).
    if count >= 5 and index == count - 1:
        settings_start = "never"
    elif rng.random() < 0.15:
        settings_start = "delayed"
    else:
        settings_start = "normal"
    return VehicleProfile(
        index=index,
        vin=vin,
        home=home,
        work=work,
        errands=errands,
        chargers=chargers,
        driver_factor=rng.uniform(0.85, 1.1),
        phone_macs=tuple(identifiers.make_bluetooth_mac(rng) for _ in range(rng.randint(1, 2))),
        imsi=identifiers.make_imsi(rng),
        iccid=identifiers.make_iccid(rng),
        prefers_ipv6=rng.random() < 0.5,
        settings_start=settings_start,
        listens_music=rng.random() < 0.6,
        listens_podcast=rng.random() < 0.25,
        navigates=rng.uniform(0.2, 0.9),
        find_my_car_per_hour=rng.choice((0.0, 0.15, 0.3, 0.6)),
        ecall_probability=0.15,
        initial_soc=rng.uniform(35, 90),
        initial_odometer_km=rng.uniform(3_000, 90_000),
        # Every fourth car (from the second) is of contract v1; from the index,
        # so adding it changed no other draw of the scenario.
        fills_request_id=index % 4 != 1,
    )


def _day_intents(
    rng: random.Random, profile: VehicleProfile, midnight_ms: int
) -> list[tuple[int, Place, int]]:
    """(earliest departure, destination, minimum stay in minutes) for one day."""
    hour = HOUR_MS
    intents: list[tuple[int, Place, int]] = []
    leave = midnight_ms + 7 * hour + int(rng.uniform(0, 1.5) * hour)
    if rng.random() < 0.3:
        intents.append((leave, rng.choice(profile.errands[:2]), 8))
    intents.append((leave, profile.work, 60))
    if rng.random() < 0.3:
        lunch = midnight_ms + 12 * hour + int(rng.uniform(0, 0.5) * hour)
        intents.append((lunch, profile.errands[3], 40))
        intents.append((lunch, profile.work, 60))
    back = midnight_ms + 16 * hour + int(rng.uniform(0.5, 2.5) * hour)
    if rng.random() < 0.4:
        intents.append((back, rng.choice(profile.errands), 20))
    intents.append((back, profile.home, 30))
    if rng.random() < 0.3:
        outing = midnight_ms + 19 * hour + int(rng.uniform(0.5, 1.5) * hour)
        intents.append((outing, rng.choice(profile.errands[2:]), 60))
        intents.append((outing, profile.home, 30))
    return intents


def _plan(
    rng: random.Random, profile: VehicleProfile, start_ms: int, end_ms: int
) -> tuple[list[Activity], list[tuple[int, float, float]]]:
    first_midnight = start_ms - start_ms % DAY_MS
    intents: list[tuple[int, Place, int]] = []
    for day in range(int((end_ms - first_midnight) / DAY_MS) + 1):
        intents.extend(_day_intents(rng, profile, first_midnight + day * DAY_MS))
    activities: list[Activity] = []
    energy: list[tuple[int, float, float]] = [
        (start_ms, profile.initial_soc, profile.initial_odometer_km)
    ]
    here, arrived_ms = profile.home, start_ms
    soc, odometer = profile.initial_soc, profile.initial_odometer_km
    pending = list(intents)
    while pending:
        depart_ms, destination, min_stay_min = pending.pop(0)
        if destination == here:
            continue
        if soc < 25 and destination.kind != "charger":
            pending.insert(0, (depart_ms, destination, min_stay_min))
            destination, min_stay_min = (
                min(profile.chargers, key=lambda c: distance_m(c.point, here.point)),
                35,
            )
        depart_ms = max(
            depart_ms, arrived_ms + min_stay_min * MINUTE_MS // 2, start_ms + 5 * MINUTE_MS
        )
        if depart_ms >= end_ms:
            break
        stay = _stay_with_charging(here, arrived_ms, depart_ms, soc)
        activities.append(stay)
        if stay.charge_start_ms:
            gained = (
                stay.charge_kw
                * (stay.charge_end_ms - stay.charge_start_ms)
                / HOUR_MS
                / BATTERY_KWH
                * 100
            )
            energy.append((stay.charge_start_ms, soc, odometer))
            soc = min(100.0, soc + gained)
            energy.append((stay.charge_end_ms, soc, odometer))
        samples = drive(
            rng, road_route(rng, here.point, destination.point), depart_ms, profile.driver_factor
        )
        distance_km = (
            sum(distance_m(a.point, b.point) for a, b in itertools.pairwise(samples)) / 1000
        )
        activities.append(Drive(here, destination, tuple(samples), distance_km))
        energy.append((samples[0].t_ms, soc, odometer))
        soc = max(3.0, soc - distance_km * CONSUMPTION_KWH_PER_KM / BATTERY_KWH * 100)
        odometer += distance_km
        energy.append((samples[-1].t_ms, soc, odometer))
        here, arrived_ms = destination, samples[-1].t_ms
        if arrived_ms >= end_ms:
            break
    if arrived_ms < end_ms:
        last = _stay_with_charging(here, arrived_ms, end_ms, soc)
        activities.append(last)
        if last.charge_start_ms:
            gained = (
                last.charge_kw
                * (last.charge_end_ms - last.charge_start_ms)
                / HOUR_MS
                / BATTERY_KWH
                * 100
            )
            energy.append((last.charge_start_ms, soc, odometer))
            energy.append((last.charge_end_ms, min(100.0, soc + gained), odometer))
    return activities, energy


def _stay_with_charging(place: Place, start_ms: int, end_ms: int, soc: float) -> Stay:
    """Charge at a public charger always, at home (wallbox) when below 70 %."""
    if not place.evse_id or (place.kind == "home" and soc >= 70) or soc >= 95:
        return Stay(place, start_ms, end_ms)
    power_kw = 50.0 if place.kind == "charger" else 11.0
    needed_ms = int((95 - soc) / 100 * BATTERY_KWH / power_kw * HOUR_MS)
    charge_start = start_ms + 3 * MINUTE_MS
    charge_end = min(end_ms - 2 * MINUTE_MS, charge_start + needed_ms)
    if charge_end <= charge_start + MINUTE_MS:
        return Stay(place, start_ms, end_ms)
    return Stay(place, start_ms, end_ms, charge_start, charge_end, power_kw)


def _energy_at(energy: list[tuple[int, float, float]], t_ms: int) -> tuple[float, float]:
    previous = energy[0]
    for point in energy:
        if point[0] > t_ms:
            span = point[0] - previous[0]
            fraction = 0.0 if span == 0 else (t_ms - previous[0]) / span
            return (
                previous[1] + (point[1] - previous[1]) * fraction,
                previous[2] + (point[2] - previous[2]) * fraction,
            )
        previous = point
    return previous[1], previous[2]


def geo_point(sample: Sample, rng: random.Random) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(
        latitude=round(sample.point.lat, 7),
        longitude=round(sample.point.lon, 7),
        altitude_m=round(sample.altitude_m, 1),
        heading_deg=round(sample.heading_deg, 1),
        speed_kmh=round(sample.speed_kmh, 1),
        horizontal_accuracy_m=round(rng.uniform(2.5, 9.0), 1),
    )


# Share of status reports whose GPS has no fix (garage, tunnel): NaN coordinates,
# which the gateway must clear and never take as a refresh of the coarse value.
NO_FIX_SHARE = 0.03


def no_fix_point() -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(latitude=math.nan, longitude=math.nan)


def unit_clock_skew_ms(vin: str, unit: str) -> int:
    """How far a unit's clock is off (ms added to its header timestamps).

    The two units of a car keep separate clocks that disagree by minutes (the
    attack on the refresh interval used exactly that): the AVN runs 2 to 8
    minutes ahead, the TBOX up to 2 s behind. Ahead, not behind, so capture-time
    consent (a future timestamp counts as arrival time) judges the message
    as the checker does. Derived from the VIN: no draw from the scenario's
    random stream, so scenarios of a seed stay what they were otherwise.
    """
    r = int.from_bytes(hashlib.sha256(f"clock/{vin}/{unit}".encode()).digest()[:4], "big")
    fraction = r / 2**32
    if unit == "avn":
        return int(120_000 + fraction * 360_000)
    return -int(fraction * 2_000)


def place_point(point: Point) -> common_pb2.GeoPoint:
    return common_pb2.GeoPoint(latitude=round(point.lat, 7), longitude=round(point.lon, 7))


class _EventBuilder:
    """Turns one vehicle's activities into its publish/settings/command events."""

    def __init__(
        self,
        rng: random.Random,
        vehicle: VehicleScenario,
        start_ms: int,
        end_ms: int,
        settings_per_hour: float = SETTINGS_CHANGES_PER_HOUR,
    ) -> None:
        self.rng = rng
        self.settings_per_hour = settings_per_hour
        self.vehicle = vehicle
        self.profile = vehicle.profile
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.events: list[ScenarioEvent] = []
        self.ip = self._new_ip()
        # Its own stream: GPS dropouts do not shift the rest of the scenario.
        self.no_fix_rng = random.Random(f"no-fix/{vehicle.vin}")
        # Find-my-car polling and stray answers draw from their own generator:
        # adding them changed no other event of a scenario.
        self.fmc_rng = random.Random(f"fmc:{self.profile.vin}")

    def _new_ip(self) -> str:
        if self.profile.prefers_ipv6 and self.rng.random() < 0.85:
            return identifiers.make_ipv6(self.rng)
        return identifiers.make_ipv4(self.rng)

    def add(self, event: ScenarioEvent) -> None:
        if self.start_ms <= event.t_ms < self.end_ms:
            self.events.append(event)

    def publish(
        self,
        t_ms: int,
        stream: str,
        message: Message,
        *,
        purpose: str = PURPOSE_TELEMETRY,
        nonce: str = "",
    ) -> None:
        unit = stream.split("/", 1)[0]
        self.add(PublishEvent(t_ms, unit, stream, message, purpose=purpose, nonce=nonce))

    def position(self, t_ms: int) -> common_pb2.GeoPoint:
        return geo_point(self.vehicle.trajectory.at(t_ms), self.rng)

    # --- per-stream builders -------------------------------------------------
    def status(self, t_ms: int, *, engine_on: bool, locked: bool) -> None:
        soc, odometer = _energy_at(self.vehicle.energy, t_ms)
        self.publish(
            t_ms,
            "tbox/status",
            streams_pb2.VehicleStatus(
                fuel_level_pct=0.0,
                charge_level_pct=round(soc, 1),
                range_km=round(soc / 100 * BATTERY_KWH / CONSUMPTION_KWH_PER_KM, 1),
                tyre_pressure_kpa=[round(self.rng.uniform(230, 250), 1) for _ in range(4)],
                battery_voltage_v=round(self.rng.uniform(12.2, 14.4), 2),
                engine_on=engine_on,
                eps_ok=True,
                handbrake_on=not engine_on,
                cabin_temp_c=round(self.rng.uniform(14, 24), 1),
                outside_temp_c=round(self.rng.uniform(2, 12), 1),
                windows_closed=True,
                sunroof_closed=True,
                doors_locked=locked,
                odometer_km=round(odometer, 2),
                position=(
                    no_fix_point()
                    if self.no_fix_rng.random() < NO_FIX_SHARE
                    else self.position(t_ms)
                ),
            ),
        )

    def alarm(self, t_ms: int, kind: streams_pb2.AlarmType, detail: str) -> None:
        self.publish(
            t_ms,
            "tbox/alarm",
            streams_pb2.Alarm(type=kind, detail=detail, position=self.position(t_ms)),
        )

    def connectivity(self, t_ms: int) -> None:
        self.publish(
            t_ms,
            "tbox/connectivity",
            streams_pb2.Connectivity(
                ip_address=self.ip,
                iccid=self.profile.iccid,
                imsi=self.profile.imsi,
                network_type=self.rng.choice(("LTE", "LTE", "5G-NSA", "UMTS")),
                signal_dbm=self.rng.randint(-110, -60),
                os_version="TBOX-OS 4.2.17",
            ),
        )

    def digital_key(self, t_ms: int, action: int) -> None:
        self.publish(
            t_ms,
            "tbox/digital_key",
            streams_pb2.DigitalKeyEvent(
                key_id=f"dk-{self.profile.vin[-4:]}-{self.profile.phone_macs.index(self.mac)}",
                action=action,  # type: ignore[arg-type]
                bluetooth_mac=self.mac,
            ),
        )

    def battery(self, t_ms: int, stay: Stay, charging: bool) -> None:
        soc, _ = _energy_at(self.vehicle.energy, t_ms)
        remaining_min = (
            int((95 - soc) / 100 * BATTERY_KWH / max(stay.charge_kw, 1) * 60) if charging else 0
        )
        self.publish(
            t_ms,
            "tbox/battery",
            streams_pb2.BatteryStatus(
                state_of_charge_pct=round(soc, 1),
                time_to_full_min=max(remaining_min, 0),
                current_a=round(stay.charge_kw * 1000 / 400, 1) if charging else 0.0,
                voltage_v=round(self.rng.uniform(380, 410), 1),
                range_km=round(soc / 100 * BATTERY_KWH / CONSUMPTION_KWH_PER_KM, 1),
                charging=charging,
                charging_location=place_point(stay.place.point),
                evse_id=stay.place.evse_id,
            ),
        )

    def app(self, t_ms: int, app_id: str, content: dict[str, object]) -> None:
        nonce = identifiers.make_token(self.rng, 24)
        body = json.dumps({"nonce": nonce, **content}, sort_keys=True).encode()
        self.publish(
            t_ms,
            f"avn/app/{app_id}",
            streams_pb2.AppTraffic(app_id=app_id, content_type="application/json", payload=body),
            nonce=nonce,
        )

    # --- activities ----------------------------------------------------------
    mac: str = ""

    def drive_events(self, trip: Drive, trip_number: int) -> None:
        rng, start, end = self.rng, trip.start_ms, trip.end_ms
        self.ip = self._new_ip()
        phone_key = rng.random() < 0.6
        self.mac = rng.choice(self.profile.phone_macs)
        if phone_key:
            self.digital_key(start - 45_000, streams_pb2.DIGITAL_KEY_UNLOCK)
            self.digital_key(start - 5_000, streams_pb2.DIGITAL_KEY_START)
        self.connectivity(start)
        if rng.random() < 0.1:
            self.alarm(start + 1_000, streams_pb2.ALARM_ENGINE_START, "engine started")
        for t in range(start, end, 2 * MINUTE_MS):
            self.status(t, engine_on=True, locked=True)
        if rng.random() < 0.3:
            text, category = rng.choice(SEARCH_TEXTS)
            self.publish(
                start + 10_000,
                "avn/search",
                streams_pb2.SearchQuery(
                    text=text, position=self.position(start + 10_000), category=category
                ),
            )
        if rng.random() < self.profile.navigates:
            route_id = identifiers.make_token(rng, 12)
            for t in range(start + 20_000, max(end - MINUTE_MS, start + 20_001), 2 * MINUTE_MS):
                self.publish(
                    t,
                    "avn/nav",
                    streams_pb2.NavRequest(
                        position=self.position(t),
                        destination=place_point(trip.destination.point),
                        route_id=route_id,
                        traffic_requested=True,
                    ),
                )
        speeding = next((s for s in trip.samples if s.speed_kmh > 88), None)
        if speeding is not None and rng.random() < 0.5:
            self.alarm(
                speeding.t_ms, streams_pb2.ALARM_SPEED, f"speed {speeding.speed_kmh:.0f} km/h"
            )
        if rng.random() < 0.35:
            session = identifiers.make_uuid(rng)
            chunks = rng.randint(3, 6)
            t0 = rng.randint(start, max(start, end - chunks * 2_000))
            language = rng.choice(VOICE_LANGUAGES)
            for n in range(chunks):
                self.publish(
                    t0 + n * 1_500,
                    "avn/voice",
                    streams_pb2.VoiceChunk(
                        session_id=session,
                        chunk_index=n,
                        audio=rng.randbytes(rng.randint(160, 640)),
                        final=n == chunks - 1,
                        language=language,
                    ),
                )
        if self.profile.listens_music:
            for t in range(start + 30_000, end, 3 * MINUTE_MS):
                self.app(
                    t,
                    "music",
                    {
                        "event": "track_play",
                        "track": identifiers.make_token(rng, 10),
                        "bitrate_kbps": 256,
                    },
                )
        if self.profile.listens_podcast and rng.random() < 0.5:
            self.app(
                start + 45_000,
                "podcast",
                {
                    "event": "episode_resume",
                    "episode": identifiers.make_token(rng, 8),
                    "position_s": rng.randint(0, 3000),
                },
            )
        if rng.random() < 0.3:
            self.app(start + 15_000, "weather", {"query": "forecast", "city": CITY_NAME})
        soc_start, _odo_start = _energy_at(self.vehicle.energy, start)
        soc_end, odo_end = _energy_at(self.vehicle.energy, end)
        duration_s = max(1, (end - start) // 1000)
        self.publish(
            end + 10_000,
            "tbox/trip",
            streams_pb2.Trip(
                trip_id=f"trip-{trip_number:04d}-{identifiers.make_token(rng, 6)}",
                start=place_point(trip.origin.point),
                end=place_point(trip.destination.point),
                distance_km=round(trip.distance_km, 3),
                energy_kwh=round((soc_start - soc_end) / 100 * BATTERY_KWH, 3),
                average_speed_kmh=round(trip.distance_km / (duration_s / 3600), 1),
                duration_s=duration_s,
                odometer_km=round(odo_end, 2),
            ),
        )
        self.status(end + 30_000, engine_on=False, locked=phone_key)
        if phone_key:
            self.digital_key(end + 40_000, streams_pb2.DIGITAL_KEY_LOCK)
        if rng.random() < self.profile.ecall_probability / 3:
            crash = rng.choice(trip.samples[len(trip.samples) // 3 :]).t_ms
            recent = [self.position(crash - lag) for lag in (30_000, 20_000, 10_000)]
            self.publish(
                crash,
                "tbox/ecall",
                streams_pb2.ECall(
                    trigger=rng.choice((streams_pb2.ECALL_MANUAL, streams_pb2.ECALL_AUTOMATIC)),
                    position=self.position(crash),
                    recent_positions=recent,
                    passengers=rng.randint(1, 4),
                    vehicle_type="M1",
                    propulsion="electric",
                ),
            )

    def stay_events(self, stay: Stay) -> None:
        rng = self.rng
        for t in range(stay.start_ms + 10 * MINUTE_MS, stay.end_ms, 15 * MINUTE_MS):
            self.status(t, engine_on=False, locked=True)
        for t in range(stay.start_ms + 20 * MINUTE_MS, stay.end_ms, 30 * MINUTE_MS):
            self.connectivity(t)
        if stay.charge_start_ms:
            self.battery(stay.charge_start_ms, stay, charging=True)
            for t in range(
                stay.charge_start_ms + 10 * MINUTE_MS, stay.charge_end_ms, 10 * MINUTE_MS
            ):
                self.battery(t, stay, charging=True)
            self.battery(stay.charge_end_ms, stay, charging=False)
        hours = (stay.end_ms - stay.start_ms) / HOUR_MS
        if rng.random() < 0.02 * hours:
            self.alarm(
                rng.randint(stay.start_ms, stay.end_ms),
                streams_pb2.ALARM_SHOCK,
                "shock sensor level 2",
            )
        for t in _poisson_times(
            rng, stay.start_ms + 5 * MINUTE_MS, stay.end_ms, self.profile.find_my_car_per_hour
        ):
            self.find_my_car(t)
        self.find_my_car_polling(stay)
        for t in _poisson_times(rng, stay.start_ms, stay.end_ms, 0.25):
            command = rng.choice(COMMANDS_WITH_FEATURE)
            args = {"target_c": "21"} if command == "climate" else {}
            self.add(CommandEvent(t, command, f"req-{identifiers.make_token(rng, 12)}", args))
        for t in _poisson_times(rng, stay.start_ms, stay.end_ms, 0.03):
            self.add(CommandEvent(t, UNKNOWN_COMMAND, f"req-{identifiers.make_token(rng, 12)}"))

    def find_my_car(self, t_ms: int) -> None:
        answer_at = t_ms + 3_000
        request_id = f"req-{identifiers.make_token(self.rng, 12)}"
        response = streams_pb2.Location(
            position=self.position(answer_at),
            request_id=request_id if self.profile.fills_request_id else "",
        )
        self.add(CommandEvent(t_ms, "find_my_car", request_id, {"requested_by": "app"}, response))

    def find_my_car_polling(self, stay: Stay) -> None:
        """A backend that polls find-my-car (contract rule 17's attack): every
        2.5 minutes for 20 minutes, twice the hourly cap; the gateway refuses
        what is above it as rate_limited."""
        rng = self.fmc_rng
        hours = (stay.end_ms - stay.start_ms) / HOUR_MS
        if self.profile.find_my_car_per_hour <= 0 or rng.random() >= 0.05 * hours:
            return
        start = rng.randint(stay.start_ms, max(stay.start_ms, stay.end_ms - 25 * MINUTE_MS))
        for t in range(start, min(start + 20 * MINUTE_MS, stay.end_ms), 150_000):
            request_id = f"poll-{identifiers.make_token(rng, 12)}"
            response = streams_pb2.Location(
                position=self.position(t + 3_000),
                request_id=request_id if self.profile.fills_request_id else "",
            )
            self.add(CommandEvent(t, "find_my_car", request_id, {"requested_by": "poll"}, response))

    def stray_locations(self) -> None:
        """tbox/location nobody asked for: a buggy periodic upload (no request
        id: inside a window it may take the window's fix) or an answer to a
        command the gateway never accepted (a request id nobody issued)."""
        for t in _poisson_times(self.rng, self.start_ms, self.end_ms, 0.6):
            stale = self.profile.fills_request_id and self.fmc_rng.random() < 0.3
            self.publish(
                t,
                "tbox/location",
                streams_pb2.Location(
                    position=self.position(t),
                    request_id=f"req-{identifiers.make_token(self.fmc_rng, 12)}" if stale else "",
                ),
                purpose=PURPOSE_STRAY_LOCATION,
            )

    def settings_changes(self) -> None:
        rng, profile = self.rng, self.profile
        if profile.settings_start == "never":
            return
        features = {name: rng.random() < 0.92 for name in CONTRACT_FEATURES}
        features.update({name: rng.random() < 0.65 for name in CONSENT_FEATURES})
        for app, chance in zip(APP_IDS, (0.6, 0.45, 0.35), strict=True):
            features[f"third_party.{app}"] = rng.random() < chance
        location = rng.choices(
            (common_pb2.LOCATION_PRECISE, common_pb2.LOCATION_APPROXIMATE, common_pb2.LOCATION_OFF),
            (0.4, 0.4, 0.2),
        )[0]
        revision = rng.randint(1, 4)
        current = Settings(revision, rng.random() < 0.05, location, features)
        first = self.start_ms + (
            rng.randint(20, 40) * MINUTE_MS
            if profile.settings_start == "delayed"
            else rng.randint(1_000, 90_000)
        )
        self.add(SettingsEvent(first, current))
        for t in _poisson_times(rng, first + MINUTE_MS, self.end_ms, self.settings_per_hour):
            current = _change_settings(rng, current)
            self.add(SettingsEvent(t, current))


def _change_settings(rng: random.Random, current: Settings) -> Settings:
    """What a driver does on the privacy screen: one change at a time."""
    features = dict(current.features)
    privacy_mode, location = current.privacy_mode, current.location
    roll = rng.random()
    if privacy_mode and roll < 0.7:
        privacy_mode = False
    elif roll < 0.5:
        name = rng.choice(ALL_FEATURES)
        features[name] = not features.get(name, False)
    elif roll < 0.82:
        location = rng.choice(
            [
                mode
                for mode in (
                    common_pb2.LOCATION_OFF,
                    common_pb2.LOCATION_APPROXIMATE,
                    common_pb2.LOCATION_PRECISE,
                    common_pb2.LOCATION_MODE_UNSPECIFIED,
                )
                if mode != location
            ]
            if rng.random() < 0.1
            else [
                mode
                for mode in (
                    common_pb2.LOCATION_OFF,
                    common_pb2.LOCATION_APPROXIMATE,
                    common_pb2.LOCATION_PRECISE,
                )
                if mode != location
            ]
        )
    else:
        privacy_mode = not privacy_mode
    step = 2 if rng.random() < 0.1 else 1  # revisions may skip numbers, never go back
    return Settings(current.revision + step, privacy_mode, location, features)


def _trace(activities: list[Activity]) -> Trajectory:
    trajectory = Trajectory()
    for activity in activities:
        if isinstance(activity, Stay):
            for t in (activity.start_ms, activity.end_ms):
                if not trajectory.samples or trajectory.samples[-1].t_ms <= t:
                    trajectory.append(Sample(t, activity.place.point, 0.0, 0.0, 520.0))
        else:
            for sample in activity.samples:
                if not trajectory.samples or trajectory.samples[-1].t_ms <= sample.t_ms:
                    trajectory.append(sample)
    return trajectory


def _injections(
    rng: random.Random, vehicles: list[VehicleScenario], start_ms: int, end_ms: int
) -> None:
    """A few malformed payloads and spoofed VINs: the gateway must drop every one."""
    count = max(1, len(vehicles) // 8)
    for n in range(count):
        victim = rng.choice(vehicles)
        t = rng.randint(
            start_ms + 10 * MINUTE_MS, max(start_ms + 10 * MINUTE_MS + 1, end_ms - 10 * MINUTE_MS)
        )
        # 0x0a = field 1, length-delimited, claiming far more bytes than follow: never decodes.
        garbage = b"\x0a\xff\x7f" + rng.randbytes(12)
        stream = rng.choice(("tbox/status", "avn/nav"))
        victim.events.append(
            PublishEvent(
                t,
                stream.split("/")[0],
                stream,
                None,
                purpose=PURPOSE_MALFORMED,
                raw_payload=garbage,
            )
        )
        spoofer = rng.choice(vehicles)
        others = [v.vin for v in vehicles if v.vin != spoofer.vin]
        claimed = rng.choice(others) if others else "WVWZZZ1KZ8W000001"
        t = rng.randint(
            start_ms + 10 * MINUTE_MS, max(start_ms + 10 * MINUTE_MS + 1, end_ms - 10 * MINUTE_MS)
        )
        spoofed = streams_pb2.VehicleStatus(
            charge_level_pct=50.0,
            odometer_km=float(n),
            position=geo_point(spoofer.trajectory.at(t), rng),
        )
        spoofer.events.append(
            PublishEvent(
                t, "tbox", "tbox/status", spoofed, purpose=PURPOSE_SPOOFED, header_vin=claimed
            )
        )


def _guaranteed_ecalls(
    rng: random.Random, vehicles: list[VehicleScenario], start_ms: int, end_ms: int
) -> None:
    """At least one eCall per run, from the car that never sent settings if there is one:
    an unknown car's eCall must pass too (legal obligation)."""
    unknown = [v for v in vehicles if v.profile.settings_start == "never"]
    caller = unknown[0] if unknown else rng.choice(vehicles)
    crash = rng.randint(
        start_ms + (end_ms - start_ms) // 4, start_ms + (end_ms - start_ms) * 3 // 4
    )

    def point(t_ms: int) -> common_pb2.GeoPoint:
        return geo_point(caller.trajectory.at(t_ms), rng)

    caller.events.append(
        PublishEvent(
            crash,
            "tbox",
            "tbox/ecall",
            streams_pb2.ECall(
                trigger=streams_pb2.ECALL_AUTOMATIC,
                position=point(crash),
                recent_positions=[point(crash - lag) for lag in (30_000, 20_000, 10_000)],
                passengers=rng.randint(1, 4),
                vehicle_type="M1",
                propulsion="electric",
            ),
        )
    )


TUNNEL_CHANCE = 0.3  # drives of 10 minutes or more with a stretch without coverage
GARAGE_CHANCE = 0.15  # stays of two hours or more in an underground car park
UPLOAD_DELAY_MS = 5_000  # coverage is back: the buffer goes out this long after


def _store_and_forward(
    rng: random.Random, vehicle: VehicleScenario, events: list[ScenarioEvent], end_ms: int
) -> None:
    """Coverage gaps: what a car captures in a tunnel or an underground car park
    is buffered and uploaded when coverage returns, in capture order, with its
    capture timestamp and the settings revision it was captured under (contract
    rules 11, 12). Settings changes made meanwhile are sent at once (the AVN has
    its own connection): a buffered record may reach the gateway after the
    settings it was captured under have changed, either way. eCall is never
    buffered (it has its own lane and priority); answers to the backend
    (find-my-car) neither. A separate random stream: the rest of the scenario
    is the same with or without gaps."""
    gaps: list[tuple[int, int, frozenset[str]]] = []
    for activity in vehicle.activities:
        if isinstance(activity, Drive):
            start, end = activity.start_ms, activity.end_ms
            if end - start >= 10 * MINUTE_MS and rng.random() < TUNNEL_CHANCE:
                a = rng.randint(start + 2 * MINUTE_MS, end - 5 * MINUTE_MS)
                gaps.append((a, min(end, a + rng.randint(2, 6) * MINUTE_MS), frozenset()))
        elif activity.end_ms - activity.start_ms >= 2 * HOUR_MS and rng.random() < GARAGE_CHANCE:
            # Parked underground: the TBOX's uploads wait for the way out.
            gaps.append((activity.start_ms, activity.end_ms, frozenset({"tbox"})))
    if not gaps:
        return
    for event in events:
        if (
            not isinstance(event, PublishEvent)
            or event.purpose != PURPOSE_TELEMETRY
            or event.stream == "tbox/ecall"
        ):
            continue
        for a, b, units in gaps:
            if b + UPLOAD_DELAY_MS + (b - a) // 1000 >= end_ms:
                continue  # coverage returns after the run: sent live instead
            if a <= event.t_ms < b and (not units or event.unit in units):
                event.captured_ms = event.t_ms
                # Uploaded in capture order once coverage is back.
                event.t_ms = b + UPLOAD_DELAY_MS + (event.t_ms - a) // 1000
                break


def build_scenario(
    seed: int,
    vehicle_count: int,
    duration_s: float,
    sim_start_ms: int = DEFAULT_SIM_START_MS,
    settings_per_hour: float = SETTINGS_CHANGES_PER_HOUR,
) -> Scenario:
    """`settings_per_hour`: each car's privacy-screen changes per simulated
    hour after its first settings (a Poisson process)."""
    fleet_rng = random.Random(f"fleet:{seed}")
    vins = make_fleet_vins(fleet_rng, vehicle_count)
    end_ms = sim_start_ms + int(duration_s * 1000)
    vehicles: list[VehicleScenario] = []
    for index, vin in enumerate(vins):
        rng = random.Random(f"vehicle:{seed}:{index}")
        profile = _make_profile(rng, index, vin, vehicle_count)
        activities, energy = _plan(rng, profile, sim_start_ms, end_ms)
        vehicle = VehicleScenario(profile, activities, _trace(activities), energy=energy)
        builder = _EventBuilder(rng, vehicle, sim_start_ms, end_ms, settings_per_hour)
        builder.settings_changes()
        trip_number = 0
        for activity in activities:
            if isinstance(activity, Drive):
                trip_number += 1
                builder.drive_events(activity, trip_number)
            else:
                builder.stay_events(activity)
        builder.stray_locations()
        _store_and_forward(random.Random(f"buffer:{seed}:{index}"), vehicle, builder.events, end_ms)
        vehicle.events = builder.events
        vehicles.append(vehicle)
    _injections(fleet_rng, vehicles, sim_start_ms, end_ms)
    _guaranteed_ecalls(fleet_rng, vehicles, sim_start_ms, end_ms)
    for vehicle in vehicles:
        # Stable sort: simultaneous events keep the order they were generated in.
        vehicle.events.sort(key=lambda event: event.t_ms)
    # Its own random stream: the events above are the same with or without it.
    _operator_events(random.Random(f"operator:{seed}"), vehicles, sim_start_ms, end_ms)
    return Scenario(seed, sim_start_ms, int(duration_s * 1000), vehicles)


MESSAGE_CATEGORIES = ("alert", "service_advert")


def _operator_events(
    rng: random.Random, vehicles: list[VehicleScenario], start_ms: int, end_ms: int
) -> None:
    """The backend's message-centre messages, and what a DPO does: an
    objection to service adverts for some cars (Art. 21) and an ownership
    change for others (the new owner sets the privacy screen again). The
    checker judges that an objected feature reaches the car no more, and that
    nothing of the previous owner passes after the change."""
    known = [v for v in vehicles if any(isinstance(e, SettingsEvent) for e in v.events)]
    span = end_ms - start_ms
    for vehicle in known:
        first = min(e.t_ms for e in vehicle.events if isinstance(e, SettingsEvent))
        for category in MESSAGE_CATEGORIES:
            for t in _poisson_times(rng, first + 2 * MINUTE_MS, end_ms - 5 * MINUTE_MS, 0.5):
                vehicle.events.append(
                    MessageEvent(t, category, f"msg-{identifiers.make_token(rng, 12)}")
                )
    order = list(known)
    rng.shuffle(order)
    changes = (1 if len(known) >= 3 else 0) + len(known) // 10
    objections = (1 if len(known) >= 2 else 0) + len(known) // 6
    for vehicle in order[:changes]:
        _ownership_change(rng, vehicle, start_ms + int(span * rng.uniform(0.35, 0.6)))
    for vehicle in order[changes : changes + objections]:
        t = start_ms + int(span * rng.uniform(0.3, 0.6))
        vehicle.events.append(OperatorEvent(t, OBJECTION, feature="service_adverts"))
        # One advert before and two after, so there is something to judge.
        for at in (t - 10 * MINUTE_MS, t + 5 * MINUTE_MS, t + 20 * MINUTE_MS):
            if start_ms < at < end_ms:
                request_id = f"msg-{identifiers.make_token(rng, 12)}"
                vehicle.events.append(MessageEvent(at, "service_advert", request_id))
    for vehicle in vehicles:
        vehicle.events.sort(key=lambda event: event.t_ms)


def _ownership_change(rng: random.Random, vehicle: VehicleScenario, t: int) -> None:
    """The car changes hands at `t`; its new owner's first settings follow at
    once (revision one above the last one before), and every later revision
    moves up by one."""
    settings = [e for e in vehicle.events if isinstance(e, SettingsEvent)]
    before = [e for e in settings if e.t_ms <= t]
    if not before:
        return
    features = {name: rng.random() < 0.9 for name in CONTRACT_FEATURES}
    features.update({name: rng.random() < 0.6 for name in CONSENT_FEATURES})
    for app in APP_IDS:
        features[f"third_party.{app}"] = rng.random() < 0.5
    location = rng.choice(
        (common_pb2.LOCATION_PRECISE, common_pb2.LOCATION_APPROXIMATE, common_pb2.LOCATION_OFF)
    )
    new = Settings(before[-1].settings.revision + 1, False, location, features)
    for n, event in enumerate(vehicle.events):
        if isinstance(event, SettingsEvent) and event.t_ms > t:
            vehicle.events[n] = SettingsEvent(
                event.t_ms,
                dataclasses.replace(event.settings, revision=event.settings.revision + 1),
                tuple(dataclasses.replace(f, revision=f.revision + 1) for f in event.flood),
            )
    vehicle.events.append(OperatorEvent(t, OWNERSHIP_CHANGE, new_settings=new))


def event_fingerprint(event: ScenarioEvent) -> str:
    """A canonical text form of an event, for reproducibility checks."""
    if isinstance(event, MessageEvent):
        return f"{event.t_ms} msg {event.category} {event.request_id}"
    if isinstance(event, OperatorEvent):
        new = event.new_settings
        settings = json.dumps(new.to_json(), sort_keys=True) if new is not None else ""
        return f"{event.t_ms} operator {event.action} {event.feature} {settings}"
    if isinstance(event, SettingsEvent):
        return f"{event.t_ms} settings {json.dumps(event.settings.to_json(), sort_keys=True)}"
    if isinstance(event, CommandEvent):
        response = (
            event.response.SerializeToString(deterministic=True).hex() if event.response else ""
        )
        args = sorted(event.args.items())
        return f"{event.t_ms} cmd {event.command} {event.request_id} {args} {response}"
    payload = (
        event.raw_payload
        if event.raw_payload is not None
        else (
            event.message.SerializeToString(deterministic=True)
            if event.message is not None
            else b""
        )
    )
    captured = f" captured {event.captured_ms}" if event.captured_ms is not None else ""
    return (
        f"{event.t_ms} pub {event.stream} {event.purpose} {event.header_vin} {payload.hex()}"
        + captured
    )
