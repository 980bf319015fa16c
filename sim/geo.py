"""Small-area geometry on WGS84 (equirectangular approximation, good to ~0.1% at city scale)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Metres per degree of latitude; the same constant the contract uses for the grid bounds.
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class Point:
    lat: float
    lon: float


def offset(point: Point, north_m: float, east_m: float) -> Point:
    return Point(
        point.lat + north_m / METRES_PER_DEGREE,
        point.lon + east_m / (METRES_PER_DEGREE * math.cos(math.radians(point.lat))),
    )


def distance_m(a: Point, b: Point) -> float:
    mean_lat = math.radians((a.lat + b.lat) / 2)
    north = (b.lat - a.lat) * METRES_PER_DEGREE
    east = (b.lon - a.lon) * METRES_PER_DEGREE * math.cos(mean_lat)
    return math.hypot(north, east)


def bearing_deg(a: Point, b: Point) -> float:
    """Compass heading from a to b: 0 = north, 90 = east."""
    mean_lat = math.radians((a.lat + b.lat) / 2)
    north = b.lat - a.lat
    east = (b.lon - a.lon) * math.cos(mean_lat)
    return math.degrees(math.atan2(east, north)) % 360.0


def interpolate(a: Point, b: Point, fraction: float) -> Point:
    return Point(a.lat + (b.lat - a.lat) * fraction, a.lon + (b.lon - a.lon) * fraction)


def cell_half_extent_deg(lat: float, cell_size_m: float) -> tuple[float, float]:
    """Half the height and width (degrees) of an approximate-location grid cell at `lat`."""
    half_lat = cell_size_m / METRES_PER_DEGREE / 2
    half_lon = cell_size_m / (METRES_PER_DEGREE * math.cos(math.radians(lat))) / 2
    return half_lat, half_lon
