"""The simulator on its own: VINs, routes, reproducibility, settings, daily life."""

from __future__ import annotations

import calendar
import itertools
import math
import random
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sim.geo import distance_m
from sim.groundtruth import GROUND_TRUTH_FILE, read_json_lines
from sim.model import PublishEvent, SettingsEvent
from sim.scenario import build_scenario, event_fingerprint
from sim.testing import run_in_memory
from sim.vin import VIN_ALPHABET, check_digit, is_valid_vin, make_fleet_vins, make_vin
from sim.world import ACCELERATION_MS2, DRIVE_STEP_S


def test_known_vins() -> None:
    assert is_valid_vin("1M8GDM9AXKP042788")  # the textbook example, check digit X
    assert is_valid_vin("11111111111111111")
    assert not is_valid_vin("1M8GDM9A1KP042788")
    assert not is_valid_vin("1M8GDM9AXKP04278")  # 16 characters
    assert not is_valid_vin("IM8GDM9AXKP042788")  # I is not allowed


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=0, max_value=999_999))
def test_generated_vins_are_valid(seed: int, serial: int) -> None:
    vin = make_vin(random.Random(seed), serial)
    assert len(vin) == 17
    assert set(vin) <= set(VIN_ALPHABET)
    assert not set(vin) & set("IOQ")
    assert vin[8] == check_digit(vin)


def test_fleet_vins_are_distinct_and_valid() -> None:
    vins = make_fleet_vins(random.Random(7), 5000)
    assert len(set(vins)) == 5000
    assert all(is_valid_vin(vin) for vin in vins)


def test_routes_are_continuous() -> None:
    scenario = build_scenario(seed=3, vehicle_count=8, duration_s=14 * 3600)
    checked = 0
    for vehicle in scenario.vehicles:
        samples = vehicle.trajectory.samples
        for before, after in itertools.pairwise(samples):
            dt_s = (after.t_ms - before.t_ms) / 1000
            moved = distance_m(before.point, after.point)
            # Within speed * dt: the faster of the two samples, plus one step of acceleration.
            top_speed_ms = (
                max(before.speed_kmh, after.speed_kmh) / 3.6 + ACCELERATION_MS2 * DRIVE_STEP_S
            )
            assert moved <= top_speed_ms * dt_s + 1.0, (vehicle.vin, before, after)
            assert after.speed_kmh < 200
            checked += 1
    assert checked > 1000


def test_published_positions_follow_the_route() -> None:
    """Consecutive positions a car captures are never further apart than it could
    drive (in capture order: records buffered in a tunnel are uploaded later)."""
    scenario = build_scenario(seed=4, vehicle_count=5, duration_s=10 * 3600)
    for vehicle in scenario.vehicles:
        captured: list[tuple[int, Any]] = []
        for event in vehicle.events:
            if not isinstance(event, PublishEvent) or event.stream != "tbox/status":
                continue
            if event.purpose != "telemetry":
                continue  # injected malformed/spoofed messages are not the car's own
            assert event.message is not None
            if math.isnan(event.message.position.latitude):  # type: ignore[attr-defined]
                continue  # GPS without a fix (NO_FIX_SHARE of the reports)
            at = event.captured_ms if event.captured_ms is not None else event.t_ms
            captured.append((at, event.message.position))  # type: ignore[attr-defined]
        captured.sort(key=lambda item: item[0])
        for (t0, p0), (t1, p1) in itertools.pairwise(captured):
            assert distance_m(_point(p0), _point(p1)) <= 130 / 3.6 * (t1 - t0) / 1000 + 1.0


def test_some_records_are_uploaded_late_with_their_capture_time() -> None:
    """Store and forward (tunnels, underground car parks): buffered records go
    out after coverage returns, in capture order, never before they were captured."""
    scenario = build_scenario(seed=4, vehicle_count=8, duration_s=24 * 3600)
    late = [
        e
        for v in scenario.vehicles
        for e in v.events
        if isinstance(e, PublishEvent) and e.captured_ms is not None
    ]
    assert late
    assert all(e.t_ms > e.captured_ms for e in late)  # type: ignore[operator]
    assert all(e.stream != "tbox/ecall" and e.purpose == "telemetry" for e in late)
    assert {e.unit for e in late} == {"tbox", "avn"}


def _point(geo: Any) -> Any:
    from sim.geo import Point

    return Point(geo.latitude, geo.longitude)


def test_same_seed_same_scenario_other_seed_other_scenario() -> None:
    first = build_scenario(seed=11, vehicle_count=6, duration_s=6 * 3600)
    again = build_scenario(seed=11, vehicle_count=6, duration_s=6 * 3600)
    other = build_scenario(seed=12, vehicle_count=6, duration_s=6 * 3600)

    def prints(s: Any) -> list[str]:
        return [f"{v.vin} {event_fingerprint(e)}" for v in s.vehicles for e in v.events]

    assert prints(first) == prints(again)
    assert prints(first) != prints(other)


def test_settings_revisions_strictly_increase() -> None:
    scenario = build_scenario(seed=5, vehicle_count=12, duration_s=24 * 3600)
    changes = 0
    for vehicle in scenario.vehicles:
        revisions = [e.settings.revision for e in vehicle.events if isinstance(e, SettingsEvent)]
        assert all(a < b for a, b in itertools.pairwise(revisions))
        changes += len(revisions)
    assert changes > 50


def test_fleet_lives_days() -> None:
    """Cars sleep at home, commute, and use every stream of the default policy."""
    scenario = build_scenario(seed=6, vehicle_count=10, duration_s=30 * 3600)
    three_am = calendar.timegm((2026, 3, 3, 3, 0, 0)) * 1000
    for vehicle in scenario.vehicles:
        where = vehicle.trajectory.at(three_am)
        assert distance_m(where.point, vehicle.profile.home.point) < 1.0
        assert where.speed_kmh == 0
        assert distance_m(vehicle.profile.home.point, vehicle.profile.work.point) > 100
    streams = {e.stream for v in scenario.vehicles for e in v.events if isinstance(e, PublishEvent)}
    assert {
        "tbox/status",
        "tbox/alarm",
        "tbox/location",
        "tbox/battery",
        "tbox/trip",
        "tbox/digital_key",
        "tbox/connectivity",
        "tbox/ecall",
        "avn/nav",
        "avn/search",
        "avn/voice",
        "avn/app/music",
        "avn/app/weather",
    } <= streams
    settings_start = {v.profile.settings_start for v in scenario.vehicles}
    assert "never" in settings_start


def _deterministic_view(path: Path) -> list[tuple[Any, ...]]:
    view: list[tuple[Any, ...]] = []
    for r in read_json_lines(path / GROUND_TRUTH_FILE):
        if r["type"] == "publish":
            view.append(
                (
                    r["vin"],
                    r["topic"],
                    r["payload"],
                    r["seq"],
                    r["ts_ms"],
                    r["purpose"],
                    r["applied_rev"],
                )
            )
        elif r["type"] == "settings":
            view.append((r["vin"], "settings", r["ts_ms"], str(r["settings"]), r["applied"]))
        elif r["type"] == "command":
            view.append((r["vin"], r["request_id"], r["command"], str(r["result"])))
        elif r["type"] in ("trace", "vehicle"):
            view.append(tuple(sorted((k, str(v)) for k, v in r.items())))
    return sorted(view, key=repr)


def test_same_seed_same_ground_truth(tmp_path: Path) -> None:
    run_in_memory(tmp_path / "a", vehicles=6, duration_s=3 * 3600, seed=21)
    run_in_memory(tmp_path / "b", vehicles=6, duration_s=3 * 3600, seed=21)
    first, second = _deterministic_view(tmp_path / "a"), _deterministic_view(tmp_path / "b")
    assert len(first) > 300
    assert first == second
