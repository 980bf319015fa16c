"""Where the simulated cars live and how they move: places, road-like routes, motion.

Everything here is a pure function of a `random.Random`, so a seed fixes the world.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field

from sim.geo import Point, bearing_deg, distance_m, interpolate, offset

# Munich: a real city-sized area so distances and speeds look plausible.
CITY_CENTRE = Point(48.1372, 11.5756)
CITY_NAME = "München"
DRIVE_STEP_S = 2.0  # motion integration step (simulated seconds)
ACCELERATION_MS2 = 1.5
DECELERATION_MS2 = 2.5
CORNER_SPEED_KMH = 18.0


@dataclass(frozen=True)
class Place:
    name: str
    kind: str  # home, work, shop, restaurant, leisure, charger
    point: Point
    evse_id: str = ""  # set for places with a charger (public station or home wallbox)


@dataclass(frozen=True)
class Sample:
    """The true state of a car at one instant of simulated time."""

    t_ms: int
    point: Point
    speed_kmh: float
    heading_deg: float
    altitude_m: float


@dataclass
class Trajectory:
    """Piecewise-linear true track of one car (stays are two samples at the same point)."""

    samples: list[Sample] = field(default_factory=list)
    _times: list[int] = field(default_factory=list)

    def append(self, sample: Sample) -> None:
        if self.samples and sample.t_ms < self.samples[-1].t_ms:
            raise ValueError("trajectory samples must be in time order")
        self.samples.append(sample)
        self._times.append(sample.t_ms)

    def at(self, t_ms: int) -> Sample:
        index = bisect.bisect_right(self._times, t_ms)
        if index == 0:
            return self.samples[0]
        if index >= len(self.samples):
            return self.samples[-1]
        before, after = self.samples[index - 1], self.samples[index]
        span = after.t_ms - before.t_ms
        fraction = 0.0 if span == 0 else (t_ms - before.t_ms) / span
        return Sample(
            t_ms=t_ms,
            point=interpolate(before.point, after.point, fraction),
            speed_kmh=before.speed_kmh + (after.speed_kmh - before.speed_kmh) * fraction,
            heading_deg=after.heading_deg if after.speed_kmh > 0 else before.heading_deg,
            altitude_m=before.altitude_m + (after.altitude_m - before.altitude_m) * fraction,
        )


def random_point_near(rng: random.Random, centre: Point, min_m: float, max_m: float) -> Point:
    radius = rng.uniform(min_m, max_m)
    angle = rng.uniform(0, 2 * math.pi)
    return offset(centre, radius * math.cos(angle), radius * math.sin(angle))


def altitude_at(point: Point) -> float:
    """A smooth fake terrain (Munich is ~520 m above sea level)."""
    return 520.0 + 25.0 * math.sin(point.lat * 90.0) + 15.0 * math.cos(point.lon * 70.0)


def road_route(rng: random.Random, start: Point, end: Point) -> list[Point]:
    """A polyline that looks like driving on a street grid: alternating north-south and
    east-west legs with a few jogs, plus an occasional diagonal arterial road."""
    legs = rng.randint(2, 4)
    lat_cuts = sorted(rng.random() for _ in range(legs - 1))
    lon_cuts = sorted(rng.random() for _ in range(legs - 1))
    lat_steps = [0.0, *lat_cuts, 1.0]
    lon_steps = [0.0, *lon_cuts, 1.0]
    points = [start]
    north_first = rng.random() < 0.5
    for leg in range(1, legs + 1):
        lat = start.lat + (end.lat - start.lat) * lat_steps[leg]
        lon = start.lon + (end.lon - start.lon) * lon_steps[leg]
        current = points[-1]
        if rng.random() < 0.2:
            points.append(Point(lat, lon))  # a diagonal arterial road
        elif north_first:
            points.extend([Point(lat, current.lon), Point(lat, lon)])
        else:
            points.extend([Point(current.lat, lon), Point(lat, lon)])
    points[-1] = end
    # Drop zero-length legs so every segment has a heading.
    route = [points[0]]
    for point in points[1:]:
        if distance_m(route[-1], point) > 1.0:
            route.append(point)
    if len(route) == 1:
        route.append(end)
    return route


def _segment_speed_kmh(length_m: float, driver_factor: float) -> float:
    if length_m > 2500:
        return 85.0 * driver_factor  # arterial / ring road
    if length_m > 800:
        return 50.0 * driver_factor
    return 32.0 * driver_factor


def drive(
    rng: random.Random,
    route: list[Point],
    start_ms: int,
    driver_factor: float,
) -> list[Sample]:
    """Integrate a plausible speed profile along `route`: accelerate, slow for corners,
    stop at some traffic lights, arrive at standstill. One sample per DRIVE_STEP_S."""
    cumulative = [0.0]
    for a, b in itertools.pairwise(route):
        cumulative.append(cumulative[-1] + distance_m(a, b))
    total = cumulative[-1]
    # Speed constraints along the way: (distance, speed m/s, dwell s).
    constraints: list[tuple[float, float, float]] = [
        (corner, CORNER_SPEED_KMH / 3.6, 0.0) for corner in cumulative[1:-1]
    ]
    light = rng.uniform(300, 900)
    while light < total - 100:
        if rng.random() < 0.45:
            constraints.append((light, 0.0, rng.uniform(8, 45)))
        light += rng.uniform(400, 1200)
    constraints.append((total, 0.0, 0.0))
    constraints.sort()

    def locate(distance: float) -> tuple[Point, float]:
        index = min(max(bisect.bisect_right(cumulative, distance) - 1, 0), len(route) - 2)
        seg_len = cumulative[index + 1] - cumulative[index]
        fraction = 0.0 if seg_len == 0 else (distance - cumulative[index]) / seg_len
        a, b = route[index], route[index + 1]
        return interpolate(a, b, min(max(fraction, 0.0), 1.0)), bearing_deg(a, b)

    def segment_limit(distance: float) -> float:
        index = min(max(bisect.bisect_right(cumulative, distance) - 1, 0), len(route) - 2)
        return _segment_speed_kmh(cumulative[index + 1] - cumulative[index], driver_factor) / 3.6

    t_s = start_ms / 1000.0
    position, heading = locate(0.0)
    samples = [Sample(start_ms, position, 0.0, heading, altitude_at(position))]
    travelled, speed = 0.0, 0.0
    next_constraint = 0
    while next_constraint < len(constraints):
        target_at, target_speed, dwell = constraints[next_constraint]
        if target_at <= travelled + 1e-6:
            next_constraint += 1
            continue
        braking = math.sqrt(target_speed**2 + 2 * DECELERATION_MS2 * (target_at - travelled))
        wanted = min(segment_limit(travelled), braking)
        speed = min(wanted, speed + ACCELERATION_MS2 * DRIVE_STEP_S) if speed < wanted else wanted
        speed = max(speed, 1.0)  # always creep forward; the stop itself is handled below
        step = speed * DRIVE_STEP_S
        t_s += DRIVE_STEP_S
        if travelled + step >= target_at:
            travelled = target_at
            next_constraint += 1
            if target_speed == 0.0:
                speed = 0.0
        else:
            travelled += step
        position, heading = locate(travelled)
        samples.append(
            Sample(round(t_s * 1000), position, speed * 3.6, heading, altitude_at(position))
        )
        if speed == 0.0 and dwell > 0:
            t_s += dwell
            samples.append(Sample(round(t_s * 1000), position, 0.0, heading, altitude_at(position)))
    return samples
