"""Bounds of the pure core (contract rules 18 and 20): payload size caps and
eCall conformance. No broker: decide() only."""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.budget import IngressBudget, TokenBucket, WindowCounter
from gateway.core import (
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
)
from gateway.core import decide as decide_message
from gateway.core.cache import ByteBoundedMemo, strings_size
from gateway.core.decide import state_from_snapshot
from gateway.core.state import strictest
from gateway.metrics import FORWARD_KINDS_PENDING, GatewayMetrics
from gateway.policy import PolicyError, load_policy, parse_policy
from gateway.store import ConsentStore, SqliteConsentStore
from telematics.v1 import streams_pb2

ROOT = Path(__file__).resolve().parents[1]
POLICY = load_policy(ROOT / "config" / "policy.yaml")
CTX = DecisionContext(POLICY, bytes(range(32)))
VIN = "WVWZZZ1JZXW000001"
STATE = VehicleState(1, False, LocationMode.PRECISE, frozenset({"remote_control"}))


def decide(topic: str, payload: bytes) -> Drop | Forward:
    decision = decide_message(CTX, f"vehicle/{VIN}/{topic}", payload, {VIN: STATE}, {}, 1e9)
    assert isinstance(decision, Drop | Forward)
    return decision


def test_oversized_payload_is_dropped_before_it_is_parsed() -> None:
    msg = streams_pb2.VehicleStatus()
    msg.header.vin = VIN
    assert isinstance(decide("tbox/status", msg.SerializeToString()), Forward)
    # Garbage bytes over the cap: dropped as oversized, not as undecodable.
    decision = decide("tbox/status", b"\xff" * (POLICY.max_payload_bytes_default + 1))
    assert isinstance(decision, Drop) and decision.reason is DropReason.OVERSIZED


def test_per_stream_cap_overrides_the_policy_default() -> None:
    text = (ROOT / "config" / "policy.yaml").read_text()
    capped = "    message: VehicleStatus\n    max_payload_bytes: 100\n"
    text = text.replace("    message: VehicleStatus\n", capped)
    ctx = DecisionContext(parse_policy(text, source="test"), bytes(range(32)))
    msg = streams_pb2.VehicleStatus()
    msg.header.vin = VIN
    small = msg.SerializeToString()
    big = small + bytes([0xFA, 0x3F, 120]) + b"u" * 120  # an unknown field makes it 143 bytes
    for payload, forwarded in ((small, True), (big, False)):
        decision = decide_message(ctx, f"vehicle/{VIN}/tbox/status", payload, {VIN: STATE}, {}, 1e9)
        assert isinstance(decision, Forward) is forwarded
        if not forwarded:
            assert isinstance(decision, Drop) and decision.reason is DropReason.OVERSIZED
    with pytest.raises(PolicyError):
        parse_policy(text.replace("max_payload_bytes: 100", "max_payload_bytes: 10"), source="t")


def ecall(recent: int = 3, extra: bytes = b"") -> bytes:
    msg = streams_pb2.ECall(passengers=2, vehicle_type="M1")
    msg.header.vin = VIN
    msg.position.latitude = 48.1
    for i in range(recent):
        point = msg.recent_positions.add()
        point.latitude = 48.0 + i / 100
    return msg.SerializeToString() + extra


def test_conforming_ecall_leaves_byte_for_byte() -> None:
    payload = ecall()
    decision = decide("tbox/ecall", payload)
    assert isinstance(decision, Forward)
    assert decision.payload == payload and decision.transforms == ()


@pytest.mark.parametrize(
    "payload",
    [
        ecall(recent=10),  # a track, not three recent positions
        ecall(extra=bytes([0xFA, 0x3F, 5]) + b"extra"),  # a field outside the contract
        ecall(extra=bytes([0xFA, 0x3F]) + b"\x80\x80\x04" + b"z" * 65536),  # over the size cap
    ],
)
def test_non_conforming_ecall_is_trimmed_and_still_forwarded(payload: bytes) -> None:
    decision = decide("tbox/ecall", payload)
    assert isinstance(decision, Forward)
    assert decision.transforms == ("trim",)
    assert dict(decision.user_properties)["transforms"] == "trim"
    out = streams_pb2.ECall.FromString(decision.payload)
    assert len(out.recent_positions) <= 3
    assert (out.passengers, out.vehicle_type, out.header.vin) == (2, "M1", VIN)
    assert len(decision.payload) <= POLICY.max_payload_bytes_default
    assert out.ByteSize() == len(decision.payload)  # nothing unknown survived


def test_ingress_budget_pauses_on_either_limit_and_resumes_under_a_quarter_of_both() -> None:
    events: list[str] = []
    budget = IngressBudget(8, 1000, lambda: events.append("pause"), lambda: events.append("go"))
    for _ in range(7):
        budget.take(10)
    assert events == []
    budget.take(10)
    assert events == ["pause"]
    for _ in range(5):
        budget.give(10)
    assert events == ["pause"]  # 3 held: not yet under a quarter (2)
    budget.give(10)
    assert events == ["pause", "go"]
    budget.take(990)  # bytes alone
    assert events == ["pause", "go", "pause"]


def test_metric_label_sets_are_capped_and_fold_into_other() -> None:
    metrics = GatewayMetrics(max_series=10)
    for i in range(50):
        metrics.inc(metrics.forwarded, "avn/app/{app_id}", f"third_party.app{i}")
    assert (
        metrics.value(
            "gateway_messages_forwarded_total",
            stream="avn/app/{app_id}",
            feature="third_party.app3",
        )
        == 1
    )
    assert metrics.value("gateway_messages_forwarded_total", stream="other", feature="other") == 40
    series = [
        s
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "gateway_messages_forwarded_total"
    ]
    assert len(series) == 11


def test_forwarded_messages_are_counted_per_kind_and_bounded_between_scrapes() -> None:
    """`forwarded_message` adds up (stream, feature, transforms) until the
    registry is read: the totals are those of one increment per message and per
    transform, the label cap holds, and features named by cars (app ids) cannot
    grow what waits for the next scrape."""
    metrics = GatewayMetrics(max_series=10)
    for _ in range(5):
        metrics.forwarded_message("tbox/status", "remote_control", ("coarsen:position",))
    for i in range(3000):
        transforms = ("coarsen:position", "anchor:odometer_km") if i % 3 else ()
        metrics.forwarded_message("avn/app/{app_id}", f"third_party.app{i}", transforms)
        assert len(metrics._pending_forwards) <= FORWARD_KINDS_PENDING
    value = metrics.value
    assert (
        value("gateway_messages_forwarded_total", stream="tbox/status", feature="remote_control")
        == 5
    )
    assert (
        value(
            "gateway_messages_forwarded_total",
            stream="avn/app/{app_id}",
            feature="third_party.app3",
        )
        == 1
    )
    assert value("gateway_messages_forwarded_total", stream="other", feature="other") == 3000 - 9
    assert value("gateway_transforms_total", transform="coarsen:position") == 2000 + 5
    assert value("gateway_transforms_total", transform="anchor:odometer_km") == 2000


def test_token_bucket_and_window_counter() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    assert [bucket.allow(100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.allow(100.15) and not bucket.allow(100.15)  # one token per 0.1 s
    counter = WindowCounter(60)
    assert [counter.count("a", 10.0) for _ in range(3)] == [1, 2, 3]
    assert counter.count("b", 20.0) == 1 and len(counter) == 2
    assert counter.count("a", 80.0) == 1 and len(counter) == 1  # a new window forgets


def test_strictest_allows_only_what_both_allowed() -> None:
    precise, approximate = LocationMode.PRECISE, LocationMode.APPROXIMATE
    older = SettingsSnapshot(VIN, 1, False, precise, {"a": True, "b": True}, 10.0, "1")
    newer = SettingsSnapshot(VIN, 2, True, approximate, {"a": True, "c": True}, 20.0, "2")
    merged = strictest(older, newer)
    assert (merged.revision, merged.privacy_mode, merged.location) == (
        2,
        True,
        LocationMode.APPROXIMATE,
    )
    assert merged.features == {"a": True, "b": False, "c": False}
    assert merged.applied_at == 10.0  # the merged row covers both intervals
    off = SettingsSnapshot(VIN, 3, False, LocationMode.UNSPECIFIED, {}, 30.0, "2")
    assert strictest(newer, off).location is LocationMode.OFF


def test_settings_history_is_compacted_and_merged_conservatively(tmp_path: Path) -> None:
    store = SqliteConsentStore.in_state_dir(tmp_path, history_limit=5)
    try:
        for revision in range(1, 21):
            on = revision != 7  # revision 7 withdrew consent for a moment
            store.apply_settings(
                SettingsSnapshot(
                    VIN,
                    revision,
                    False,
                    LocationMode.PRECISE,
                    {"remote_control": on},
                    float(revision),
                    "1",
                )
            )
        history = store.history(VIN)
        assert len(history) == 5
        assert history[-1].revision == 20
        # The withdrawal survives compaction: the oldest row (merging 1..16)
        # does not claim consent, and it starts where the history started.
        assert history[0].features == {"remote_control": False}
        assert history[0].applied_at == 1.0
        # Merge mode: no new row, the latest row becomes the strictest of both,
        # while the enforced settings are the newest.
        store.apply_settings(
            SettingsSnapshot(VIN, 21, True, LocationMode.OFF, {"remote_control": True}, 21.0, "1"),
            merge=True,
        )
        assert len(store.history(VIN)) == 5
        assert store.history(VIN)[-1].privacy_mode is True
        current = next(v for v in store.load_all() if v.snapshot.vin == VIN)
        assert current.snapshot.revision == 21
    finally:
        store.close()


def test_history_of_a_v1_store_gains_the_merged_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / SqliteConsentStore.FILENAME)
    # The settings_history table exactly as schema 1 created it.
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE settings_history (
            id INTEGER PRIMARY KEY, vin TEXT NOT NULL, revision INTEGER NOT NULL,
            privacy_mode INTEGER NOT NULL, location INTEGER NOT NULL, features TEXT NOT NULL,
            applied_at REAL NOT NULL, policy_version TEXT NOT NULL, source TEXT NOT NULL);
        INSERT INTO settings_history VALUES
            (1, 'WVWZZZ1JZXW000001', 1, 0, 3, '{"remote_control":true}', 1.0, '1', 'vehicle');
        """
    )
    db.commit()
    db.close()
    store = SqliteConsentStore.in_state_dir(tmp_path, history_limit=2)
    try:
        for revision in (2, 3):
            store.apply_settings(
                SettingsSnapshot(VIN, revision, False, LocationMode.PRECISE, {}, 2.0, "1")
            )
        assert [h.revision for h in store.history(VIN)] == [2, 3]
    finally:
        store.close()


def test_memos_keyed_by_car_input_stay_within_their_byte_budget() -> None:
    memo: ByteBoundedMemo[tuple[tuple[str, bool], ...], int] = ByteBoundedMemo(10_000, strings_size)
    for i in range(1000):
        key = tuple((f"third_party.{'a' * 90}{i}.{j}", True) for j in range(5))
        assert memo.put(key, i) == i
        assert memo.bytes <= 10_000
    assert 0 < len(memo) < 30
    assert memo.put(key, -1) == 999  # still remembered: the first value wins


def test_a_flood_of_distinct_feature_maps_does_not_grow_the_core_memos() -> None:
    core = importlib.import_module("gateway.core.decide")  # the module, not the function

    budget = core._SET_CACHE.max_bytes
    for i in range(3000):
        features = {f"third_party.{'x' * 80}{i}.{j}": True for j in range(64)}
        snapshot = SettingsSnapshot(VIN, i + 1, False, LocationMode.OFF, features, 0.0, "1")
        state = state_from_snapshot(POLICY, snapshot)
        assert len(state.enabled - POLICY.default_on) == 64
    assert core._SET_CACHE.bytes <= budget
    memo = core._ENABLED_CACHE[id(POLICY)][1]
    assert memo.bytes <= memo.max_bytes


def test_oversized_settings_are_dropped_before_they_are_parsed() -> None:
    huge = b"\x1a" + b"\xff" * (POLICY.max_payload_bytes_default + 10)  # not even valid
    decision = decide_message(CTX, f"vehicle/{VIN}/avn/privacy", huge, {}, {}, 1e9)
    assert isinstance(decision, Drop) and decision.reason is DropReason.OVERSIZED


def test_counts_added_up_between_reads_are_all_exposed() -> None:
    """`inc` adds up in a dictionary; any read of the registry (a scrape,
    `value`) sees every increment made before it, and none twice."""
    from prometheus_client import generate_latest

    metrics = GatewayMetrics()
    for _ in range(3):
        metrics.inc(metrics.received, "vehicle")
    assert b'gateway_messages_received_total{source="vehicle"} 3.0' in generate_latest(
        metrics.registry
    )
    metrics.inc(metrics.received, "vehicle")
    metrics.inc(metrics.received, "backend")
    assert metrics.value("gateway_messages_received_total", source="vehicle") == 4
    assert metrics.value("gateway_messages_received_total", source="backend") == 1
    assert metrics.value("gateway_messages_received_total", source="vehicle") == 4


def test_a_feature_map_shared_by_cars_is_judged_under_each_policy() -> None:
    """Loads hand every car of one stored feature map the same dict, and its
    enabled set is remembered by the map's identity: another policy must not
    get the set the previous one gave the same map."""
    import dataclasses

    from gateway.core import SettingsSnapshot
    from gateway.core.state import LocationMode

    features: dict[str, bool] = {}  # nothing said: each policy's defaults apply

    def enabled(policy: object) -> frozenset[str]:
        snapshot = SettingsSnapshot(
            "1HGCM82633A004352", 1, False, LocationMode.PRECISE, features, 0.0, ""
        )
        return state_from_snapshot(policy, snapshot).enabled  # type: ignore[arg-type]

    assert enabled(POLICY) == POLICY.default_on != frozenset()
    stricter = dataclasses.replace(POLICY, default_on=frozenset())
    assert enabled(stricter) == frozenset()
    assert enabled(POLICY) == POLICY.default_on


def test_loading_a_fleet_keeps_one_set_slot_per_unclaimed_car(tmp_path: Path) -> None:
    """The subjects loaded and not seen since are one set sized for them once:
    built as a union of the states', histories' and anchors' keys it was sized
    for all of them together (85 B a car instead of 42 at 200k cars)."""
    import sys

    from gateway.core import SettingsSnapshot
    from gateway.core.state import LocationMode
    from gateway.service import GatewayService

    from .conftest import KEY, gateway_config

    store = SqliteConsentStore.in_state_dir(tmp_path)
    policy = POLICY
    cars = 3_000
    for i in range(cars):
        store.apply_settings(
            SettingsSnapshot(f"S{i:063d}", 1, False, LocationMode.APPROXIMATE, {}, 1.0, "")
        )
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path, None)
    service = GatewayService(config, policy, KEY, store)
    try:
        assert service.load_state() == cars
        assert len(service.histories) == cars  # every car has a history to fold in
        one_by_one = set()
        for subject in service.states:
            one_by_one.add(subject)
        assert service._unclaimed == one_by_one
        assert sys.getsizeof(service._unclaimed) <= sys.getsizeof(one_by_one)
    finally:
        store.close()


def test_a_restart_reads_only_histories_that_are_more_than_their_settings(
    tmp_path: Path, open_store: Callable[[], ConsentStore]
) -> None:
    """A full load takes a car's history from its settings row when its one
    history row mirrors it, and reads the rows of every other car. The result
    is the history the rows themselves give, for each kind of car: one row,
    several, a merged row, a restriction, a row that differs from the
    settings, settings without any history row."""
    from gateway.control.audit import AuditRecord
    from gateway.core import SettingsSnapshot
    from gateway.core.state import LocationMode
    from gateway.service import GatewayService

    from .conftest import KEY, gateway_config

    store = open_store()
    assert isinstance(store, SqliteConsentStore)  # PostgreSQL's store is one too

    def snap(car: str, revision: int, at: float, **features: bool) -> SettingsSnapshot:
        on = features or {"remote_control": True}
        return SettingsSnapshot(car, revision, False, LocationMode.APPROXIMATE, on, at, "")

    kinds = ("one", "two", "merged", "restricted", "lifted", "odd", "version", "bare")
    cars = {kind: f"{kind:x<64}" for kind in kinds}
    for car in cars.values():
        store.apply_settings(snap(car, 1, 100.0))
    store.open_window(cars["bare"], 5e9)  # its state differs from its snapshot's
    store.apply_settings(snap(cars["two"], 2, 200.0, remote_control=False))
    store.apply_settings(snap(cars["merged"], 2, 200.0, remote_control=False), merge=True)
    store.apply_settings(snap(cars["merged"], 3, 210.0), merge=True)
    store.set_restriction(
        cars["restricted"], True, AuditRecord("dpo", "restriction_set", "", {}, 300.0)
    )
    for restricted, at in ((True, 300.0), (False, 400.0)):
        store.set_restriction(
            cars["lifted"], restricted, AuditRecord("dpo", "restriction", "", {}, at)
        )

    def tamper(db: Any) -> None:
        db.execute("UPDATE settings_history SET applied_at = 99.0 WHERE vin = ?", (cars["odd"],))
        db.execute("DELETE FROM settings_history WHERE vin = ?", (cars["bare"],))
        # Retention left only the lift of a restriction; a policy rollback
        # changed the version the settings name.
        db.execute(
            "DELETE FROM settings_history WHERE vin = ? AND source <> 'restriction_lifted'",
            (cars["lifted"],),
        )
        db.execute(
            "UPDATE vehicle_settings SET policy_version = 'v0' WHERE vin = ?", (cars["version"],)
        )

    store._write(tamper)
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path, None)
    service = GatewayService(config, POLICY, KEY, store)
    try:
        assert service.load_state() == len(cars)
        read_in_full = service._load_histories(service.states)
        assert service.histories == read_in_full
        assert len(service.histories[cars["two"]]) == 2
        assert service.histories[cars["odd"]][0].since == 99.0
        assert service.histories[cars["bare"]][0].since == 100.0
        skipped = {row.snapshot.vin for row in store.capture_history(mirrors=False)}
        assert skipped == {
            cars[k] for k in ("two", "merged", "restricted", "lifted", "odd", "version")
        }
    finally:
        store.close()
