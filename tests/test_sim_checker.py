"""The checker must catch every kind of leak and loss (a checker that can't fail is useless).

A clean run comes from the in-memory pipeline (fleet + reference contract model +
recorder); each test then damages the recording or forges a forward, and asserts
the checker reports exactly that kind of problem.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.checker import (
    CAPTURE_SKEW_S,
    FIRST_SETTINGS_TOLERANCE_WALL_S,
    LAG_NEIGHBOURHOOD_WALL_S,
    LEAK,
    LOSS,
    MOMENT_WALL_S,
    OVER_COARSENING,
    STALL_LEAD_WALL_S,
    USER_PROPERTIES,
    WRONG_TRANSFORM,
    Checker,
    CheckResult,
    Published,
    message_class,
    pseudonym,
    truncate_ip,
)
from sim.contract import PASS
from sim.groundtruth import GROUND_TRUTH_FILE, RECORDING_FILE, b64, read_json_lines, unb64
from sim.model import Settings
from sim.policy import Policy, load_policy
from sim.testing import run_in_memory
from telematics.v1 import command_pb2, common_pb2

Record = dict[str, Any]


@dataclass
class Run:
    truth: list[Record]
    recording: list[Record]
    policy: Policy
    key: bytes


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("clean-run")
    _, key = run_in_memory(out, vehicles=14, duration_s=9 * 3600, seed=2, speedup=2500)
    return Run(
        list(read_json_lines(out / GROUND_TRUTH_FILE)),
        list(read_json_lines(out / RECORDING_FILE)),
        load_policy(),
        key,
    )


def check(
    run: Run, recording: list[Record] | None = None, *, key: bytes | str | None = "run"
) -> CheckResult:
    used_key = run.key if key == "run" else key
    assert used_key is None or isinstance(used_key, bytes)
    return Checker(
        run.truth, recording if recording is not None else run.recording, run.policy, used_key
    ).run()


def rules(result: CheckResult) -> set[tuple[str, str]]:
    return {(issue.category, issue.rule) for issue in result.issues}


def classify(run: Run) -> list[tuple[Published, str, list[Settings | None]]]:
    checker = Checker(run.truth, run.recording, run.policy, run.key)
    out = []
    for pub in checker.published:
        purpose = str(pub.record["purpose"])
        decision = purpose if purpose in ("malformed", "spoofed") else checker._decision(pub)
        out.append((pub, decision, checker._settings_candidates(pub.record)))
    return out


def recorded_key(record: Record, policy: Policy) -> tuple[Any, ...] | None:
    parts = record["topic"].split("/")
    if len(parts) < 4 or parts[2] == "cmd":
        return None
    stream = "/".join(parts[2:])
    cls = message_class(policy, stream)
    if cls is None:
        return None
    message: Any = cls()
    message.ParseFromString(unb64(record["payload"]))
    if stream.startswith("avn/app/"):
        return ("app", json.loads(message.payload)["nonce"])
    return (parts[1], stream, message.header.seq, message.header.timestamp_ms)


def pub_key(pub: Published) -> tuple[Any, ...]:
    if pub.stream.startswith("avn/app/"):
        return ("app", pub.record["nonce"])
    # The header carries the unit's own (skewed) clock.
    return (pub.vin, pub.stream, pub.record["seq"], pub.record.get("header_ts_ms") or pub.ts_ms)


def find_delivered(
    run: Run, stream: str, accept: Callable[[Published, Settings | None], bool] = lambda p, s: True
) -> tuple[Published, int]:
    """A message that had to pass (under unambiguous settings) and its recording index."""
    index = {recorded_key(r, run.policy): n for n, r in enumerate(run.recording)}
    for pub, decision, candidates in classify(run):
        if (
            pub.stream == stream
            and decision == PASS
            and len(candidates) == 1
            and accept(pub, candidates[0])
        ):
            position = index.get(pub_key(pub))
            if position is not None:
                return pub, position
    raise AssertionError(f"the clean run has no suitable delivered {stream} message")


def find_decided(run: Run, decision: str, stream: str | None = None) -> Published:
    for pub, decided, _ in classify(run):
        if decided == decision and (stream is None or pub.stream == stream):
            return pub
    raise AssertionError(f"the clean run has no message decided {decision}")


def properties_for(run: Run, stream: str) -> list[list[str]]:
    feature = run.policy.feature_for(stream)
    rule = run.policy.rule_for(stream)
    assert rule is not None
    return [
        ["policy-version", run.policy.version],
        ["feature", feature],
        ["legal-basis", run.policy.legal_basis_for(feature)],
        ["retention-days", str(rule.retention_days)],
        ["transforms", ""],
    ]


def forged_forward(run: Run, pub: Published) -> Record:
    """What a broken gateway would have published for `pub`: the car's bytes, passed on."""
    ref = pub.vin
    if pub.stream.startswith("avn/app/"):
        scope = pub.stream.split("/")[-1] + run.policy.app_scope_suffix(pub.stream)
        ref = pseudonym(run.key, f"vin/{scope}", pub.vin)
    rule = run.policy.rule_for(pub.stream)
    assert rule is not None
    first = run.policy.recipients[next(iter(rule.routes))]  # its first recipient
    return {
        "wall": float(pub.record["wall_end"]) + 0.01,
        "topic": f"{first.prefix or 'tsp'}/{ref}/{pub.stream}",
        "payload": pub.record["payload"],
        "props": properties_for(run, pub.stream),
        "qos": 1,
        "retain": False,
    }


def edit_recorded(
    run: Run, position: int, stream: str, change: Callable[[Any], None]
) -> list[Record]:
    recording = copy.deepcopy(run.recording)
    cls = message_class(run.policy, stream)
    assert cls is not None
    message: Any = cls()
    message.ParseFromString(unb64(recording[position]["payload"]))
    change(message)
    recording[position]["payload"] = b64(message.SerializeToString())
    return recording


def original(pub: Published) -> Any:
    """The car's decoded message (protobuf fields are dynamic: typed as Any here)."""
    assert pub.message is not None
    return pub.message


def mode_is(mode: int) -> Callable[[Published, Settings | None], bool]:
    return lambda pub, settings: settings is not None and settings.location == mode


# --- clean --------------------------------------------------------------------------
def test_clean_run_passes(clean_run: Run) -> None:
    result = check(clean_run)
    assert result.issues == []
    assert result.exit_code() == 0
    assert result.utility_delivered == 1.0
    must_pass = sum(t.must_pass for t in result.tallies.values())
    dropped = sum(sum(t.dropped.values()) for t in result.tallies.values())
    assert must_pass > 300 and dropped > 100
    assert len(result.approx_errors_m) > 20
    assert result.median_approx_error_m is not None and 100 < result.median_approx_error_m < 2000


def test_clean_run_without_key_passes(clean_run: Run) -> None:
    assert check(clean_run, key=None).issues == []


def test_duplicates_are_not_losses(clean_run: Run) -> None:
    doubled = clean_run.recording + copy.deepcopy(clean_run.recording)
    result = check(clean_run, doubled)
    assert result.issues == []
    assert sum(t.duplicates for t in result.tallies.values()) > 100


# --- losses -------------------------------------------------------------------------
def test_missing_message_is_a_loss(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/status")
    recording = [r for n, r in enumerate(clean_run.recording) if n != position]
    result = check(clean_run, recording)
    assert rules(result) == {(LOSS, "allowed_message_not_delivered")}
    assert result.losses == 1 and result.exit_code() == 1
    assert result.utility_delivered < 1.0


def test_missing_ecall_is_a_loss(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/ecall")
    result = check(clean_run, [r for n, r in enumerate(clean_run.recording) if n != position])
    assert (LOSS, "allowed_message_not_delivered") in rules(result)


def test_missing_command_result_is_a_loss(clean_run: Run) -> None:
    recording = [r for r in clean_run.recording if not r["topic"].endswith("/result")]
    assert len(recording) < len(clean_run.recording)
    assert (LOSS, "command_result_missing") in rules(check(clean_run, recording))


# --- leaks: things that must never arrive --------------------------------------------
@pytest.mark.parametrize(
    ("decision", "stream", "rule"),
    [
        ("feature_off", None, "forwarded_with_feature_off"),
        ("unknown_vehicle", None, "forwarded_for_unknown_vehicle"),
        ("privacy_mode", None, "forwarded_in_privacy_mode"),
        ("location_off", None, "location_stream_under_location_off"),
        ("outside_window", "tbox/location", "location_outside_find_my_car_window"),
        ("malformed", None, "malformed_payload_forwarded"),
        ("spoofed", None, "spoofed_vin_forwarded"),
        ("feature_off", "avn/app/music", "forwarded_with_feature_off"),
    ],
)
def test_forbidden_forward_is_a_leak(
    clean_run: Run, decision: str, stream: str | None, rule: str
) -> None:
    pub = find_decided(clean_run, decision, stream)
    result = check(clean_run, [*clean_run.recording, forged_forward(clean_run, pub)])
    assert (LEAK, rule) in rules(result)
    assert result.exit_code() == 1


def test_unmatched_forward_is_a_leak(clean_run: Run) -> None:
    _pub, position = find_delivered(clean_run, "tbox/status")
    forged = edit_recorded(
        clean_run, position, "tbox/status", lambda m: setattr(m.header, "seq", 4242424)
    )
    result = check(clean_run, [*clean_run.recording, forged[position]])
    assert (LEAK, "unmatched_forward") in rules(result)


def test_command_accepted_when_forbidden_is_a_leak(clean_run: Run) -> None:
    recording = copy.deepcopy(clean_run.recording)
    flipped = 0
    for record in recording:
        if record["topic"].endswith("/result"):
            result = command_pb2.CommandResult()
            result.ParseFromString(unb64(record["payload"]))
            if not result.accepted and result.command != "open_trunk":
                result.accepted, result.reason = True, ""
                record["payload"] = b64(result.SerializeToString())
                flipped += 1
    assert flipped
    assert (LEAK, "command_accepted_when_forbidden") in rules(check(clean_run, recording))


# --- leaks: forwarded, but not transformed enough ------------------------------------
def test_exact_position_under_approximate_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(
        clean_run, "tbox/status", mode_is(common_pb2.LOCATION_APPROXIMATE)
    )
    recording = edit_recorded(
        clean_run, position, "tbox/status", lambda m: m.position.CopyFrom(original(pub).position)
    )
    assert (LEAK, "location_finer_than_mode") in rules(check(clean_run, recording))


def test_speed_and_heading_under_approximate_are_a_leak(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "avn/nav", mode_is(common_pb2.LOCATION_APPROXIMATE))
    recording = edit_recorded(
        clean_run, position, "avn/nav", lambda m: setattr(m.position, "speed_kmh", 47.0)
    )
    assert (LEAK, "approximate_keeps_motion") in rules(check(clean_run, recording))


def test_geopoint_under_location_off_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "tbox/status", mode_is(common_pb2.LOCATION_OFF))
    recording = edit_recorded(
        clean_run, position, "tbox/status", lambda m: m.position.CopyFrom(original(pub).position)
    )
    assert (LEAK, "geopoint_under_location_off") in rules(check(clean_run, recording))


def test_evse_id_unless_precise_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(
        clean_run,
        "tbox/battery",
        lambda p, s: (
            s is not None
            and s.location != common_pb2.LOCATION_PRECISE
            and bool(original(p).evse_id)
        ),
    )
    recording = edit_recorded(
        clean_run, position, "tbox/battery", lambda m: setattr(m, "evse_id", original(pub).evse_id)
    )
    assert (LEAK, "evse_id_present") in rules(check(clean_run, recording))


@pytest.mark.parametrize(
    ("field", "rule"),
    [("imsi", "imsi_present"), ("iccid", "iccid_present"), ("ip_address", "full_ip_address")],
)
def test_identifiers_in_connectivity_are_a_leak(clean_run: Run, field: str, rule: str) -> None:
    pub, position = find_delivered(clean_run, "tbox/connectivity")
    sent = getattr(original(pub), field)
    recording = edit_recorded(
        clean_run, position, "tbox/connectivity", lambda m: setattr(m, field, sent)
    )
    assert (LEAK, rule) in rules(check(clean_run, recording))


def test_ipv6_is_truncated_to_48_bits() -> None:
    assert truncate_ip("2a01:598:a1b2:c3d4:1:2:3:4") == "2a01:598:a1b2::"
    assert truncate_ip("37.80.12.34") == "37.80.12.0"


def test_raw_or_unkeyed_mac_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "tbox/digital_key")
    mac = original(pub).bluetooth_mac
    raw = edit_recorded(
        clean_run, position, "tbox/digital_key", lambda m: setattr(m, "bluetooth_mac", mac)
    )
    assert (LEAK, "raw_bluetooth_mac") in rules(check(clean_run, raw))
    unkeyed = hashlib.sha256(mac.upper().encode()).hexdigest()[:32]
    hashed = edit_recorded(
        clean_run, position, "tbox/digital_key", lambda m: setattr(m, "bluetooth_mac", unkeyed)
    )
    assert (LEAK, "unkeyed_hash_bluetooth_mac") in rules(check(clean_run, hashed))


def test_wrong_or_unstable_pseudonym_is_detected(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "avn/voice")
    recording = edit_recorded(
        clean_run, position, "avn/voice", lambda m: setattr(m, "session_id", "0" * 32)
    )
    assert (WRONG_TRANSFORM, "pseudonym_session_id") in rules(check(clean_run, recording))
    # Without the key the checker can only see that one session got two pseudonyms.
    assert (WRONG_TRANSFORM, "pseudonym_unstable_session_id") in rules(
        check(clean_run, recording, key=None)
    )


def test_vin_in_app_stream_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "avn/app/music")
    in_payload = edit_recorded(
        clean_run,
        position,
        "avn/app/music",
        lambda m: setattr(m, "payload", m.payload + pub.vin.encode()),
    )
    assert (LEAK, "vin_in_pseudonymized_stream") in rules(check(clean_run, in_payload))
    in_topic = copy.deepcopy(clean_run.recording)
    in_topic[position]["topic"] = f"apps/{pub.vin}/avn/app/music"
    found = rules(check(clean_run, in_topic))
    assert (LEAK, "vin_in_pseudonymized_stream") in found
    assert (WRONG_TRANSFORM, "pseudonym_vin") in found


def test_app_header_sharing_the_cars_seq_or_time_is_a_leak(clean_run: Run) -> None:
    """Rule 15: an app message with the car's own seq or millisecond capture time
    links its pseudonym to the car's VIN-keyed streams."""
    pub, position = find_delivered(clean_run, "avn/app/music")
    sent = original(pub).header
    same_seq = edit_recorded(
        clean_run, position, "avn/app/music", lambda m: setattr(m.header, "seq", sent.seq)
    )
    assert (LEAK, "app_seq_shared") in rules(check(clean_run, same_seq))
    precise = edit_recorded(
        clean_run,
        position,
        "avn/app/music",
        lambda m: setattr(m.header, "timestamp_ms", sent.timestamp_ms | 1),
    )
    assert (LEAK, "app_time_precise") in rules(check(clean_run, precise))


# --- over-coarsening, wrong transforms, metadata --------------------------------------
def test_coarsened_under_precise_is_over_coarsening(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/status", mode_is(common_pb2.LOCATION_PRECISE))
    recording = edit_recorded(
        clean_run,
        position,
        "tbox/status",
        lambda m: setattr(m.position, "latitude", round(m.position.latitude, 2)),
    )
    result = check(clean_run, recording)
    assert (OVER_COARSENING, "geopoint_changed_under_precise") in rules(result)
    assert result.exit_code() == 3  # a contract violation, but neither leak nor loss


def test_removed_under_approximate_is_over_coarsening(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "avn/nav", mode_is(common_pb2.LOCATION_APPROXIMATE))
    recording = edit_recorded(clean_run, position, "avn/nav", lambda m: m.ClearField("destination"))
    assert (OVER_COARSENING, "geopoint_removed") in rules(check(clean_run, recording))


def test_approximate_outside_cell_is_a_wrong_transform(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/status", mode_is(common_pb2.LOCATION_APPROXIMATE))
    recording = edit_recorded(
        clean_run,
        position,
        "tbox/status",
        lambda m: setattr(m.position, "latitude", m.position.latitude + 0.05),
    )
    assert (WRONG_TRANSFORM, "approximate_outside_cell") in rules(check(clean_run, recording))


def test_fresh_noise_instead_of_the_global_grid_is_detected(clean_run: Run) -> None:
    """An approximate position inside the right bounds, but half a cell off the
    global grid (what fresh per-message noise, or v1's per-car grid whose cell
    centre bounds the truth, would look like)."""
    step = clean_run.policy.cell_size_m / 111_320
    pub, position = find_delivered(
        clean_run, "tbox/status", mode_is(common_pb2.LOCATION_APPROXIMATE)
    )
    on_grid = next(
        lat
        for _, lat, _, mode, _ in check(clean_run).received_positions[pub.vin]
        if mode == "approximate"
    )
    truth_lat = original(pub).position.latitude
    phase = ((truth_lat - on_grid) / step) % 1.0
    off_grid = truth_lat + (0.5 - phase) * step * 0.98  # stays inside the truth's cell bounds
    recording = edit_recorded(
        clean_run, position, "tbox/status", lambda m: setattr(m.position, "latitude", off_grid)
    )
    assert (WRONG_TRANSFORM, "approximate_not_on_global_grid") in rules(check(clean_run, recording))


def test_modified_ecall_is_a_wrong_transform(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/ecall")
    recording = edit_recorded(
        clean_run, position, "tbox/ecall", lambda m: setattr(m, "passengers", 9)
    )
    assert (WRONG_TRANSFORM, "legal_obligation_payload_modified") in rules(
        check(clean_run, recording)
    )


def test_changed_kept_field_is_a_wrong_transform(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/status")
    recording = edit_recorded(
        clean_run, position, "tbox/status", lambda m: setattr(m, "cabin_temp_c", -40.0)
    )
    assert (WRONG_TRANSFORM, "unexpected_field_change") in rules(check(clean_run, recording))


def test_missing_or_wrong_user_properties_are_detected(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/trip")
    recording = copy.deepcopy(clean_run.recording)
    recording[position]["props"] = [p for p in recording[position]["props"] if p[0] != "feature"]
    assert (USER_PROPERTIES, "missing_feature") in rules(check(clean_run, recording))
    recording = copy.deepcopy(clean_run.recording)
    recording[position]["props"] = [
        [k, "3650" if k == "retention-days" else v] for k, v in recording[position]["props"]
    ]
    assert (USER_PROPERTIES, "wrong_retention-days") in rules(check(clean_run, recording))


def test_check_cli_writes_summary_and_report(clean_run: Run, tmp_path: Path) -> None:
    from rich.console import Console

    from sim.checker import check_main

    with (tmp_path / GROUND_TRUTH_FILE).open("w") as truth:
        truth.writelines(json.dumps(r) + "\n" for r in clean_run.truth)
    with (tmp_path / RECORDING_FILE).open("w") as recording:
        recording.writelines(json.dumps(r) + "\n" for r in clean_run.recording[5:])
    output = io.StringIO()
    code = check_main(
        tmp_path, state_dir=None, policy_path=None, report=True, console=Console(file=output)
    )
    summary = json.loads((tmp_path / "check.json").read_text())
    assert code == 1 and summary["losses"] >= 1
    assert "leaks 0" in output.getvalue()
    report = (tmp_path / "report.html").read_text()
    assert "<svg" in report and "tbox/status" in report


# --------------------------------------------- contract rules 13 and 14 (anchor)


def _approximate(pub: Published, settings: Settings | None) -> bool:
    return settings is not None and settings.location == common_pb2.LOCATION_APPROXIMATE


def test_trip_value_off_the_step_grid_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "tbox/trip", _approximate)
    exact = pub.message.distance_km  # type: ignore[union-attr]
    recording = edit_recorded(
        clean_run, position, "tbox/trip", lambda m: setattr(m, "distance_km", exact)
    )
    assert (LEAK, "distance_km_not_on_step_grid") in rules(check(clean_run, recording))


def test_alarm_free_text_is_a_leak(clean_run: Run) -> None:
    _, position = find_delivered(clean_run, "tbox/alarm")
    recording = edit_recorded(
        clean_run, position, "tbox/alarm", lambda m: setattr(m, "detail", "at 48.1371,11.5761")
    )
    assert (LEAK, "detail_free_text") in rules(check(clean_run, recording))


def test_odometer_under_location_off_is_a_leak(clean_run: Run) -> None:
    def off(pub: Published, settings: Settings | None) -> bool:
        return settings is not None and settings.location == common_pb2.LOCATION_OFF

    _, position = find_delivered(clean_run, "tbox/status", off)
    recording = edit_recorded(
        clean_run, position, "tbox/status", lambda m: setattr(m, "odometer_km", 12_345.6)
    )
    assert (LEAK, "odometer_km_under_location_off") in rules(check(clean_run, recording))


def test_refresh_sooner_than_the_interval_is_a_leak(clean_run: Run) -> None:
    """Across streams of one car, on the recorder's clock (the gateway's, scaled)."""
    checker = Checker(clean_run.truth, clean_run.recording, clean_run.policy, clean_run.key)
    interval = clean_run.policy.refresh_interval_s * checker.gateway_wall_per_s
    vin = checker.vins[0]
    a, b = (48.1, 11.5), (48.2, 11.6)
    checker.anchor_values[vin] = [(0.0, 0.0, a), (1.0, 1.0, b), (1.0 + interval, 1.0 + interval, a)]
    checker._check_refresh_interval()
    assert checker.issues == []  # ok
    # Held back by a backend outage: decided an interval apart, arriving together.
    held = [(0.0, 0.0, a), (5 * interval, 0.5, b), (5 * interval + 0.01, 1.5 + interval, a)]
    checker.anchor_values[vin] = held
    checker._check_refresh_interval()
    assert checker.issues == []
    too_soon = 1.0 + interval / 2
    checker.anchor_values[vin] = [(0.0, 0.0, a), (1.0, 1.0, b), (too_soon, too_soon - 0.01, a)]
    checker.odometer_values[vin] = [
        (0.0, 0.0, 10.0),
        (5.0, 5.0, 10.0),
        (6.0, 6.0, 11.0),
        (7.0, 7.0, 12.0),
    ]
    checker._check_refresh_interval()
    assert {(i.category, i.rule) for i in checker.issues} == {
        (LEAK, "approximate_refresh_too_soon"),
        (LEAK, "odometer_moves_between_refreshes"),
    }


# --- consent at capture time and the causal token (contract rules 11, 12) ----------


def settings_sent(
    pub: Published, settings: Settings, wall: float, *, applied: bool = True, ts_ms: int = 0
) -> Record:
    """The truth's record of the car of `pub` sending `settings` at `wall`
    (and seeing it applied then, unless not `applied`)."""
    return {
        "type": "settings",
        "vin": pub.vin,
        "ts_ms": ts_ms or pub.ts_ms,
        "seq": 0,
        "settings": settings.to_json(),
        "wall_sent": wall,
        "applied": applied,
        "wall_applied": wall if applied else None,
    }


def publish_record(truth: list[Record], pub: Published) -> Record:
    """The truth's record of publishing `pub`."""
    return next(
        r
        for r in truth
        if r.get("type") == "publish" and pub_key(Published(r, b"", None)) == pub_key(pub)
    )


def check_precise_copy(
    run: Run, truth: list[Record], pub: Published, position: int, *, arrives: float
) -> CheckResult:
    """The check of `truth` with the copy of `pub` (a status message) carrying
    the car's exact position and arriving at `arrives`."""
    sent_position = original(pub).position

    def exact(message: Any) -> None:
        message.position.CopyFrom(sent_position)

    recording = edit_recorded(run, position, "tbox/status", exact)
    recording[position]["wall"] = arrives
    return check(dataclasses.replace(run, truth=truth), recording)


def with_capture(run: Run, pub: Published, revision: int, settings: Settings | None) -> Run:
    """The run's ground truth, claiming `pub` was captured under `revision`
    (with `settings`, applied, when given)."""
    truth = copy.deepcopy(run.truth)
    for record in truth:
        if (
            record["type"] == "publish"
            and record["seq"] == pub.record["seq"]
            and (record["vin"] == pub.vin and record["stream"] == pub.stream)
        ):
            record["capture_rev"] = revision
            record["uploaded_late"] = True
    if settings is not None:
        truth.append(settings_sent(pub, settings, pub.record["wall_start"]))
    return Run(truth, run.recording, run.policy, run.key)


def test_clean_run_has_late_uploads_judged_at_capture(clean_run: Run) -> None:
    late = [r for r in clean_run.truth if r["type"] == "publish" and r.get("uploaded_late")]
    assert late, "the scenario has store-and-forward uploads"
    assert all("capture_rev" in r for r in late)
    assert check(clean_run).issues == []


def test_forward_captured_in_privacy_mode_is_a_leak(clean_run: Run) -> None:
    pub, _ = find_delivered(clean_run, "tbox/status")
    revision = 10**6
    forged = with_capture(
        clean_run, pub, revision, Settings(revision, True, common_pb2.LOCATION_PRECISE, {})
    )
    assert (LEAK, "forwarded_in_privacy_mode") in rules(check(forged))


def test_forward_before_its_revision_was_applied_is_a_leak(clean_run: Run) -> None:
    pub, _ = find_delivered(clean_run, "tbox/status")
    forged = with_capture(clean_run, pub, 10**6, None)  # a revision that never arrived
    assert (LEAK, "forwarded_before_its_settings_revision") in rules(check(forged))


def test_message_whose_revision_never_arrived_is_not_a_loss(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "tbox/status")
    forged = with_capture(clean_run, pub, 10**6, None)
    recording = [r for n, r in enumerate(clean_run.recording) if n != position]
    result = check(forged, recording)
    assert result.losses == 0 and result.leaks == 0, result.issues
    assert result.tallies["tbox/status"].dropped["settings_pending"] == 1


def test_location_under_a_stricter_capture_mode_is_a_leak(clean_run: Run) -> None:
    pub, _ = find_delivered(
        clean_run,
        "tbox/status",
        lambda p, s: (
            s is not None
            and s.location == common_pb2.LOCATION_PRECISE
            and p.message is not None
            and p.message.HasField("position")
        ),
    )
    revision = 10**6
    captured = Settings(revision, False, common_pb2.LOCATION_OFF, {"remote_control": True})
    forged = with_capture(clean_run, pub, revision, captured)
    assert (LEAK, "geopoint_under_location_off") in rules(check(forged))


# --- issue 14: recipients, ownership change, objection ----------------------------------


def _records(run: Run, kind: str) -> list[Record]:
    return [r for r in run.truth if r["type"] == kind]


def test_clean_run_exercises_the_notice(clean_run: Run) -> None:
    result = check(clean_run)
    assert result.operator["ownership_change:done"] >= 1
    assert result.operator["objection:done"] >= 1
    assert result.messages["delivered"] > 0 and result.messages["refused"] > 0
    assert any(r["topic"].startswith("map/") for r in clean_run.recording)


def test_previous_owners_data_after_the_change_is_a_leak(clean_run: Run) -> None:
    """A message captured before the ownership change and forwarded after it."""
    change = _records(clean_run, "operator")
    change = [r for r in change if r["action"] == "ownership_change"]
    assert change, "the clean run has no ownership change"
    vin, t_ms, end = change[0]["vin"], change[0]["t_ms"], change[0]["wall_end"]
    pub, _ = find_delivered(clean_run, "tbox/status", lambda p, s: p.vin == vin and p.ts_ms < t_ms)
    late = dict(pub.record, wall_start=end + 1.0, wall_end=end + 1.1)
    run = dataclasses.replace(clean_run, truth=[*clean_run.truth, late])
    assert (LEAK, "previous_owners_data_after_ownership_change") in rules(check(run))


def test_an_objected_advert_reaching_the_car_is_a_leak(clean_run: Run) -> None:
    objections = [r for r in _records(clean_run, "operator") if r["action"] == "objection"]
    assert objections, "the clean run has no objection"
    received = {(r["vin"], r["request_id"]) for r in _records(clean_run, "message_received")}
    for objection in objections:
        vin, end = objection["vin"], objection["wall_end"]
        refused = [
            m
            for m in _records(clean_run, "message_sent")
            if m["vin"] == vin
            and m["category"] == "service_advert"
            and m["wall_sent"] > end
            and (vin, m["request_id"]) not in received
        ]
        if refused:
            break
    else:
        raise AssertionError("no advert was sent after an objection")
    forged = {
        "type": "message_received",
        "vin": vin,
        "category": "service_advert",
        "request_id": refused[0]["request_id"],
        "wall": refused[0]["wall_sent"] + 0.01,
    }
    run = dataclasses.replace(clean_run, truth=[*clean_run.truth, forged])
    assert (LEAK, "objected_feature_reached_the_car") in rules(check(run))


def test_an_allowed_message_that_never_reaches_the_car_is_a_loss(clean_run: Run) -> None:
    changed = {r["vin"] for r in _records(clean_run, "operator")}
    sent = {
        r["request_id"]: r
        for r in _records(clean_run, "message_sent")
        if r["category"] == "alert"
        and r["applied_rev"] is not None
        and r["pending_rev"] is None
        and r["vin"] not in changed
    }
    gone = next(r for r in _records(clean_run, "message_received") if r["request_id"] in sent)
    truth = [
        r
        for r in clean_run.truth
        if not (r["type"] == "message_received" and r["request_id"] == gone["request_id"])
    ]
    run = dataclasses.replace(clean_run, truth=truth)
    assert (LOSS, "message_not_delivered") in rules(check(run))


def test_a_refused_dpo_action_is_reported(clean_run: Run) -> None:
    truth = [
        dict(r, status=500, detail="boom") if r["type"] == "operator" else r
        for r in clean_run.truth
    ]
    run = dataclasses.replace(clean_run, truth=truth)
    assert (LEAK, "operator_action_refused") in rules(check(run))


def _map_copies(run: Run) -> list[int]:
    return [n for n, r in enumerate(run.recording) if r["topic"].startswith("map/")]


def test_a_copy_for_an_undeclared_recipient_is_a_leak(clean_run: Run) -> None:
    pub, position = find_delivered(clean_run, "tbox/status")
    recording = copy.deepcopy(clean_run.recording)
    forged = dict(recording[position], topic=f"map/{pub.vin}/tbox/status")
    assert (LEAK, "undeclared_recipient") in rules(check(clean_run, [*recording, forged]))


def test_a_field_the_recipient_must_not_get_is_a_leak(clean_run: Run) -> None:
    nav = [n for n in _map_copies(clean_run) if clean_run.recording[n]["topic"].endswith("/nav")]
    assert nav, "the clean run has no map provider copy of a navigation request"
    recording = edit_recorded(clean_run, nav[0], "avn/nav", lambda m: setattr(m, "route_id", "r-1"))
    assert (LEAK, "field_not_for_recipient") in rules(check(clean_run, recording))


def test_the_vin_in_a_pseudonymized_copy_is_a_leak(clean_run: Run) -> None:
    position = _map_copies(clean_run)[0]
    recording = copy.deepcopy(clean_run.recording)
    vin = next(v["vin"] for v in _records(clean_run, "vehicle"))
    parts = recording[position]["topic"].split("/")
    recording[position]["topic"] = "/".join([parts[0], vin, *parts[2:]])
    assert (LEAK, "vin_to_pseudonymized_recipient") in rules(check(clean_run, recording))


def test_a_missing_recipient_copy_is_a_loss(clean_run: Run) -> None:
    gone = set(_map_copies(clean_run)[:1])
    recording = [r for n, r in enumerate(clean_run.recording) if n not in gone]
    assert (LOSS, "recipient_copy_missing") in rules(check(clean_run, recording))


def test_an_extra_recipient_copy_is_a_leak(clean_run: Run) -> None:
    """A copy for the map provider of a message the developer never got."""
    position = _map_copies(clean_run)[0]
    recording = edit_recorded(
        clean_run,
        position,
        clean_run.recording[position]["topic"].split("/", 2)[2],
        lambda m: setattr(m.header, "seq", m.header.seq + 1),
    )
    extra = [*clean_run.recording, recording[position]]
    assert (LEAK, "copy_without_message") in rules(check(clean_run, extra))


# --- rule 11 before a car's first settings -------------------------------------------
def _captured_before_first_settings(run: Run) -> tuple[list[Record], Published, int, int]:
    """The truth with one delivered status message re-stamped well before the
    gateway applied its car's first settings (a car whose first settings wait
    for a gateway that is down): the truth, the message, its recording index and
    the new header timestamp."""
    pub, position = find_delivered(run, "tbox/status")
    checker = Checker(run.truth, run.recording, run.policy, run.key)
    first_wall = min(wall for wall, _ in checker.settings_applied_wall[pub.vin])
    tolerance = FIRST_SETTINGS_TOLERANCE_WALL_S / checker.gateway_wall_per_s
    # Even the latest capture time the skew margin allows is before them.
    stamped_s = checker._gateway_time(first_wall) - CAPTURE_SKEW_S - 2 * tolerance
    header_ts_ms = int(stamped_s * 1000)
    truth = copy.deepcopy(run.truth)
    for record in truth:
        if record.get("type") == "publish" and pub_key(Published(record, b"", None)) == pub_key(
            pub
        ):
            record["header_ts_ms"] = header_ts_ms
            break
    else:
        raise AssertionError("the message is not in the truth")
    return truth, pub, position, header_ts_ms


def test_a_message_captured_before_the_first_settings_is_not_a_loss(clean_run: Run) -> None:
    """The gateway knows nothing of a car before its first settings (rule 11):
    it drops what was captured earlier than that minus its skew margin, as a
    slow restart under a compressed clock makes happen (a chaos run saw it)."""
    truth, _, position, _ = _captured_before_first_settings(clean_run)
    recording = [r for n, r in enumerate(clean_run.recording) if n != position]
    run = dataclasses.replace(clean_run, truth=truth)
    result = check(run, recording)
    assert result.issues == []
    assert sum(t.dropped["captured_before_known_settings"] for t in result.tallies.values()) >= 1


def test_a_message_captured_before_the_first_settings_that_arrives_is_a_leak(
    clean_run: Run,
) -> None:
    truth, pub, position, header_ts_ms = _captured_before_first_settings(clean_run)

    def restamp(message: Any) -> None:
        message.header.timestamp_ms = header_ts_ms

    recording = edit_recorded(clean_run, position, pub.stream, restamp)
    result = check(dataclasses.replace(clean_run, truth=truth), recording)
    assert rules(result) == {(LEAK, "forwarded_captured_before_known_settings")}


def test_the_checker_assumes_the_gateways_default_skew_margin() -> None:
    from gateway.config import PipelineConfig

    assert PipelineConfig.model_fields["capture_skew_s"].default == CAPTURE_SKEW_S


# --- a later settings revision decided first (a group of instances) --------------------
def _battery_stripped_under_the_next_settings(
    run: Run, sent_at: Callable[[Published, Record], float]
) -> tuple[Run, list[Record], Published, int]:
    """A battery message that had to arrive with its charger's place (precise),
    arriving without it, as the gateway forwards it under location off; and the
    truth with the car's next revision (location off) sent at `sent_at(pub,
    copy)`. A CI run of `sim group` saw this: an instance got to the message
    after another had applied the car's next settings."""
    pub, position = find_delivered(
        run,
        "tbox/battery",
        lambda p, s: (
            s is not None
            and s.location == common_pb2.LOCATION_PRECISE
            and p.message is not None
            and p.message.HasField("charging_location")
            and bool(p.message.evse_id)
        ),
    )
    candidates = Checker(run.truth, run.recording, run.policy, run.key)._settings_candidates(
        pub.record
    )
    assert candidates[0] is not None
    later = dataclasses.replace(candidates[0], revision=10**6, location=common_pb2.LOCATION_OFF)

    def strip(message: Any) -> None:
        message.ClearField("charging_location")
        message.ClearField("evse_id")

    recording = edit_recorded(run, position, "tbox/battery", strip)
    for prop in recording[position]["props"]:
        if prop[0] == "transforms":
            prop[1] = "location_off"
    sent = sent_at(pub, run.recording[position])
    truth = [*copy.deepcopy(run.truth), settings_sent(pub, later, sent, ts_ms=pub.ts_ms + 1)]
    return dataclasses.replace(run, truth=truth), recording, pub, position


def test_a_copy_decided_under_the_cars_next_settings_is_not_over_coarsening(
    clean_run: Run,
) -> None:
    """Sent after the message and before its copy arrived: the gateway may
    have applied them first (rule 21 asks for at least the settings committed
    before the message was dispatched; later ones are stricter, never looser)."""
    run, recording, _, _ = _battery_stripped_under_the_next_settings(
        clean_run, lambda pub, copy: (float(pub.record["wall_end"]) + float(copy["wall"])) / 2
    )
    assert check(run, recording).issues == []
    # Without those settings it is over-coarsening (the check is not blind).
    assert (OVER_COARSENING, "geopoint_removed") in rules(check(clean_run, recording))


def test_a_copy_coarser_than_settings_sent_after_it_arrived_is_over_coarsening(
    clean_run: Run,
) -> None:
    run, recording, _, _ = _battery_stripped_under_the_next_settings(
        clean_run, lambda pub, copy: float(copy["wall"]) + 0.5
    )
    assert (OVER_COARSENING, "geopoint_removed") in rules(check(run, recording))


def test_a_later_looser_revision_does_not_excuse_a_finer_location(clean_run: Run) -> None:
    """A later revision counts only where it is stricter: a precise position
    forwarded for a car in approximate mode stays a leak when its next
    settings (sent before the copy arrived) are precise, also for a car that
    states no revision (so no capture settings bound it)."""
    pub, position = find_delivered(
        clean_run, "tbox/status", mode_is(common_pb2.LOCATION_APPROXIMATE)
    )
    checker = Checker(clean_run.truth, clean_run.recording, clean_run.policy, clean_run.key)
    candidates = checker._settings_candidates(pub.record)
    assert candidates[0] is not None
    later = dataclasses.replace(candidates[0], revision=10**6, location=common_pb2.LOCATION_PRECISE)
    sent = float(pub.record["wall_end"]) + 0.001
    truth = [*copy.deepcopy(clean_run.truth), settings_sent(pub, later, sent, ts_ms=pub.ts_ms + 1)]
    publish_record(truth, pub).pop("capture_rev", None)
    assert (LEAK, "location_finer_than_mode") in rules(
        check_precise_copy(clean_run, truth, pub, position, arrives=sent + 0.5)
    )


def test_a_message_dropped_by_the_cars_next_settings_is_not_a_loss(clean_run: Run) -> None:
    """Missing, and the car switched the feature off just after publishing it
    (sooner than its messages of that moment took to arrive, so the gateway
    may have got to it later): not judged. Switched off later, or never seen
    applied by the car: a loss."""
    pub, position = find_delivered(clean_run, "tbox/status")
    recording = [r for n, r in enumerate(clean_run.recording) if n != position]
    checker = Checker(clean_run.truth, recording, clean_run.policy, clean_run.key)
    checker._lags, checker._car_lags = checker._arrival_lags(checker._index_recording())
    lag = checker._decision_lag(pub)
    assert lag > 0
    candidates = checker._settings_candidates(pub.record)
    assert candidates[0] is not None
    feature = clean_run.policy.feature_for("tbox/status")
    off = dataclasses.replace(
        candidates[0],
        revision=10**6,
        features={**candidates[0].features, feature: False},
    )

    def with_off_sent(after_s: float, applied: bool = True) -> CheckResult:
        sent = float(pub.record["wall_end"]) + after_s
        truth = [
            *copy.deepcopy(clean_run.truth),
            settings_sent(pub, off, sent, applied=applied, ts_ms=pub.ts_ms + 1),
        ]
        return check(dataclasses.replace(clean_run, truth=truth), recording)

    soon = with_off_sent(lag / 2)
    assert soon.losses == 0 and soon.issues == [], soon.issues
    assert any(o == (pub.vin, "tbox/status", "ambiguous_dropped") for o in soon.outcomes)
    assert with_off_sent(lag * 2 + 0.1).losses == 1
    assert with_off_sent(lag / 2, applied=False).losses == 1


def test_the_lag_that_excuses_a_missing_message_is_its_cars_stretch_or_that_moment(
    clean_run: Run,
) -> None:
    """One message that took long to arrive bounds how late the gateway got to
    its car's messages of that stretch, and to any car's of that moment (an
    instance that stalls holds every car's share), and excuses nothing of
    another car a little later or of its car another time."""
    checker = Checker(clean_run.truth, clean_run.recording, clean_run.policy, clean_run.key)
    lags, car_lags = checker._arrival_lags(checker._index_recording())
    slow_car = next(p for p in checker.published if len(car_lags.get(p.vin, ())) > 2)
    slow_at, _ = car_lags[slow_car.vin][1]
    car_lags[slow_car.vin][1] = (slow_at, 60.0)
    lags[lags.index(next(lag for lag in lags if lag[0] == slow_at))] = (slow_at, 60.0)
    checker._lags, checker._car_lags = lags, car_lags
    other_car = next(p for p in checker.published if p.vin != slow_car.vin)

    def lag_of(pub: Published, published: float) -> float:
        return checker._decision_lag(Published({**pub.record, "wall_end": published}, b"", None))

    assert lag_of(slow_car, slow_at + LAG_NEIGHBOURHOOD_WALL_S - 0.5) == 60.0
    assert lag_of(other_car, slow_at + MOMENT_WALL_S - 0.1) == 60.0
    assert lag_of(other_car, slow_at + MOMENT_WALL_S + 1.0) < 60.0
    assert lag_of(slow_car, slow_at + LAG_NEIGHBOURHOOD_WALL_S + 1.0) < 60.0
    assert lag_of(slow_car, slow_at - LAG_NEIGHBOURHOOD_WALL_S - 1.0) < 60.0


def test_a_revision_applied_late_bounds_the_decision_lag_of_its_moment(clean_run: Run) -> None:
    """A settings revision the gateway took long to apply shows an instance
    that was late then, as a late message does; not at another moment."""
    checker = Checker(clean_run.truth, clean_run.recording, clean_run.policy, clean_run.key)
    pub = checker.published[len(checker.published) // 2]
    published = float(pub.record["wall_end"])
    lags, _ = checker._arrival_lags(checker._index_recording())
    assert max(lag for _, lag in lags) < 30.0
    candidates = checker._settings_candidates(pub.record)
    assert candidates[0] is not None
    late = dataclasses.replace(candidates[0], revision=10**6)

    def lag_with_revision_sent(before_s: float) -> float:
        record = settings_sent(pub, late, published - before_s, ts_ms=pub.ts_ms + 1)
        record["wall_applied"] = published + 30.0
        checker = Checker(
            [*clean_run.truth, record], clean_run.recording, clean_run.policy, clean_run.key
        )
        checker._lags, checker._car_lags = checker._arrival_lags(checker._index_recording())
        return checker._decision_lag(pub)

    assert lag_with_revision_sent(0.2) == pytest.approx(30.2)
    assert lag_with_revision_sent(MOMENT_WALL_S + 1.0) < 30.0


def test_a_message_the_run_stalled_may_be_dropped_by_the_next_settings(clean_run: Run) -> None:
    """Published while the run had an instance stopped (or just before): the
    instance may have got to it when it was back, under the settings of then,
    so missing it is not a loss when a revision sent before then drops it.
    The same message outside any stall, or with the stall elsewhere, is lost."""
    pub, position = find_delivered(clean_run, "tbox/status")
    recording = [r for n, r in enumerate(clean_run.recording) if n != position]
    published = float(pub.record["wall_end"])
    candidates = Checker(
        clean_run.truth, recording, clean_run.policy, clean_run.key
    )._settings_candidates(pub.record)
    assert candidates[0] is not None
    feature = clean_run.policy.feature_for("tbox/status")
    off = dataclasses.replace(
        candidates[0], revision=10**6, features={**candidates[0].features, feature: False}
    )
    truth = [
        *copy.deepcopy(clean_run.truth),
        settings_sent(pub, off, published + 1.0, ts_ms=pub.ts_ms + 1),
    ]

    def losses(stalls: list[tuple[float, float]]) -> int:
        return (
            Checker(truth, recording, clean_run.policy, clean_run.key, stalls=stalls).run().losses
        )

    assert losses([(published - 0.2, published + 1.5)]) == 0  # held until after the revision
    assert losses([(published - STALL_LEAD_WALL_S + 0.1, published + 1.5)]) == 0  # just before
    assert losses([]) == 1
    assert losses([(published - 0.2, published + 0.5)]) == 1  # back before the revision
    assert losses([(published + 10.0, published + 12.0)]) == 1  # another moment


def test_settings_that_drop_a_message_bound_nothing_for_its_copy(clean_run: Run) -> None:
    """Published under settings that drop it (privacy mode on) with a
    revision pending that lets it through approximately, then the car goes
    precise before the copy arrives: the copy must still be approximate. A
    precise one is a leak, not excused by combining the later precise
    revision with the privacy-mode settings."""
    pub, position = find_delivered(
        clean_run, "tbox/status", mode_is(common_pb2.LOCATION_APPROXIMATE)
    )
    checker = Checker(clean_run.truth, clean_run.recording, clean_run.policy, clean_run.key)
    approximate = checker._settings_candidates(pub.record)[0]
    assert approximate is not None
    privacy = dataclasses.replace(
        approximate, revision=10**6, privacy_mode=True, location=common_pb2.LOCATION_PRECISE
    )
    precise = dataclasses.replace(
        approximate, revision=10**6 + 1, location=common_pb2.LOCATION_PRECISE
    )
    sent = float(pub.record["wall_end"]) + 0.001
    truth = copy.deepcopy(clean_run.truth)
    record = publish_record(truth, pub)
    record.pop("capture_rev", None)
    record["applied_rev"], record["pending_rev"] = privacy.revision, approximate.revision
    for settings, at in ((privacy, float(pub.record["wall_start"]) - 1.0), (precise, sent)):
        truth.append(settings_sent(pub, settings, at))
    assert (LEAK, "location_finer_than_mode") in rules(
        check_precise_copy(clean_run, truth, pub, position, arrives=sent + 0.5)
    )
