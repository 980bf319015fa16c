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
- `arrivals`: the place fitted to every drive that reached or left the modal
  value (`fit_place`);
- trip ends: `final` (published end value), and `crossing`: the change of
  the published value nearest to the end on each axis marks a grid-line
  crossing; with the odometer the road distance from that line bounds the
  end, within the band the final value allows; the next drive, leaving from
  there, bounds it the same way (`fit_place` over those two legs).
"""

from __future__ import annotations

import bisect
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
    energy_kwh: float | None = None


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
                    w.t,
                    tr.trip_id,
                    end,
                    gen(tr.distance_km),
                    tr.duration_s,
                    gen(tr.odometer_km),
                    tr.energy_kwh or None,
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
    """Odometer at `t`, linear between the reports that carry one."""
    if not points:
        return None
    k = bisect.bisect_right(points, t, key=lambda p: p[0])
    if k == 0:
        return points[0][1]
    if k >= len(points):
        return points[-1][1]
    (t0, o0), (t1, o1) = points[k - 1], points[k]
    return o0 if t1 == t0 else o0 + (o1 - o0) * (t - t0) / (t1 - t0)


def trip_drives(car: CarView) -> list[tuple[TripView, list[Report], float | None]]:
    """Each recorded trip with the moving reports of the drive it closes and
    the odometer when that drive started (last parked report before it)."""
    out = []
    reports = car.reports
    for trip in car.trips:
        drive: list[Report] = []
        start_odo = None
        for r in reversed(reports):
            if r.t >= trip.t:
                continue
            if r.engine_on is False:
                if drive:
                    start_odo = r.odometer
                    break
                continue
            if trip.t - r.t > 4 * 3600:
                break
            drive.append(r)
        drive.reverse()
        out.append((trip, drive, start_odo))
    return out


@dataclass(frozen=True, slots=True)
class Leg:
    """What one drive says about a place it left or reached: per axis, the
    grid line crossed nearest to the place (in the adversary's frame), the
    side of it the place is on, and the road distance between crossing and
    place (odometer window)."""

    axes: tuple[tuple[int, float, float, float, float], ...]  # axis, line, side, lo m, hi m


def leg(
    track: list[tuple[float, tuple[float, float]]],
    odometer: list[tuple[float, float]],
    place_odo: float | None,
    shift: tuple[float, float],
    half: float,
    arriving: bool,
) -> Leg | None:
    """`track`: fresh (time, value) reports in time order, the place's own
    value at the arriving end (or at the start when leaving)."""
    if place_odo is None or len(track) < 2:
        return None
    axes = []
    for axis in (0, 1):
        pairs = list(itertools.pairwise(track))
        if arriving:
            pairs.reverse()
        for (t0, p0), (t1, p1) in pairs:
            if abs(p1[axis] - p0[axis]) <= 1.0:
                continue
            direction = 1.0 if p1[axis] > p0[axis] else -1.0
            line = p1[axis] - direction * half - shift[axis]
            a, b = _odometer_at(odometer, t0), _odometer_at(odometer, t1)
            if a is None or b is None:
                break
            if arriving:
                lo, hi, side = place_odo - b, place_odo - a, direction
            else:
                lo, hi, side = a - place_odo, b - place_odo, -direction
            axes.append((axis, line, side, max(0.0, lo) * 1000, max(0.0, hi) * 1000))
            break
    return Leg(tuple(axes)) if axes else None


def fit_place(
    value: tuple[float, float], legs: list[Leg], shift: tuple[float, float], cell_m: float
) -> tuple[float, float]:
    """The place behind a published value: the centre of the points of its
    band (100 m lattice) consistent with the most legs.

    Roads run in street-grid legs, monotone from start to end (sim.world), so
    after crossing a line a car only moves away from it: a place's offset from
    the line nearest to it is at most the road distance between them; with a
    line crossed on each axis, the two offsets add up to at least the distance
    to the nearer crossing and at most (20 % slack for diagonal roads) the
    distance to the farther one.
    """
    half = cell_m / 2
    cx, cy = value[0] - shift[0], value[1] - shift[1]
    if not legs:
        return cx, cy
    tol = 60.0
    # Per leg: its axes, and the bounds on the sum of both offsets.
    prepared = []
    for lg in legs:
        sums = None
        if len(lg.axes) == 2:
            near = min(lg.axes, key=lambda a: a[3])
            far = max(lg.axes, key=lambda a: a[3])
            sums = (near[3] - tol, far[4] * 1.2 + tol)
        prepared.append(([(a[0], a[1], a[2], a[4] + tol) for a in lg.axes], sums))
    best, sx, sy, n = -1, 0.0, 0.0, 0
    steps = [-half + k * cell_m / 20 for k in range(21)]
    for dy in steps:
        y = cy + dy
        for dx in steps:
            x = cx + dx
            point = (x, y)
            score = 0
            for axes, sums in prepared:
                total = 0.0
                for axis, line, side, limit in axes:
                    off = (point[axis] - line) * side
                    if off < -tol or off > limit:
                        break
                    total += off
                else:
                    if sums is None or sums[0] <= total <= sums[1]:
                        score += 1
            if score > best:
                best, sx, sy, n = score, x, y, 1
            elif score == best:
                sx, sy, n = sx + x, sy + y, n + 1
    return sx / n, sy / n


def trip_legs(
    car: CarView, shift: tuple[float, float], cell_m: float
) -> list[tuple[TripView, tuple[float, float], list[Leg]]]:
    """Each trip with its end's published value and the legs about that end:
    the drive that reached it and the next drive, which left from it."""
    half = cell_m / 2
    odometer = odometer_track(car)
    drives = trip_drives(car)
    times = [r.t for r in car.reports]
    out = []
    for i, (trip, drive, _start_odo) in enumerate(drives):
        # Where the car then stood: the last parked value before it moved
        # again (refreshed by then if the stay was long enough); else the
        # trip's published end.
        until = drives[i + 1][1][0].t if i + 1 < len(drives) and drives[i + 1][1] else math.inf
        final = trip.end
        first, last = bisect.bisect_right(times, trip.t), bisect.bisect_left(times, until)
        for k in range(last - 1, first - 1, -1):
            if car.reports[k].engine_on is False:
                final = (car.reports[k].x, car.reports[k].y)
                break
        if final is None:
            continue
        legs = []
        track = [(r.t, (r.x, r.y)) for r in drive if r.fresh] + [(trip.t, final)]
        arrival = leg(track, odometer, trip.odometer_km or None, shift, half, arriving=True)
        if arrival is not None:
            legs.append(arrival)
        if i + 1 < len(drives):
            following, next_drive, start_odo = drives[i + 1]
            if start_odo is None and following.odometer_km and following.distance_km:
                # No parked odometer: the next trip's end odometer minus its distance.
                start_odo = following.odometer_km - following.distance_km
            departure_track = [(trip.t, final)] + [(r.t, (r.x, r.y)) for r in next_drive if r.fresh]
            departure = leg(departure_track, odometer, start_odo, shift, half, arriving=False)
            if departure is not None:
                legs.append(departure)
        out.append((trip, final, legs))
    return out


def odometer_track(car: CarView) -> list[tuple[float, float]]:
    return [(r.t, r.odometer) for r in car.reports if r.odometer is not None]


# Energy the fleet's cars report per km driven (public: any owner can read it
# off the car): trip energy is a second measure of trip distance.
KWH_PER_KM = 0.17


@dataclass(frozen=True, slots=True)
class Ring:
    """Known start (or known next end) of a trip and the road distance to the
    unknown place, in metres: the place lies where the street-grid (Manhattan)
    distance from `centre` is within [lo, hi]."""

    centre: tuple[float, float]
    lo: float
    hi: float


def distance_interval_m(
    distance_km: float,
    distance_step_km: float,
    energy_kwh: float | None,
    energy_step_kwh: float,
    tolerance_m: float = 50.0,
) -> tuple[float, float]:
    """The road distances (m) consistent with a published trip distance and
    trip energy, each rounded to its step (halves away from zero: the
    gateway's `generalize`): the intersection of both intervals."""
    half = distance_step_km / 2
    lo, hi = max(0.0, distance_km - half), distance_km + half
    if energy_kwh is not None and energy_step_kwh:
        e_half = energy_step_kwh / 2
        lo = max(lo, (energy_kwh - e_half) / KWH_PER_KM)
        hi = min(hi, (energy_kwh + e_half) / KWH_PER_KM)
        if lo > hi:  # rounding at both edges: keep the distance's own interval
            lo, hi = max(0.0, distance_km - half), distance_km + half
    return lo * 1000 - tolerance_m, hi * 1000 + tolerance_m


def _ring_spans(ring: Ring, x: float) -> list[tuple[float, float]]:
    """The y intervals at column `x` whose Manhattan distance from the ring's
    centre lies in [lo, hi]."""
    ax = abs(x - ring.centre[0])
    inner, outer = ring.lo - ax, ring.hi - ax
    if outer < 0:
        return []
    cy = ring.centre[1]
    if inner <= 0:
        return [(cy - outer, cy + outer)]
    return [(cy - outer, cy - inner), (cy + inner, cy + outer)]


def _intersect(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo < hi:
                out.append((lo, hi))
    return out


def ring_place(
    centre: tuple[float, float], band_half: float, rings: list[Ring]
) -> tuple[float, float] | None:
    """The place behind a published value `centre` (shift removed where known)
    that lies within `band_half` of it on each axis and on every ring: the
    centroid of that region (columns of 50 m), None when it is empty.

    The adversary knows where the trip began (say the owner's address, or the
    previous trip's end) and, for the second ring, where the next trip ended;
    roads run in street-grid legs (sim.world), so the road distance is the
    Manhattan distance unless a diagonal arterial shortened it (the attack
    takes the likely case)."""
    # Columns no wider than half a ring's tolerance band (100 m for exact
    # distances), so a thin intersection of two rings is not stepped over.
    columns = max(1, math.ceil(2 * band_half / 50.0))
    width = 2 * band_half / columns
    band = [(centre[1] - band_half, centre[1] + band_half)]
    area = sx = sy = 0.0
    for k in range(columns):
        x = centre[0] - band_half + (k + 0.5) * width
        spans = band
        for ring in rings:
            spans = _intersect(spans, _ring_spans(ring, x))
            if not spans:
                break
        for lo, hi in spans:
            length = hi - lo
            area += length
            sx += x * length
            sy += (lo + hi) / 2 * length
    if area <= 0:
        return None
    return sx / area, sy / area
