"""`python -m sim chaos --short`: the real gateway, two real brokers, a seeded fleet and
every kind of fault at least once; zero leaks, and every missing message accounted for
by a dead letter. Plus the pieces the run is made of, without brokers."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sim.chaos import percentile
from sim.chaos_plan import (
    ACL_DENY,
    BACKEND_OUTAGE,
    FAKE_VIN_FLOOD,
    KILL,
    SHORT,
    VEHICLE_RESTART,
    augment,
    make_plan,
    settings_at,
)
from sim.deadletters import DeadLetterRecord, LostMessage, account_losses
from sim.model import SettingsEvent
from sim.policy import load_policy
from sim.scenario import build_scenario, event_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)


@pytest.mark.integration
@needs_mosquitto
def test_short_chaos_run_has_no_leaks_and_no_unaccounted_losses(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "sim", "chaos", "--short", "--no-live", "--no-report"),
            *("--seed", "3", "--out", str(out)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert (out / "chaos.json").exists(), done.stderr[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    problems = json.dumps(report["issues_by_rule"])[:3000] + done.stderr[-3000:]
    assert report["leaks"] == 0, problems
    assert report["losses_unaccounted"] == 0, problems
    assert done.returncode in (0, 3), problems  # 1 = leak or unaccounted loss
    # Every kind of fault happened, and was survived.
    counts = report["fault_counts"]
    for kind in (KILL, ACL_DENY, BACKEND_OUTAGE, VEHICLE_RESTART, FAKE_VIN_FLOOD):
        assert counts.get(kind, 0) >= 1, counts
    assert report["kill_recoveries"]["count"] >= 1
    assert all(code == -9 for code in report["kill_recoveries"]["exit_codes"])
    assert report["gateway_exit_code"] == 0
    assert len(report["floods"]["settings"]) >= 1
    # Refusals became dead letters of both kinds, and they stand for the missing messages.
    letters = report["dead_letters"]
    assert letters["by_reason"].get("not_authorized", 0) >= 1, letters
    assert letters["by_reason"].get("packet_too_large", 0) >= 1, letters
    assert letters["api"] == letters["store"]
    assert report["losses_dead_lettered"] >= 2
    assert letters["accounting"]["unaccounted_losses"] == 0
    # eCall latency is reported, overall and for eCalls sent while the backend was up.
    latency = report["ecall_latency_ms"]
    assert latency["all"]["n"] >= 10 and latency["all"]["p99_ms"] is not None
    assert latency["backend_up"]["n"] >= 5 and latency["backend_up"]["p99_ms"] is not None
    assert report["must_pass"] > 300
    assert (out / "check.json").exists() and (out / "dead_letters.json").exists()


def test_plan_is_a_function_of_the_seed_with_every_fault() -> None:
    policy = load_policy()

    def planned(seed: int) -> tuple[str, list[str]]:
        scenario = build_scenario(seed, SHORT.vehicles, SHORT.duration_s)
        plan = make_plan(seed, SHORT, scenario, policy)
        augment(plan, scenario, policy)
        events = [event_fingerprint(e) for v in scenario.vehicles for e in v.events]
        return json.dumps(plan.to_json(), sort_keys=True), events

    first, again, other = planned(5), planned(5), planned(6)
    assert first == again
    assert first[0] != other[0]
    plan = json.loads(first[0])
    kinds = {fault["kind"] for fault in plan["faults"]}
    assert kinds == {KILL, ACL_DENY, BACKEND_OUTAGE, VEHICLE_RESTART, FAKE_VIN_FLOOD}
    infra = sorted(
        (f["at_s"], f.get("duration_s", 0.0))
        for f in plan["faults"]
        if f["kind"] != FAKE_VIN_FLOOD
    )
    for (at, duration), (next_at, _) in itertools.pairwise(infra):
        assert at + duration <= next_at  # one infrastructure fault at a time
    assert plan["oversized_app_messages"] and plan["settings_floods"]


def test_settings_flood_ends_where_it_started_and_later_revisions_move_up() -> None:
    policy = load_policy()
    scenario = build_scenario(5, SHORT.vehicles, SHORT.duration_s)
    before = {
        v.vin: [e for e in v.events if isinstance(e, SettingsEvent)] for v in scenario.vehicles
    }
    plan = make_plan(5, SHORT, scenario, policy)
    augment(plan, scenario, policy)
    for flood in plan.settings_floods:
        vehicle = next(v for v in scenario.vehicles if v.vin == flood["vin"])
        settings_events = [e for e in vehicle.events if isinstance(e, SettingsEvent)]
        flooded = next(e for e in settings_events if e.flood)
        assert len(flooded.flood) + 1 == flood["revisions"]
        revisions = [s.revision for e in settings_events for s in (*e.flood, e.settings)]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        earlier = settings_at(vehicle, flooded.t_ms - 1)
        assert earlier is not None
        assert flooded.settings.features == earlier.features
        assert flooded.settings.location == earlier.location
        # Same number of ordinary settings changes as before, contents unchanged.
        originals = before[vehicle.vin]
        assert len(settings_events) == len(originals) + 1
        for old, new in zip(originals, [e for e in settings_events if not e.flood], strict=True):
            assert (old.settings.features, old.settings.location) == (
                new.settings.features,
                new.settings.location,
            )


def _letter(n: int, at: float, subject: str, stream: str = "tbox/status") -> DeadLetterRecord:
    return DeadLetterRecord(
        n, at, subject, "vehicle", "backend", stream, "not_authorized", 0x87, 90
    )


def test_accounting_matches_by_car_stream_and_time() -> None:
    subjects = {"VIN_A": "s1" + "0" * 30, "VIN_B": "s2" + "0" * 30}
    losses = [
        LostMessage(0, "VIN_A", "tbox/status", 10.0),
        LostMessage(1, "VIN_A", "tbox/status", 20.0),
        LostMessage(2, "VIN_B", "tbox/status", 10.0),
        LostMessage(3, "VIN_A", "avn/app/{app_id}", 10.0),
    ]
    letters = [
        _letter(1, 10.5, subjects["VIN_A"][:16]),
        _letter(2, 15.0, subjects["VIN_A"][:16]),  # filed before message 1 was sent
        _letter(3, 12.0, subjects["VIN_B"][:16], "tbox/battery"),  # another stream
        _letter(4, 11.0, "unknown-subject", "avn/app/{app_id}"),  # matched by stream only
    ]
    result = account_losses(losses, letters, subjects.__getitem__)
    matched = sorted((loss.ref, letter.id) for loss, letter in result.matched)
    assert matched == [(0, 1), (3, 4)]
    assert [loss.ref for loss in result.unaccounted] == [1, 2]
    assert sorted(letter.id for letter in result.unmatched_letters) == [2, 3]
    # Without the key, subjects mean nothing: stream and time only.
    blind = account_losses(losses, letters[:2], None)
    assert sorted((loss.ref, letter.id) for loss, letter in blind.matched) == [(0, 1), (2, 2)]


def test_percentile_is_a_measured_value() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
