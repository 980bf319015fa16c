"""The adversary: a backend that records everything on `tsp/#`.

Attacks read only what such a backend has: topics, payloads, user properties,
arrival times on the gateway clock, plus public knowledge (the grid formula and
cell size of the published policy, the city's public places and how its roads
run: street-grid legs, monotone from start to end, as in sim.world). Truth is
used only afterwards, to score (`bench.privacy.run`).

Fixed set of estimators (each documented in docs/privacy.md):
- `modal`: the most frequent parked value at night (home) / weekday midday (work);
- `modal-offset`: the same minus the car's secret shift learned from its stays
  at public places (published value minus the public place it must be);
- `arrivals`: trip-end reconstruction (below) for every trip that ends at the
  modal value, coordinate median;
- trip ends: `final` (published end value), and `crossing`: the last change of
  the published value on each axis marks a grid-line crossing; with the
  odometer (or trip distance) the remaining distance from that line bounds the
  end, intersected with the band the final value allows.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.privacy.driver import WireMessage
from bench.privacy.fleet import START_MS, PublicPlace, metres
from sim.geo import Point
from telematics.v1 import streams_pb2

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Report:
    t: float
    stream: str
    x: float  # east, m from the city centre
    y: float  # north
    odometer: float | None
    engine_on: bool | None
    fresh: bool = True  # the value was (by the published refresh rule) recomputed here


@dataclass(frozen=True, slots=True)
class TripView:
    t: float
    trip_id: str
    end: tuple[float, float] | None
    distance_km: float
    duration_s: int
    odometer_km: float


@dataclass
class CarView:
    reports: list[Report] = field(default_factory=list)  # status + nav positions
    trips: list[TripView] = field(default_factory=list)
    locations: list[Report] = field(default_factory=list)  # tbox/location fixes
    messages: int = 0


def _xy(point: object) -> tuple[float, float] | None:
    lat = point.latitude  # type: ignore[attr-defined]
    lon = point.longitude  # type: ignore[attr-defined]
    if lat == 0.0 and lon == 0.0:
        return None
    return metres(Point(lat, lon))


def view(
    wire: list[WireMessage], step_km: float | None = None, refresh_ms: int = 900_000
) -> CarView:
    """Parse what the backend recorded for one car. `step_km` emulates a
    gateway that generalizes odometer and trip distance to that step.

    Which position values were freshly computed is inferred the way the
    published refresh rule says (at most once per interval, measured on the
    timestamps the records carry): only a fresh value changing marks a crossing.
    """

    def gen(value: float) -> float:
        return value if not step_km else math.floor(value / step_km) * step_km

    out = CarView()
    stamps: list[int] = []
    for w in wire:
        out.messages += 1
        stream = w.topic.split("/", 2)[2]
        if stream == "tbox/status":
            s = streams_pb2.VehicleStatus.FromString(w.payload)
            xy = _xy(s.position) if s.HasField("position") else None
            if xy is not None:
                odo = gen(s.odometer_km) if s.odometer_km else None
                stamps.append(s.header.timestamp_ms or int(w.t * 1000))
                out.reports.append(Report(w.t, stream, xy[0], xy[1], odo, s.engine_on))
        elif stream == "avn/nav":
            n = streams_pb2.NavRequest.FromString(w.payload)
            xy = _xy(n.position) if n.HasField("position") else None
            if xy is not None:
                stamps.append(n.header.timestamp_ms or int(w.t * 1000))
                out.reports.append(Report(w.t, stream, xy[0], xy[1], None, None))
        elif stream == "tbox/trip":
            tr = streams_pb2.Trip.FromString(w.payload)
            end = _xy(tr.end) if tr.HasField("end") else None
            out.trips.append(
                TripView(
                    w.t, tr.trip_id, end, gen(tr.distance_km), tr.duration_s, gen(tr.odometer_km)
                )
            )
        elif stream == "tbox/location":
            loc = streams_pb2.Location.FromString(w.payload)
            xy = _xy(loc.position) if loc.HasField("position") else None
            out.locations.append(
                Report(w.t, stream, xy[0] if xy else 0.0, xy[1] if xy else 0.0, None, None)
            )
    anchor: int | None = None
    for i, (report, stamp) in enumerate(zip(out.reports, stamps, strict=True)):
        fresh = anchor is None or abs(stamp - anchor) >= refresh_ms
        if fresh:
            anchor = stamp
        else:
            out.reports[i] = Report(
                report.t,
                report.stream,
                report.x,
                report.y,
                report.odometer,
                report.engine_on,
                False,
            )
    out.reports.sort(key=lambda r: r.t)
    return out


def _hour(t: float) -> float:
    return ((t - START_MS / 1000) % DAY_S) / 3600


def _weekday(t: float) -> bool:
    return int((t - START_MS / 1000) // DAY_S) % 7 < 5


def modal(reports: list[Report], night: bool) -> tuple[float, float] | None:
    counts: Counter[tuple[float, float]] = Counter()
    for r in reports:
        if r.engine_on:
            continue
        h = _hour(r.t)
        if (night and h < 5) or (not night and _weekday(r.t) and 10 <= h < 15):
            counts[(round(r.x, 1), round(r.y, 1))] += 1
    return counts.most_common(1)[0][0] if counts else None


def mean_parked(reports: list[Report]) -> tuple[float, float] | None:
    """Average of every night-time parked report (the averaging attack)."""
    xs = [(r.x, r.y) for r in reports if not r.engine_on and _hour(r.t) < 5]
    if not xs:
        return None
    return statistics.fmean(x for x, _ in xs), statistics.fmean(y for _, y in xs)


def learn_offset(
    car: CarView,
    places: list[tuple[float, float]],
    cell_m: float,
    exclude: list[tuple[float, float] | None],
) -> tuple[float, float] | None:
    """The car's secret shift, from its stays at public places: each distinct
    parked value that has exactly one public place within a cell is taken to
    be that place; value minus place is the shift plus rounding. Median."""
    values = {(round(r.x, 1), round(r.y, 1)) for r in car.reports if r.engine_on is False} - {
        e for e in exclude if e is not None
    }
    dx: list[float] = []
    dy: list[float] = []
    for vx, vy in values:
        near = [(px, py) for px, py in places if abs(vx - px) <= cell_m and abs(vy - py) <= cell_m]
        if len(near) == 1:
            dx.append(vx - near[0][0])
            dy.append(vy - near[0][1])
    if len(dx) < 2:
        return None
    half = cell_m / 2
    return (
        max(-half, min(half, statistics.median(dx))),
        max(-half, min(half, statistics.median(dy))),
    )


def public_xy(places: list[PublicPlace]) -> list[tuple[float, float]]:
    return [metres(p.point) for p in places]


def _odometer_at(points: list[tuple[float, float]], t: float) -> float | None:
    if not points:
        return None
    if t <= points[0][0]:
        return points[0][1]
    for (t0, o0), (t1, o1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return o0 if t1 == t0 else o0 + (o1 - o0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def trip_drives(car: CarView) -> list[tuple[TripView, list[Report]]]:
    """Each recorded trip with the moving reports of the drive it closes."""
    out = []
    reports = car.reports
    for trip in car.trips:
        drive: list[Report] = []
        for r in reversed(reports):
            if r.t >= trip.t:
                continue
            if r.engine_on is False:
                if drive:
                    break
                continue
            if trip.t - r.t > 4 * 3600:
                break
            drive.append(r)
        drive.reverse()
        out.append((trip, drive))
    return out


def reconstruct_end(
    trip: TripView,
    drive: list[Report],
    odometer: list[tuple[float, float]],
    final: tuple[float, float],
    shift: tuple[float, float],
    cell_m: float,
) -> tuple[float, float]:
    """Trip end from the last grid-line crossing on each axis and the distance
    still driven after it (odometer), within the band the final value allows.

    Roads run in street-grid legs, monotone from start to end (sim.world), so
    after crossing a line the car only moves away from it: its offset from
    that line at the end is at most the distance driven since; after both
    crossings the two offsets add up to at least the distance driven since the
    later one, and to at most (with 20 % slack for diagonal roads) the distance
    since the earlier one. The estimate is the centre of the points of the
    final band that satisfy all of that (100 m lattice).
    """
    half = cell_m / 2
    end_odo = trip.odometer_km or None
    centre = (final[0] - shift[0], final[1] - shift[1])
    crossings: list[tuple[int, float, float, float, float]] = []  # axis, line, dir, lo, hi km
    fresh = [(r.t, (r.x, r.y)) for r in drive if r.fresh] + [(trip.t, final)]
    if end_odo is not None:
        for axis in (0, 1):
            last = None
            for (t0, p0), (t1, p1) in itertools.pairwise(fresh):
                if abs(p1[axis] - p0[axis]) > 1.0:
                    direction = 1.0 if p1[axis] > p0[axis] else -1.0
                    last = (t0, t1, p1[axis] - direction * half - shift[axis], direction)
            if last is None:
                continue
            lo, hi = _odometer_at(odometer, last[0]), _odometer_at(odometer, last[1])
            if lo is None or hi is None:
                continue
            crossings.append((axis, last[2], last[3], end_odo - hi, end_odo - lo))
    if not crossings:
        return centre
    tol = 60.0
    later = max(crossings, key=lambda c: -c[3]) if len(crossings) == 2 else None
    earlier = min(crossings, key=lambda c: -c[3]) if len(crossings) == 2 else None
    sx = sy = 0.0
    n = 0
    steps = [-half + k * cell_m / 20 for k in range(21)]
    for dy in steps:
        y = centre[1] + dy
        for dx in steps:
            x = centre[0] + dx
            offsets = {}
            ok = True
            for axis, line, direction, _short, long in crossings:
                off = ((x, y)[axis] - line) * direction
                if off < -tol or off > long * 1000 + tol:
                    ok = False
                    break
                offsets[axis] = off
            if ok and later is not None and earlier is not None:
                total = offsets[0] + offsets[1]
                if total < later[3] * 1000 - tol or total > earlier[4] * 1200 + tol:
                    ok = False
            if ok:
                sx += x
                sy += y
                n += 1
    if n == 0:
        return centre
    return sx / n, sy / n


def odometer_track(car: CarView) -> list[tuple[float, float]]:
    return [(r.t, r.odometer) for r in car.reports if r.odometer is not None]
