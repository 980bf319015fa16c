"""The privacy attack benchmark, short variant (100 cars, 2 days, a few seconds).

The attacks must be real: each one beats the deliberately weakened design it
is paired with (so the benchmark can fail). The real gateway's figures are
asserted where a fleet this small is stable (home and work and averaging are
medians over about 80 cars: they move by +-0.05 cell with the seed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.privacy.attacks import Ring, distance_interval_m, ring_place
from bench.privacy.report import write_html
from bench.privacy.run import SHORT, STEPS_KM, knee_step, run


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return run(SHORT, log=lambda _text: None)


def attack(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in results["attacks"] if a["id"] == name)


def test_structure(results: dict[str, Any]) -> None:
    json.dumps(results)  # JSON-able as is
    assert {"options", "policy", "fleet", "variants", "attacks", "seconds"} <= results.keys()
    assert results["options"] == {"cars": 100, "days": 2, "seed": 1}
    assert results["fleet"]["cars"] == 100
    assert results["fleet"]["approximate_cars_scored"] > 50
    ids = [a["id"] for a in results["attacks"]]
    assert ids == [
        "home_work",
        "averaging",
        "trip_ends",
        "find_my_car",
        "late_data",
        "app_linkage",
        "utility",
    ]
    for entry in results["attacks"]:
        assert {"title", "attacker", "metric", "unit", "op", "target"} <= entry.keys()
        assert entry["op"] in (">=", "<=")
        for side in ("weakened", "real"):
            row = entry[side]
            assert {"variant", "value", "pass"} <= row.keys()
            assert isinstance(row["pass"], bool)
        assert entry["real"]["variant"] == "real"
        assert entry["weakened"]["variant"] in results["variants"]
    trip = attack(results, "trip_ends")
    assert set(trip["curve"]) == {"v1", "real", "real-shift-known"}
    for points in trip["curve"].values():
        assert [p["step_km"] for p in points] == list(STEPS_KM)
    # Rounding to a coarser step costs more trip-distance accuracy.
    errors = [p["utility_trip_distance_error_km"] for p in trip["curve"]["v1"]]
    assert errors == sorted(errors) and errors[0] == 0


def test_every_attack_beats_its_weakened_design(results: dict[str, Any]) -> None:
    for entry in results["attacks"]:
        if entry["id"] != "utility":
            assert not entry["weakened"]["pass"], entry["id"]
    # Averaging fresh noise converges on the car (tens of metres, not a cell).
    assert attack(results, "averaging")["weakened"]["value"] < 0.1
    # The crossing reconstruction is a real attack: better than reading the
    # final value of a v1 gateway.
    v1 = attack(results, "trip_ends")["weakened"]["estimators_m"]
    assert v1["crossing"] < 0.9 * v1["final"]
    # Polling without limits yields a fix every window and more.
    assert attack(results, "find_my_car")["weakened"]["value"] >= 60
    leaked = attack(results, "late_data")["weakened"]["leaked"]
    assert leaked["late:privacy_mode"] > 0
    assert leaked["late:location_off"] > 0


def test_defences_hold(results: dict[str, Any]) -> None:
    # The secret per-car shift and anchors on the gateway clock defeat the
    # crossing reconstruction.
    assert attack(results, "trip_ends")["real"]["pass"]
    # Rule 17: no more fixes an hour than the cap.
    assert attack(results, "find_my_car")["real"]["pass"]
    # Rules 11-12: nothing captured while not allowed reaches the backend from
    # a car that states its revision; what still passes comes from cars with
    # timestamps only whose clocks were off or reported nothing.
    late = attack(results, "late_data")["real"]
    assert all(
        key.startswith("timestamp only") and "honest" not in key for key in late["leaked_by_car"]
    )
    assert late["value"] < 0.1 * attack(results, "late_data")["weakened"]["value"]
    # Utility: messages are lost only to the clock-skew margin of cars with
    # timestamps only (captured just after a stricter period).
    utility = attack(results, "utility")["real"]
    assert utility["value"] > 99.9
    assert all(key.startswith("timestamp only") for key in utility["lost_by_car_and_reason"])
    step = results["policy"]["side_field_step_km"]
    assert step and 0 < utility["trip_distance_error_km"] <= step


def test_the_ring_attack_beats_exact_trip_distance(results: dict[str, Any]) -> None:
    """A known start plus the trip distance along the street grid locates the
    end: against exact distance the best attack beats the target on this
    gateway too; rounding the distance to the policy's step pushes it back
    over the target, and the error grows with the step."""
    trip = attack(results, "trip_ends")
    target = trip["target"]
    real = {p["step_km"]: p for p in trip["curve"]["real"]}
    exact = real[0.0]
    assert min(exact["estimators_m"], key=exact["estimators_m"].get).startswith("ring")
    assert exact["privacy_cells"] < target
    default = results["policy"]["side_field_step_km"]
    assert real[default]["privacy_cells"] >= target
    assert real[max(STEPS_KM)]["privacy_cells"] > exact["privacy_cells"] + 0.1
    # The knee is the smallest step reaching the target, and the policy sits there.
    assert trip["knee_step_km"] == default
    # Against v1 (exact distance, the cell centre) the two-ring fit wins.
    v1 = trip["weakened"]["estimators_m"]
    assert v1["ring2"] < min(v1["final"], v1["crossing"])


def test_ring_place_finds_the_corner_two_rings_share() -> None:
    # Start at the origin, end at (1500, 700): 2200 m on the grid; the next
    # trip ends at (-500, 2000): 3300 m from the end. Band: a 2000 m cell
    # around a published value 600 m off the end.
    end = (1500.0, 700.0)
    value = (1900.0, 1100.0)
    first = Ring((0.0, 0.0), *distance_interval_m(2.2, 0.0, None, 0.0))
    second = Ring((-500.0, 2000.0), *distance_interval_m(3.3, 0.0, None, 0.0))
    guess = ring_place(value, 1000.0, [first, second])
    assert guess is not None
    assert abs(guess[0] - end[0]) < 150 and abs(guess[1] - end[1]) < 150
    # Rounded to 5 km (and 1 kWh of energy at 0.17 kWh/km) the region spans the band.
    lo, hi = distance_interval_m(0.0, 5.0, 0.0, 1.0)
    assert (lo, hi) == (-50.0, 2550.0)
    coarse = ring_place(value, 1000.0, [Ring((0.0, 0.0), lo, hi)])
    assert coarse is not None
    assert abs(coarse[0] - end[0]) + abs(coarse[1] - end[1]) > 2 * (
        abs(guess[0] - end[0]) + abs(guess[1] - end[1])
    )
    # No point of the band on the ring: no estimate.
    assert ring_place((9000.0, 9000.0), 1000.0, [first]) is None


def test_knee_is_the_smallest_step_clearing_the_target_with_margin() -> None:
    curve = [
        {"step_km": 5.0, "privacy_cells": 0.41},
        {"step_km": 0.0, "privacy_cells": 0.2},
        {"step_km": 2.0, "privacy_cells": 0.36},
        {"step_km": 3.0, "privacy_cells": 0.42},
        {"step_km": 4.0, "privacy_cells": 0.37},
        {"step_km": 7.5, "privacy_cells": 0.39},
        {"step_km": 1.0, "privacy_cells": float("nan")},
    ]
    assert knee_step(curve, 0.35, margin_cells=0.0) == 2.0
    # With the margin: 2 km is too close to the target; 3 km clears it.
    assert knee_step(curve, 0.35) == 3.0
    # A coarser step falling below the target again disqualifies a finer one.
    assert knee_step(curve, 0.40, margin_cells=0.0) is None
    curve[4]["privacy_cells"] = 0.33
    assert knee_step(curve, 0.35) == 5.0


def test_app_pseudonyms_link_to_vins_by_seq_in_v1_and_by_nothing_here(
    results: dict[str, Any],
) -> None:
    linkage = attack(results, "app_linkage")
    v1, real = linkage["weakened"]["by_values"], linkage["real"]["by_values"]
    assert v1["pseudonyms"] > 20 and v1["correct"] > v1["pseudonyms"] / 2  # the car's counter
    assert real["pseudonyms"] == v1["pseudonyms"] and real["claimed"] == 0
    # Timing is the documented limit: a backend reading every topic still links.
    timing = linkage["real"]["by_timing"]
    assert timing["pseudonyms"] == real["pseudonyms"] and 0 <= timing["rate"] <= 1


def test_linkage_by_values_weighs_rare_values_and_counter_gaps() -> None:
    from bench.privacy.linkage import CarLinkage, link_by_values

    cars = [CarLinkage(f"VIN{i}") for i in range(4)]
    for i, car in enumerate(cars):
        car.avn_seqs = [1, 2, 4, 6, 7] if i == 0 else [1, 2, 3, 4, 5, 6, 7]
        car.vin_values = {("seq", 1), ("settings_revision", 2)}
        car.refs = {f"ref{i}"}
        car.app_values = {f"ref{i}": {("settings_revision", 2)}}  # every car has it: no weight
    cars[0].app_seqs = {"ref0": [3, 5]}  # fills VIN0's gaps only
    figures = link_by_values(cars)
    assert (figures["pseudonyms"], figures["claimed"], figures["correct"]) == (4, 1, 1)
    cars[2].vin_values.add(("route_id", "r7"))
    cars[3].app_values["ref3"].add(("route_id", "r7"))  # a rare value shared with the wrong car
    figures = link_by_values(cars)
    assert (figures["claimed"], figures["correct"]) == (2, 1)


def test_html_page(results: dict[str, Any], tmp_path: Path) -> None:
    page = write_html(results | {"command": "test"}, tmp_path / "privacy.html").read_text()
    assert page.startswith("<!doctype html>")
    for title in ("Where the driver lives and works", "Where trips end", "What the service"):
        assert title in page
    assert page.count("FAIL") >= 5  # every weakened design, at least


def test_only_the_adapter_calls_the_core() -> None:
    """All decisions go through bench/privacy/driver.py, so adapting the
    benchmark to a new core signature stays a few lines in one place."""
    package = Path(__file__).resolve().parents[1] / "bench" / "privacy"
    for module in package.glob("*.py"):
        text = module.read_text()
        calls = "decide(" in text or "decide_command(" in text or "import decide" in text
        assert module.name == "driver.py" or not calls, module.name


@pytest.mark.integration
def test_through_mosquitto_matches_the_core() -> None:
    """The real gateway over Mosquitto gives the backend the same figures as
    the in-process core (the adapter keeps state as the service does)."""
    from bench.privacy.wire import WireOptions, run_wire

    results = run_wire(
        WireOptions(cars=3, days=1, speedup=4000.0, find_my_car_cars=1), lambda _text: None
    )
    figures = {
        entry["id"]: (entry["in_process"]["value"], entry["through_mosquitto"]["value"])
        for entry in results["attacks"]
    }
    # Parked values do not depend on timing: the same both ways.
    assert figures["averaging"][0] == pytest.approx(figures["averaging"][1])
    assert figures["late_data"][1] <= figures["late_data"][0]
    # At 4,000 simulated seconds per second the path's latency (minutes of
    # simulated time) moves anchor refreshes, window edges and the skew
    # margin: close, not equal. The defences hold through the real gateway.
    assert figures["find_my_car"][1] <= results["policy"]["find_my_car_cap_per_hour"]
    assert abs(figures["utility"][0] - figures["utility"][1]) < 0.5
    for name in ("home_work", "trip_ends"):
        assert 0 < figures[name][1] < 2, name


def test_the_conformance_report_carries_the_latest_run(
    results: dict[str, Any], tmp_path: Path
) -> None:
    """The DPO's report (python -m sim demo / check) embeds the newest run."""
    from sim.report import _privacy_benchmark

    assert "Not run on this machine yet" in _privacy_benchmark(tmp_path)
    (tmp_path / "privacy-20260101-000000.json").write_text(json.dumps(results))
    section = _privacy_benchmark(tmp_path)
    assert "<h2>Privacy attack benchmark</h2>" in section
    assert "Where the driver lives and works" in section and "privacy-20260101" in section
