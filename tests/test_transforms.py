"""Property tests of the field transforms (location coarsening, pseudonyms, IPs)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core.transforms import (
    METRES_PER_DEGREE_LAT,
    GridOffset,
    coarse_cell_degrees,
    coarsen_geopoint,
    coarsen_position,
    grid_offset,
    hmac_sha256,
    normalize_mac,
    pseudonym,
    pseudonymize_field,
    truncate_ip,
    valid_position,
)
from telematics.v1 import common_pb2

HEX32 = re.compile(r"^[0-9a-f]{32}$")
CELL_SIZES = [200.0, 2000.0]

vins = st.from_regex(r"\A[A-HJ-NPR-Z0-9]{17}\Z")
keys = st.binary(min_size=32, max_size=64)
lats = st.floats(min_value=-85.0, max_value=85.0, allow_nan=False)
lons = st.floats(min_value=-180.0, max_value=180.0, allow_nan=False)
offsets = st.builds(
    GridOffset,
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
cells = st.sampled_from([*CELL_SIZES, 5000.0])
FAST = settings(max_examples=200, deadline=None)


def lon_delta(a: float, b: float) -> float:
    """Shortest longitude difference, across the antimeridian."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


# ------------------------------------------------------------ coarsening


def shift_of(cell: float, lat: float, offset: GridOffset) -> tuple[float, float]:
    """The vehicle's secret shift in degrees (at the snapped latitude for longitude)."""
    dlat, dlon = coarse_cell_degrees(cell, lat)
    return (offset.lat_fraction - 0.5) * dlat, (offset.lon_fraction - 0.5) * dlon


@FAST
@given(lat=lats, lon=lons, cell=cells, offset=offsets)
def test_coarse_point_is_within_one_cell_per_axis(
    lat: float, lon: float, cell: float, offset: GridOffset
) -> None:
    """Half a cell of secret shift plus half a cell of snapping."""
    out_lat, out_lon = coarsen_position(lat, lon, cell, offset)
    dlat, dlon = coarse_cell_degrees(cell, out_lat)
    assert abs(out_lat - lat) <= dlat + 1e-9
    assert lon_delta(out_lon, lon) <= dlon + 1e-9
    assert -90.0 <= out_lat <= 90.0
    assert -180.0 <= out_lon < 180.0


@FAST
@given(lat=lats, lon=lons, cell=st.sampled_from(CELL_SIZES), offset=offsets)
def test_coarse_error_is_bounded_by_a_diagonal_in_metres(
    lat: float, lon: float, cell: float, offset: GridOffset
) -> None:
    out_lat, out_lon = coarsen_position(lat, lon, cell, offset)
    dy = (out_lat - lat) * METRES_PER_DEGREE_LAT
    dx = lon_delta(out_lon, lon) * METRES_PER_DEGREE_LAT * math.cos(math.radians(lat))
    assert math.hypot(dx, dy) <= cell * math.sqrt(2) * 1.01


@FAST
@given(lat=lats, lon=lons, cell=cells, offset=offsets)
def test_coarse_output_never_equals_input(
    lat: float, lon: float, cell: float, offset: GridOffset
) -> None:
    assert coarsen_position(lat, lon, cell, offset) != (lat, lon)


@FAST
@given(cell=cells, lat=lats, lon=st.floats(-170.0, 170.0))
def test_grid_point_as_input_is_still_moved(cell: float, lat: float, lon: float) -> None:
    centre = coarsen_position(lat, lon, cell, GridOffset(0.5, 0.5))
    assert coarsen_position(*centre, cell, GridOffset(0.5, 0.5)) != centre


@FAST
@given(lat=lats, lon=lons, cell=cells, key=keys, vin=vins)
def test_coarsening_is_deterministic(lat: float, lon: float, cell: float, key: bytes,
                                     vin: str) -> None:
    first = coarsen_position(lat, lon, cell, grid_offset(key, vin))
    grid_offset.cache_clear()  # a restart: nothing stored, same offset from the key
    assert coarsen_position(lat, lon, cell, grid_offset(key, vin)) == first


@FAST
@given(key=keys, vin=vins)
def test_grid_offset_is_sticky_and_in_unit_square(key: bytes, vin: str) -> None:
    offset = grid_offset(key, vin)
    assert 0.0 <= offset.lat_fraction < 1.0 and 0.0 <= offset.lon_fraction < 1.0
    assert grid_offset.__wrapped__(key, vin) == offset


@FAST
@given(key=keys, a=vins, b=vins)
def test_different_vins_get_different_offsets(key: bytes, a: str, b: str) -> None:
    assume(a != b)
    assert grid_offset(key, a) != grid_offset(key, b)


@FAST
@given(k1=keys, k2=keys, vin=vins)
def test_different_keys_give_different_offsets(k1: bytes, k2: bytes, vin: str) -> None:
    assume(k1 != k2)
    assert grid_offset(k1, vin) != grid_offset(k2, vin)


@FAST
# Away from the antimeridian, where the last column of a band is a partial one.
@given(lat=st.floats(-80, 80), lon=st.floats(-179.0, 179.0), cell=cells, offset=offsets)
def test_outputs_are_points_of_one_global_grid(
    lat: float, lon: float, cell: float, offset: GridOffset
) -> None:
    """Every car's values lie on the same public lattice (cell centres), so the
    value itself says nothing about the car's shift."""
    out_lat, out_lon = coarsen_position(lat, lon, cell, offset)
    dlat, dlon = coarse_cell_degrees(cell, out_lat)
    rows = (out_lat + 90.0) / dlat - 0.5
    cols = (out_lon + 180.0) / dlon - 0.5
    # (floating point: many thousand columns for small cells)
    assert abs(rows - round(rows)) < 1e-3
    assert abs(cols - round(cols)) < 1e-3 or abs(cols - round(cols) - 0.25) < 1e-3


def test_published_value_is_not_the_centre_of_the_true_cell() -> None:
    """v1 published the centre of the cell containing the truth: one report
    bounded the car to that cell, and a change of value marked the exact
    moment a public grid line was crossed. Now the value is the grid point
    nearest to (truth + secret shift): over many positions, the truth is
    often outside the published point's cell, and the crossings happen on
    the car's own, secret lines."""
    cell, offset = 2000.0, GridOffset(0.9, 0.1)  # a shift of +0.4 / -0.4 cell
    rng = random.Random(7)
    outside = 0
    for _ in range(2000):
        lat, lon = rng.uniform(47.0, 49.0), rng.uniform(10.0, 12.0)
        out_lat, out_lon = coarsen_position(lat, lon, cell, offset)
        dlat, dlon = coarse_cell_degrees(cell, out_lat)
        if abs(out_lat - lat) > dlat / 2 or abs(out_lon - lon) > dlon / 2:
            outside += 1
    # With the public (v1) grid the truth is always inside; here about
    # 1 - (1 - 0.4)^2 = 64% of the time it is not.
    assert 0.55 < outside / 2000 < 0.72
    v1_like = GridOffset(0.5, 0.5)  # no shift: the cell-centre publication
    for _ in range(200):
        lat, lon = rng.uniform(47.0, 49.0), rng.uniform(10.0, 12.0)
        out_lat, out_lon = coarsen_position(lat, lon, cell, v1_like)
        dlat, dlon = coarse_cell_degrees(cell, out_lat)
        assert abs(out_lat - lat) <= dlat / 2 + 1e-12


@FAST
@given(
    lat=lats,
    lon=st.floats(-170.0, 170.0),
    cell=cells,
    offset=offsets,
    fy=st.floats(-0.45, 0.45),
    fx=st.floats(-0.45, 0.45),
)
def test_points_in_the_same_shifted_cell_map_to_the_same_output(
    lat: float, lon: float, cell: float, offset: GridOffset, fy: float, fx: float
) -> None:
    centre = coarsen_position(lat, lon, cell, offset)
    assume(abs(fy) > 1e-6 or abs(fx) > 1e-6)  # the exact grid point itself is nudged
    sy, sx = shift_of(cell, centre[0], offset)
    dlat, dlon = coarse_cell_degrees(cell, centre[0])
    # The truths that map to `centre` form a cell around (centre - shift).
    inside = (centre[0] - sy + fy * dlat, centre[1] - sx + fx * dlon)
    assume(-89.0 < inside[0] < 89.0)
    assert coarsen_position(*inside, cell, offset) == centre


@pytest.mark.parametrize("cell", CELL_SIZES)
@settings(max_examples=25, deadline=None)
@given(key=keys, vin=vins, lat=st.floats(-80, 80), lon=st.floats(-170, 170))
def test_averaging_a_parked_car_converges_on_its_grid_point_not_the_car(
    cell: float, key: bytes, vin: str, lat: float, lon: float
) -> None:
    offset = grid_offset(key, vin)
    centre = coarsen_position(lat, lon, cell, offset)
    sy, sx = shift_of(cell, centre[0], offset)
    dlat, dlon = coarse_cell_degrees(cell, centre[0])
    # The car is parked 0.3 cells from the middle of the truths that map to
    # `centre` (far from the car's own cell edges).
    car = (centre[0] - sy + 0.3 * dlat, centre[1] - sx + 0.3 * dlon)
    rng = random.Random(f"{vin}{lat}{lon}")
    noise_deg = 5.0 / METRES_PER_DEGREE_LAT  # a few metres of GPS noise

    def mean_error_m(n: int) -> float:
        reports = [
            coarsen_position(
                car[0] + rng.gauss(0, noise_deg), car[1] + rng.gauss(0, noise_deg), cell, offset
            )
            for _ in range(n)
        ]
        mean_lat = sum(r[0] for r in reports) / n
        mean_lon = sum(r[1] for r in reports) / n
        assert mean_lat == pytest.approx(centre[0], abs=1e-9)
        assert mean_lon == pytest.approx(centre[1], abs=1e-9)
        dy = (mean_lat - car[0]) * METRES_PER_DEGREE_LAT
        dx = (mean_lon - car[1]) * METRES_PER_DEGREE_LAT * math.cos(math.radians(car[0]))
        return math.hypot(dx, dy)

    few, many = mean_error_m(10), mean_error_m(500)
    # More reports give no better estimate: the error is the secret shift's
    # (plus where the car happens to be), whatever the number of reports.
    assert many == pytest.approx(few, rel=1e-6)


@pytest.mark.parametrize("cell", CELL_SIZES)
@FAST
@given(lat=lats, lon=lons, offset=offsets,
       alt=st.floats(-100, 9000), heading=st.floats(0, 360), speed=st.floats(0, 250))
def test_coarsen_geopoint_clears_motion_and_states_accuracy(
    cell: float, lat: float, lon: float, offset: GridOffset, alt: float, heading: float,
    speed: float,
) -> None:
    point = common_pb2.GeoPoint(latitude=lat, longitude=lon, altitude_m=alt,
                                heading_deg=heading, speed_kmh=speed, horizontal_accuracy_m=3)
    coarsen_geopoint(point, cell, offset)
    assert point.altitude_m == 0 and point.heading_deg == 0 and point.speed_kmh == 0
    assert point.horizontal_accuracy_m == cell
    assert (point.latitude, point.longitude) == coarsen_position(lat, lon, cell, offset)


@pytest.mark.parametrize(
    ("lat", "lon", "ok"),
    [
        (48.1, 11.5, True),
        (90.0, 180.0, True),
        (-90.0, -180.0, True),
        (0.0, 0.0, True),
        (math.nan, 11.5, False),
        (48.1, math.nan, False),
        (math.inf, 11.5, False),
        (48.1, -math.inf, False),
        (90.5, 11.5, False),
        (48.1, -180.5, False),
    ],
)
def test_valid_position(lat: float, lon: float, ok: bool) -> None:
    assert valid_position(common_pb2.GeoPoint(latitude=lat, longitude=lon)) is ok


def test_bigger_cells_are_coarser() -> None:
    offset = GridOffset(0.25, 0.75)
    rng = random.Random(7)
    points = [(rng.uniform(47, 49), rng.uniform(10, 12)) for _ in range(300)]
    small = {coarsen_position(lat, lon, 200.0, offset) for lat, lon in points}
    large = {coarsen_position(lat, lon, 20_000.0, offset) for lat, lon in points}
    assert len(large) < len(small)


def test_antimeridian_wraps() -> None:
    offset = GridOffset(0.5, 0.5)
    for lon in (179.9999, -179.9999, 180.0, -180.0):
        out_lat, out_lon = coarsen_position(0.0, lon, 2000.0, offset)
        _, dlon = coarse_cell_degrees(2000.0, out_lat)
        assert -180.0 <= out_lon < 180.0
        assert lon_delta(out_lon, lon) <= dlon / 2 + 1e-9


# ------------------------------------------------------------- pseudonyms

values = st.text(min_size=8, max_size=64)
purposes = st.sampled_from(["bluetooth_mac", "voice_session", "vin/music", "vin/weather"])


@FAST
@given(key=keys, purpose=purposes, value=values)
def test_pseudonym_is_stable_32_hex_and_hides_input(key: bytes, purpose: str,
                                                    value: str) -> None:
    out = pseudonym(key, purpose, value)
    assert HEX32.match(out)
    assert out == pseudonym(key, purpose, value)
    assert value not in out and value.lower() not in out


@FAST
@given(k1=keys, k2=keys, purpose=purposes, value=values)
def test_pseudonym_differs_across_keys(k1: bytes, k2: bytes, purpose: str, value: str) -> None:
    assume(k1 != k2)
    assert pseudonym(k1, purpose, value) != pseudonym(k2, purpose, value)


@FAST
@given(key=keys, p1=purposes, p2=purposes, value=values)
def test_pseudonym_differs_across_purposes(key: bytes, p1: str, p2: str, value: str) -> None:
    assume(p1 != p2)
    assert pseudonym(key, p1, value) != pseudonym(key, p2, value)


@FAST
@given(key=keys, a=values, b=values)
def test_pseudonym_differs_across_values(key: bytes, a: str, b: str) -> None:
    assume(a != b)
    assert pseudonym(key, "vin/x", a) != pseudonym(key, "vin/x", b)


@FAST
@given(key=keys, purpose=purposes, value=values)
def test_pseudonym_is_keyed_not_a_plain_hash(key: bytes, purpose: str, value: str) -> None:
    out = pseudonym(key, purpose, value)
    for unkeyed in (value.encode(), purpose.encode() + b"\x00" + value.encode()):
        digest = hashlib.sha256(unkeyed).hexdigest()
        assert out not in (digest, digest[:32])


macs = st.lists(st.integers(0, 255), min_size=6, max_size=6)


@FAST
@given(key=keys, octets=macs)
def test_mac_pseudonym_ignores_notation(key: bytes, octets: list[int]) -> None:
    colon_upper = ":".join(f"{o:02X}" for o in octets)
    dash_lower = "-".join(f"{o:02x}" for o in octets)
    out = pseudonymize_field(key, "bluetooth_mac", dash_lower)
    assert out == pseudonymize_field(key, "bluetooth_mac", f" {colon_upper} ")
    assert out == pseudonym(key, "bluetooth_mac", normalize_mac(dash_lower))
    assert HEX32.match(out)


@FAST
@given(key=keys, value=values)
def test_field_pseudonyms_are_separated_by_purpose(key: bytes, value: str) -> None:
    session = pseudonymize_field(key, "session_id", value)
    assert session == pseudonym(key, "voice_session", value)
    assert session != pseudonymize_field(key, "key_id", value)
    assert session != pseudonym(key, "vin/music", value)


# -------------------------------------------------------------------- IPs


@FAST
@given(addr=st.ip_addresses(v=4))
def test_ipv4_truncated_to_slash_24(addr: ipaddress.IPv4Address) -> None:
    out = truncate_ip(str(addr))
    net = ipaddress.ip_network(f"{addr}/24", strict=False)
    assert out == str(net.network_address)
    assert ipaddress.ip_address(out) in net
    assert out.endswith(".0")
    assert truncate_ip(out) == out


@FAST
@given(addr=st.ip_addresses(v=6))
def test_ipv6_truncated_to_slash_48(addr: ipaddress.IPv6Address) -> None:
    out = truncate_ip(str(addr))
    parsed = ipaddress.ip_address(out)
    embedded = addr.ipv4_mapped
    if addr in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64: an IPv4 in the last 32 bits
        embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if embedded is not None:
        assert out == str(ipaddress.ip_network(f"{embedded}/24", strict=False)
                          .network_address)
        return
    # 6to4 holds a whole IPv4 in its /48: cut to /40 (the IPv4's /24).
    prefix = 40 if addr.sixtofour is not None else 48
    assert parsed == ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address
    assert int(parsed) & ((1 << 80) - 1) == 0
    assert truncate_ip(out) == out


@FAST
@given(addr=st.ip_addresses(v=4), host=st.integers(0, 255))
def test_same_network_gives_same_output(addr: ipaddress.IPv4Address, host: int) -> None:
    sibling = ipaddress.IPv4Address((int(addr) & ~0xFF) | host)
    assert truncate_ip(str(addr)) == truncate_ip(str(sibling))


@FAST
@given(addr=st.ip_addresses(v=4))
def test_ipv4_mapped_ipv6_truncated_as_ipv4(addr: ipaddress.IPv4Address) -> None:
    assert truncate_ip(f"::ffff:{addr}") == truncate_ip(str(addr))


@pytest.mark.parametrize(
    "garbage", ["", "garbage", "1.2.3", "256.1.1.1", "1.2.3.4/24", "::g", "01.02.03.04"]
)
def test_unparseable_ip_fails_closed(garbage: str) -> None:
    assert truncate_ip(garbage) == ""


@FAST
@given(text=st.text(max_size=40))
def test_truncate_ip_never_raises_and_never_echoes_host(text: str) -> None:
    out = truncate_ip(text)
    if out:
        addr = ipaddress.ip_address(out)
        assert int(addr) & (0xFF if addr.version == 4 else (1 << 80) - 1) == 0


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(
        st.binary(min_size=0, max_size=130),
        st.sampled_from([b"", bytes(32), bytes(range(64)), bytes(range(65)), b"k" * 200]),
    ),
    data=st.binary(max_size=300),
)
def test_hmac_from_cached_pads_is_the_standard_hmac(key: bytes, data: bytes) -> None:
    # Keys shorter than, equal to and longer than SHA-256's 64-byte block
    # (a longer one is hashed first); every pseudonym depends on this.
    assert hmac_sha256(key, data) == hmac.digest(key, data, "sha256")
    # The cached pads are copied, never consumed: a second call agrees.
    assert hmac_sha256(key, data) == hmac.digest(key, data, "sha256")


def test_pseudonyms_are_those_of_earlier_releases() -> None:
    # Backends keep their users across an upgrade only if the values do not move.
    key = bytes(range(32))
    expected = hmac.new(key, b"vin/tbox/status\x00WVWZZZ1JZXW000001", hashlib.sha256)
    assert pseudonym(key, "vin/tbox/status", "WVWZZZ1JZXW000001") == expected.hexdigest()[:32]
