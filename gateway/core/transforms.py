"""Field transforms: small pure functions over values and protobuf messages.

Nothing here does I/O or reads a clock. Keys are passed in explicitly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from telematics.v1 import common_pb2

METRES_PER_DEGREE_LAT: Final = 111_320.0
_MIN_COS_LAT: Final = 0.01  # keeps longitude cells finite near the poles


_SHA256_BLOCK: Final = 64
# Byte maps XOR-ing every key byte with HMAC's inner and outer pad.
_IPAD: Final = bytes(b ^ 0x36 for b in range(256))
_OPAD: Final = bytes(b ^ 0x5C for b in range(256))


@lru_cache(maxsize=64)
def _hmac_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states that have absorbed HMAC's inner and outer key pads (RFC
    2104). A handful of keys are ever live (the operator key, its internal
    twin, a rotation's old one); a key change is a new cache entry."""
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\x00")
    return (
        hashlib.sha256(key.translate(_IPAD)),
        hashlib.sha256(key.translate(_OPAD)),
    )


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256, byte for byte what `hmac.digest(key, data, "sha256")`
    returns, from padded states computed once per key: a third of the one-shot
    call's cost, which sets up the key and the digest on every call. Several
    pseudonyms per message go through it."""
    inner, outer = _hmac_pads(key)
    inner = inner.copy()
    inner.update(data)
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.digest()


def pseudonym(key: bytes, purpose: str, value: str) -> str:
    """Keyed HMAC-SHA-256 pseudonym (128 bits, hex).

    The purpose separates domains: the same VIN gets unrelated pseudonyms in
    different apps, and a MAC pseudonym cannot be matched against a VIN one.
    """
    return hmac_sha256(key, purpose.encode() + b"\x00" + value.encode()).hex()[:32]


# Pseudonym domain per field name; the field name itself when not listed.
_FIELD_PURPOSE: Final = {"session_id": "voice_session"}


def pseudonymize_field(key: bytes, field_name: str, value: str) -> str:
    if field_name == "bluetooth_mac":
        value = normalize_mac(value)
    return pseudonym(key, _FIELD_PURPOSE.get(field_name, field_name), value)


@dataclass(frozen=True, slots=True)
class GridOffset:
    """Sticky per-vehicle secret shift, as fractions of a cell in [0, 1)
    (applied as [-0.5, 0.5) of a cell per axis)."""

    lat_fraction: float
    lon_fraction: float


@lru_cache(maxsize=65536)
def grid_offset(key: bytes, vin: str) -> GridOffset:
    """Derived from the operator key, so it is stable across restarts without
    storing anything, and unknowable to anyone without the key. Averaging many
    coarse reports of a parked car converges on the cell centre, not the car.
    """
    digest = hmac_sha256(key, b"grid-offset\x00" + vin.encode())
    a, b = struct.unpack_from(">QQ", digest)
    return GridOffset(a / 2.0**64, b / 2.0**64)


def destination_offset(key: bytes, vin: str) -> GridOffset:
    """The shift for places the car is not at (a navigation destination):
    independent of `grid_offset`. A backend often knows a destination exactly
    (it answered the search); with the position shift, every (exact, coarse)
    pair would narrow the shift that hides where the car is parked."""
    return grid_offset(key, "destination\x00" + vin)


def coarse_cell_degrees(cell_size_m: float, latitude: float) -> tuple[float, float]:
    """Cell height and width in degrees at a (snapped) latitude."""
    dlat = cell_size_m / METRES_PER_DEGREE_LAT
    cos_lat = max(math.cos(math.radians(latitude)), _MIN_COS_LAT)
    dlon = min(cell_size_m / (METRES_PER_DEGREE_LAT * cos_lat), 360.0)
    return dlat, dlon


def coarsen_position(
    latitude: float, longitude: float, cell_size_m: float, offset: GridOffset
) -> tuple[float, float]:
    """The global-grid point nearest to (true position + the vehicle's secret shift).

    The shift is up to half a cell per axis (`offset` fractions map to
    [-0.5, 0.5)). Publishing the centre of the cell that contains the truth
    would mark every cell change as a grid-line crossing and bound the truth
    to that cell from a single report; with a secret shift the published
    point bounds it only to about one cell either way, and the lines where
    the value changes are the car's own, unknown ones. The shift is sticky,
    so a parked car always yields the same value: averaging reveals nothing.

    Latitude is quantized first; the longitude cell width is taken at the
    snapped latitude, so it reveals nothing finer than the latitude band.
    """
    dlat = cell_size_m / METRES_PER_DEGREE_LAT
    row = math.floor((latitude + (offset.lat_fraction - 0.5) * dlat + 90.0) / dlat)
    snapped_lat = min(max((row + 0.5) * dlat - 90.0, -90.0), 90.0)
    _, dlon = coarse_cell_degrees(cell_size_m, snapped_lat)
    col = math.floor((longitude + (offset.lon_fraction - 0.5) * dlon + 180.0) / dlon)
    snapped_lon = ((col + 0.5) * dlon + 360.0) % 360.0 - 180.0
    if snapped_lat == latitude and snapped_lon == longitude:
        # The input sat exactly on a grid point: move so the output never
        # reproduces the input.
        snapped_lon = (snapped_lon + dlon / 4.0 + 180.0) % 360.0 - 180.0
    return snapped_lat, snapped_lon


def valid_position(point: common_pb2.GeoPoint) -> bool:
    """A usable WGS84 coordinate: finite and in range. GPS without a fix
    reports NaN; anything else out of range is a broken unit."""
    lat, lon = point.latitude, point.longitude
    # Chained comparisons are False for NaN, so no separate isnan check.
    return -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0


def coarsen_geopoint(point: common_pb2.GeoPoint, cell_size_m: float, offset: GridOffset) -> None:
    """Approximate a GeoPoint in place: grid-snapped position, motion cleared,
    accuracy stated as the cell size."""
    lat, lon = coarsen_position(point.latitude, point.longitude, cell_size_m, offset)
    point.Clear()
    point.latitude = lat
    point.longitude = lon
    point.horizontal_accuracy_m = cell_size_m


def generalize_number(value: int | float, step: float) -> int | float:
    """`value` rounded to the nearest multiple of `step` (halves away from
    zero), so published values lie on the policy's step grid. Integer inputs
    stay integers (the policy refuses a fractional step for them)."""
    steps = math.floor(abs(value) / step + 0.5)
    result = math.copysign(steps * step, value) if steps else 0.0
    if isinstance(value, int):
        return int(result)
    return result


_V6_NET48 = ((1 << 48) - 1) << 80
_V6_NET40 = ((1 << 40) - 1) << 88
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: IPv4 in the last 32 bits


def truncate_ip(value: str) -> str:
    """IPv4 -> /24, IPv6 -> /48. Unparseable input yields "" (fail closed).

    An IPv4 address carried inside IPv6 keeps no more than its /24: mapped
    (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) become the IPv4 /24; 6to4
    (2002:AABB:CCDD::/48 holds all 32 bits) is cut to /40. Teredo,
    IPv4-compatible and ISATAP addresses carry the client's IPv4 below /48.
    """
    text = value.strip()
    if len(text) <= _LONGEST_CACHED_ADDRESS:
        return _truncate_remembered(text)
    return _truncate(text)


# A car keeps its address for hours, and parsing an IPv6 one costs ~10 µs:
# results are remembered. Only address-sized texts (the longest IPv6 text with
# an IPv4 tail is 45 characters), so the cache stays a few MiB whatever cars send.
_LONGEST_CACHED_ADDRESS: Final = 64


@lru_cache(maxsize=16_384)
def _truncate_remembered(text: str) -> str:
    return _truncate(text)


def forget_addresses() -> None:
    """Drop the remembered addresses (their keys are cars' full IP addresses):
    after an erasure none of them stays in memory, whichever car it was."""
    _truncate_remembered.cache_clear()


def remembered_addresses() -> int:
    return _truncate_remembered.cache_info().currsize


def _truncate(text: str) -> str:
    fast = _ipv4_slash24(text)
    if fast is not None:
        return fast
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif addr.sixtofour is not None:
            return str(ipaddress.IPv6Address(int(addr) & _V6_NET40))
    # Network address by masking: same result as ip_network(.., strict=False),
    # a fraction of the cost (and a scope id never survives).
    if addr.version == 4:
        return str(ipaddress.IPv4Address(int(addr) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address(int(addr) & _V6_NET48))


def _ipv4_slash24(text: str) -> str | None:
    """Dotted-quad IPv4 in canonical form -> its /24, without ipaddress (hot path).
    Anything unusual (leading zeros, non-ASCII digits) returns None for the full parser."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    for part in parts:
        if (
            not (part.isascii() and part.isdigit())
            or len(part) > 3
            or (len(part) > 1 and part[0] == "0")
            or int(part) > 255
        ):
            return None
    return f"{parts[0]}.{parts[1]}.{parts[2]}.0"


def normalize_mac(value: str) -> str:
    """Canonical form before hashing, so 'aa-bb-..' and 'AA:BB:..' match."""
    return value.strip().upper().replace("-", ":")
