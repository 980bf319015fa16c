"""SqliteConsentStore: durability, ordering and schema guard."""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.control.audit import AuditRecord
from gateway.core import LocationAnchor, LocationMode, SettingsSnapshot
from gateway.core.decide import MAX_REVISION
from gateway.core.identity import subject
from gateway.policy import VersionConflict
from gateway.store import SqliteConsentStore, StoredPolicy, StoredVehicle
from gateway.store.sqlite import SCHEMA_VERSION

VIN = "WVWZZZ1JZXW000001"
OTHER_VIN = "WVWZZZ1JZXW000002"
KEY = bytes(range(32))
OTHER = "WVWZZZ1JZXW000002"


def snap(
    revision: int,
    vin: str = VIN,
    features: dict[str, bool] | None = None,
    location: LocationMode = LocationMode.APPROXIMATE,
    privacy_mode: bool = False,
    applied_at: float | None = None,
) -> SettingsSnapshot:
    return SettingsSnapshot(
        vin=vin,
        revision=revision,
        privacy_mode=privacy_mode,
        location=location,
        features={"remote_control": True, "online_search": False} if features is None else features,
        applied_at=1_800_000_000.5 + revision if applied_at is None else applied_at,
        policy_version="2026.11.2",
        source="vehicle",
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / SqliteConsentStore.FILENAME


@pytest.fixture
def store(open_store: Callable[[], SqliteConsentStore]) -> Iterator[SqliteConsentStore]:
    """The store on each backend (SQLite, PostgreSQL): one suite for both."""
    s = open_store()
    yield s
    s.close()


@pytest.fixture
def sqlite_store(path: Path) -> Iterator[SqliteConsentStore]:
    """For what only SQLite has (its file, WAL, older schema files)."""
    s = SqliteConsentStore(path)
    yield s
    s.close()


def by_vin(store: SqliteConsentStore) -> dict[str, StoredVehicle]:
    return {v.snapshot.vin: v for v in store.load_all()}


def test_empty_store(store: SqliteConsentStore) -> None:
    assert list(store.load_all()) == []
    assert store.history(VIN) == []


def test_apply_and_load_round_trip(store: SqliteConsentStore) -> None:
    a = snap(3, privacy_mode=True, location=LocationMode.PRECISE)
    b = snap(1, vin=OTHER, features={}, location=LocationMode.UNSPECIFIED)
    store.apply_settings(a)
    store.apply_settings(b)
    loaded = by_vin(store)
    assert loaded[VIN].snapshot == a
    assert loaded[VIN].snapshot.features == a.features
    assert loaded[VIN].snapshot.location is LocationMode.PRECISE
    assert loaded[VIN].window_until == 0.0
    assert loaded[OTHER].snapshot == b
    assert loaded[OTHER].snapshot.features == {}


def test_newer_revision_replaces_and_history_keeps_order(store: SqliteConsentStore) -> None:
    revisions = [1, 2, 5, 9]
    for r in revisions:
        store.apply_settings(snap(r, features={"remote_control": r % 2 == 1}))
    store.apply_settings(snap(1, vin=OTHER))
    assert by_vin(store)[VIN].snapshot == snap(9, features={"remote_control": True})
    history = store.history(VIN)
    assert [s.revision for s in history] == revisions
    assert history[1].features == {"remote_control": False}
    assert [s.revision for s in store.history(OTHER)] == [1]


@pytest.mark.parametrize("late", [1, 4, 5])
def test_lower_or_equal_revision_never_overwrites(store: SqliteConsentStore, late: int) -> None:
    store.apply_settings(snap(5, features={"remote_control": False}))
    store.apply_settings(snap(late, features={"remote_control": True}, privacy_mode=True))
    current = by_vin(store)[VIN].snapshot
    assert current.revision == 5
    assert current.features == {"remote_control": False}
    assert not current.privacy_mode
    # The history lists what was applied, not what was refused.
    assert [s.revision for s in store.history(VIN)] == [5]


def test_open_window_persisted(
    open_store: Callable[[], SqliteConsentStore], store: SqliteConsentStore
) -> None:
    store.apply_settings(snap(1))
    store.apply_settings(snap(1, vin=OTHER))
    store.open_window(VIN, 1_800_000_120.25)
    assert by_vin(store)[VIN].window_until == 1_800_000_120.25
    assert by_vin(store)[OTHER].window_until == 0.0
    # Newer settings do not close an open window.
    store.apply_settings(snap(2))
    assert by_vin(store)[VIN].window_until == 1_800_000_120.25
    store.close()
    reopened = open_store()
    try:
        assert by_vin(reopened)[VIN].window_until == 1_800_000_120.25
    finally:
        reopened.close()


def test_survives_close_and_reopen(open_store: Callable[[], SqliteConsentStore]) -> None:
    first = open_store()
    first.apply_settings(snap(1))
    first.apply_settings(snap(2, features={"voice_recognition": True}))
    first.close()
    second = open_store()
    try:
        assert by_vin(second)[VIN].snapshot == snap(2, features={"voice_recognition": True})
        assert [s.revision for s in second.history(VIN)] == [1, 2]
        second.apply_settings(snap(3))
        assert by_vin(second)[VIN].snapshot.revision == 3
    finally:
        second.close()


def test_visible_to_another_connection_without_close(
    path: Path, sqlite_store: SqliteConsentStore
) -> None:
    store = sqlite_store
    # Committed on return: a second reader (e.g. after a crash) sees it.
    store.apply_settings(snap(7))
    other = sqlite3.connect(path)
    try:
        (revision,) = other.execute(
            "SELECT revision FROM vehicle_settings WHERE vin=?", (VIN,)
        ).fetchone()
    finally:
        other.close()
    assert revision == 7


def test_wal_and_synchronous_full(sqlite_store: SqliteConsentStore) -> None:
    db = sqlite_store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_wal_mode_is_persistent_in_the_file(path: Path, sqlite_store: SqliteConsentStore) -> None:
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_schema_version_recorded(store: SqliteConsentStore) -> None:
    from gateway.store.postgres import POSTGRES_SCHEMA_VERSION, PostgresConsentStore

    # PostgreSQL skips SQLite's own steps (the egress journal): a previous
    # release sharing the database keeps opening it.
    expected = (
        POSTGRES_SCHEMA_VERSION if isinstance(store, PostgresConsentStore) else SCHEMA_VERSION
    )
    assert store.meta("schema_version") == str(expected)
    assert POSTGRES_SCHEMA_VERSION == 12 and SCHEMA_VERSION == 13


def test_newer_schema_is_refused(path: Path) -> None:
    SqliteConsentStore(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(RuntimeError, match="newer gateway"):
        SqliteConsentStore(path)


def test_in_state_dir(tmp_path: Path) -> None:
    s = SqliteConsentStore.in_state_dir(tmp_path / "deep" / "dir")
    try:
        s.apply_settings(snap(1))
    finally:
        s.close()
    assert (tmp_path / "deep" / "dir" / SqliteConsentStore.FILENAME).is_file()


def test_largest_revision_round_trips(store: SqliteConsentStore) -> None:
    store.apply_settings(snap(MAX_REVISION))
    assert by_vin(store)[VIN].snapshot.revision == MAX_REVISION


def policy(version: str, text: str = "") -> tuple[StoredPolicy, AuditRecord]:
    yaml = text or f"version: {version}"
    digest = hashlib.sha256(yaml.encode()).hexdigest()
    record = StoredPolicy(version, digest, yaml, "key-1", 1.0, 1.0, True)
    return record, AuditRecord("ops", "policy_pushed", version, {"version": version}, 1.0)


def test_policy_versions_only_move_forward_and_name_one_text(
    store: SqliteConsentStore,
) -> None:
    store.save_policy(*policy("2026.11.2"))
    store.save_policy(*policy("2027.1.2"))
    store.activate_policy("2026.11.2", 2.0, policy("2026.11.2")[1])

    def unchanged() -> None:
        assert [(p.version, p.active) for p in store.policies()] == [
            ("2026.11.2", True),
            ("2027.1.2", False),
        ]
        assert store.policies()[1].yaml == "version: 2027.1.2"
        assert len(store.audit_entries()) == 3

    refused = [
        ("2027.1.1", "", "not newer than 2027.1.2"),  # newer than the active one only
        ("2027.1.2", "", "pushed before"),  # replay of a rolled-back version
        ("2027.1.2", "other text", "different text"),
        ("2027.01.2", "other text", "different text"),  # the same number, spelled otherwise
        ("2026.11.2", "", "already active"),
    ]
    for version, text, words in refused:
        with pytest.raises(VersionConflict, match=words):
            store.save_policy(*policy(version, text))
        unchanged()
    with pytest.raises(VersionConflict, match="already active"):
        store.activate_policy("2026.11.2", 3.0, policy("2026.11.2")[1])
    with pytest.raises(KeyError):
        store.activate_policy("2027.9.9", 3.0, policy("2027.9.9")[1])
    unchanged()
    store.save_policy(*policy("2027.1.3"))
    assert store.active_policy() == policy("2027.1.3")[0]


def test_policy_version_check_reads_the_database(
    open_store: Callable[[], SqliteConsentStore], store: SqliteConsentStore
) -> None:
    """Another connection (another process, another instance) sees what this one stored."""
    other = open_store()
    try:
        store.save_policy(*policy("2027.2.1"))
        with pytest.raises(VersionConflict, match="not newer"):
            other.save_policy(*policy("2027.1.9"))
    finally:
        other.close()
    assert [p.version for p in store.policies()] == ["2027.2.1"]


# ---------------------------------------------------------- location anchors


def test_anchors_survive_reopen(open_store: Callable[[], SqliteConsentStore]) -> None:
    first = open_store()
    first.save_anchors({VIN: LocationAnchor(1_800_000_000.0, 48.1, 11.5, 12_345.6)})
    first.save_anchors({OTHER: LocationAnchor(1_800_000_100.0, 52.5, 13.4)})
    first.close()
    second = open_store()
    try:
        assert dict(second.load_anchors()) == {
            VIN: LocationAnchor(1_800_000_000.0, 48.1, 11.5, 12_345.6),
            OTHER: LocationAnchor(1_800_000_100.0, 52.5, 13.4, None),
        }
        assert second.holds_vehicle_data()
    finally:
        second.close()


def test_anchor_never_moves_back_in_time(store: SqliteConsentStore) -> None:
    store.save_anchors({VIN: LocationAnchor(2000.0, 1.0, 1.0)})
    store.save_anchors({VIN: LocationAnchor(1000.0, 2.0, 2.0)})  # a stale write
    assert dict(store.load_anchors()) == {VIN: LocationAnchor(2000.0, 1.0, 1.0)}
    store.save_anchors({VIN: LocationAnchor(3000.0, 3.0, 3.0, 7.0)})
    assert dict(store.load_anchors()) == {VIN: LocationAnchor(3000.0, 3.0, 3.0, 7.0)}


def test_anchor_erased_with_the_car(store: SqliteConsentStore) -> None:
    store.apply_settings(snap(1))
    store.save_anchors({VIN: LocationAnchor(1.0, 1.0, 1.0), OTHER: LocationAnchor(1.0, 2.0, 2.0)})
    record = AuditRecord(actor="op", action="erasure", subject="s", content={}, at=2.0)
    removed = store.erase_vehicle(VIN, "s", record)
    assert removed["location_anchors"] == 1
    assert dict(store.load_anchors()) == {OTHER: LocationAnchor(1.0, 2.0, 2.0)}


def test_state_dir_of_the_previous_release_opens(tmp_path: Path) -> None:
    """A consent store written by the release before location anchors
    (schema 3) opens: settings and counts kept, anchors table added."""
    path = tmp_path / SqliteConsentStore.FILENAME
    path.write_bytes((Path(__file__).parent / "data" / "consent-schema3.sqlite3").read_bytes())
    store = SqliteConsentStore(path)
    car = subject(KEY, VIN)
    try:
        store.attach_key(KEY, functools.partial(subject, KEY))
        (vehicle,) = store.load_all()
        assert vehicle.snapshot.vin == car and vehicle.snapshot.revision == 3
        assert [c.count for c in store.egress_counts(car)] == [7]
        assert list(store.load_anchors()) == []
        store.save_anchors({car: LocationAnchor(1.0, 48.1, 11.5)})
        row = store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert row == (str(SCHEMA_VERSION),)
        assert store.verify_audit().ok
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert dict(reopened.load_anchors()) == {car: LocationAnchor(1.0, 48.1, 11.5)}
    finally:
        reopened.close()


def _vin_bytes_in(path: Path) -> list[str]:
    """Every file of the store (database, WAL, shared memory) holding a VIN of
    the fixture, in any of the forms the file could carry it."""
    found = []
    for file in path.parent.glob(path.name + "*"):
        data = file.read_bytes()
        for vin in (VIN, OTHER_VIN):
            if vin.encode() in data or vin.encode("utf-16-le") in data:
                found.append(f"{file.name}: {vin}")
    return found


def test_schema_7_store_is_rekeyed_and_keeps_no_vin(tmp_path: Path) -> None:
    """A store written by the release before schema 8 (VINs in clear in six
    tables, the audit content and an access-log path): opened with the key,
    every car is named by its subject, the audit chain still verifies (VINs
    removed from the content, recorded as such) and no byte of any store
    file holds a VIN (rewritten, WAL truncated)."""
    path = tmp_path / SqliteConsentStore.FILENAME
    path.write_bytes((Path(__file__).parent / "data" / "consent-schema7.sqlite3").read_bytes())
    store = SqliteConsentStore(path)
    try:
        assert store.meta("schema_version") == "7"  # needs the key to go on
        assert _vin_bytes_in(path)  # the fixture holds VINs in clear
        changed = store.attach_key(KEY, functools.partial(subject, KEY))
        assert changed >= 8
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        car, other = subject(KEY, VIN), subject(KEY, OTHER_VIN)
        assert {v.snapshot.vin for v in store.load_all()} == {car, other}
        assert [s.revision for s in store.history(car)] == [3]
        assert store.restriction(car) is not None and store.restricted_vins() == {car}
        assert [c.count for c in store.egress_counts(car)] == [7]
        assert dict(store.load_anchors()) == {car: LocationAnchor(1200.0, 48.1, 11.5)}
        assert set(store.find_my_car_commands()) == {car}
        assert [row[4] for row in store.access_log()] == [f"/v1/vehicles/{car}/export"]
        result = store.verify_audit()
        assert result.ok and result.redacted == 3, result
        assert all("vin" not in (e["content"] or {}) for e in store.audit_entries())
        # New entries hash their content with a key; erasing a redacted entry's
        # content keeps the ledger verifiable.
        store.append_audit(AuditRecord("dpo", "export", car, {"n": 1}, 2000.0))
        head = store._db.execute("SELECT content_hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        assert str(head.fetchone()[0]).startswith("hmac:")
        store.erase_vehicle(car, car, AuditRecord("dpo", "erasure", car, {}, 2100.0))
        assert store.verify_audit().ok
    finally:
        store.close()
    assert _vin_bytes_in(path) == []
    # Opened again: nothing left to migrate.
    again = SqliteConsentStore(path)
    try:
        assert again.attach_key(KEY, functools.partial(subject, KEY)) == 0
        assert again.verify_audit().ok
    finally:
        again.close()


def test_a_crash_before_the_rewrite_is_finished_at_the_next_open(tmp_path: Path) -> None:
    """Re-keyed and committed, then killed before VACUUM: freed pages may
    still hold VINs, so the next open rewrites the file."""
    path = tmp_path / SqliteConsentStore.FILENAME
    path.write_bytes((Path(__file__).parent / "data" / "consent-schema7.sqlite3").read_bytes())
    store = SqliteConsentStore(path)
    store._ledger_key = b"k" * 32
    store._rekey(functools.partial(subject, KEY))  # the crash comes right after
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert store.meta("vacuum_pending") == "1"  # recorded with the re-keying
    store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert reopened.attach_key(KEY, functools.partial(subject, KEY)) == 0
        assert reopened.meta("schema_version") == str(SCHEMA_VERSION)
        assert reopened.meta("vacuum_pending") is None  # the file was rewritten
    finally:
        reopened.close()
    assert _vin_bytes_in(path) == []


def test_redacted_ledger_entries_still_show_tampering(tmp_path: Path) -> None:
    path = tmp_path / SqliteConsentStore.FILENAME
    path.write_bytes((Path(__file__).parent / "data" / "consent-schema7.sqlite3").read_bytes())
    store = SqliteConsentStore(path)
    try:
        store.attach_key(KEY, functools.partial(subject, KEY))
        redacted = store._db.execute(
            "SELECT seq FROM audit_log WHERE redacted_hash IS NOT NULL ORDER BY seq"
        ).fetchone()[0]
        store._db.execute(
            "UPDATE audit_log SET content='{\"revision\":9}' WHERE seq=?", (redacted,)
        )
        assert f"entry {redacted}: content was modified" in store.verify_audit().problems
        # Moving the mark along with the content is caught by the chained digest.
        store._db.execute(
            "UPDATE audit_log SET redacted_hash=? WHERE seq=?",
            (hashlib.sha256(b'{"revision":9}').hexdigest(), redacted),
        )
        assert not store.verify_audit().ok
    finally:
        store.close()


def test_a_vin_guess_cannot_confirm_a_keyed_ledger_entry(tmp_path: Path) -> None:
    """Erased content leaves only its hash; with a plain hash, a VIN (or
    subject) and a guess of the few settings fields would confirm it."""
    store = SqliteConsentStore(tmp_path / "s.sqlite3")
    try:
        store.attach_key(KEY, functools.partial(subject, KEY))
        content = {"revision": 3, "privacy_mode": False}
        store.append_audit(AuditRecord("vehicle", "settings_applied", "s", content, 1.0))
        (stored,) = store._db.execute("SELECT content_hash FROM audit_log").fetchone()
        guess = json.dumps(content, sort_keys=True, separators=(",", ":"))
        assert stored != hashlib.sha256(guess.encode()).hexdigest()
        assert stored.startswith("hmac:") and store.verify_audit().ok
    finally:
        store.close()


def test_restriction_periods_are_history_rows_of_their_own(store: SqliteConsentStore) -> None:
    """Set and lifted, a restriction is two settings_history rows (what the
    capture-time check needs), not part of the car's settings history."""
    store.apply_settings(snap(1))
    store.set_restriction(VIN, True, AuditRecord("dpo", "restriction_set", "s", {}, 10.0))
    store.set_restriction(VIN, False, AuditRecord("dpo", "restriction_lifted", "s", {}, 20.0))
    assert [s.revision for s in store.history(VIN)] == [1]
    rows = [r for r in store.capture_history() if r.snapshot.vin == VIN]
    assert [(r.snapshot.source, r.snapshot.privacy_mode, r.snapshot.applied_at) for r in rows][
        1:
    ] == [("restriction", True, 10.0), ("restriction_lifted", False, 20.0)]
    # A restriction is never folded into by a car over its settings rate.
    store.set_restriction(VIN, True, AuditRecord("dpo", "restriction_set", "s", {}, 30.0))
    store.apply_settings(snap(2), merge=True)
    rows = [r for r in store.capture_history() if r.snapshot.vin == VIN]
    assert [(r.snapshot.source, r.snapshot.revision) for r in rows][-2:] == [
        ("restriction", 1),
        ("vehicle", 2),
    ]


def test_parked_messages_are_bounded_oldest_first_and_erased_with_the_car(
    store: SqliteConsentStore,
) -> None:
    from gateway.store import ParkedMessage

    def park(subject: str, size: int, per_subject: int = 250, total: int = 10_000) -> list[int]:
        row = ParkedMessage(subject, 2, 1.0, 100.0, "tbox/status", size, b"x" * size)
        return [e[0] for e in store.park(row, per_subject, total).evicted]

    assert park("a", 100) == []
    assert park("a", 100) == []
    assert park("b", 100) == []
    assert park("a", 100) == [1]  # car a over 250 bytes: its oldest goes
    assert [p.id for p in store.parked("a")] == [2, 4]
    assert park("c", 100, total=350) == [2]  # all cars over 350: the oldest of all goes
    assert store.parked_stats() == (3, 300, {"a", "b", "c"})
    assert [p.id for p in store.parked("a", up_to_revision=1)] == []
    assert store.expired_parked(100.0) == [
        (3, "tbox/status", 100),
        (4, "tbox/status", 100),
        (5, "tbox/status", 100),
    ]
    removed = store.erase_vehicle(VIN, "a", AuditRecord("dpo", "erasure", "a", {}, 5.0))
    assert removed["parked"] == 1
    assert store.parked_stats() == (2, 200, {"b", "c"})


def test_what_the_gateway_holds_is_bounded_by_the_declared_retention(
    store: SqliteConsentStore,
) -> None:
    """Issue 14, item 7: counts per stream past that stream's retention, settings
    history past the longest retention (each car keeps its newest row) and audit
    content past it (the chain stays verifiable) leave the store."""
    from gateway.store import EgressCount

    day = 86_400.0
    car = "0123456789abcdef" * 2  # a subject
    store.apply_settings(
        snap(1, applied_at=10 * day), AuditRecord("v", "a", car, {"r": 1}, 10 * day)
    )
    store.append_audit(AuditRecord("ops", "policy_pushed", "2026.11.2", {"d": 1}, 11 * day))
    store.apply_settings(
        snap(2, applied_at=500 * day), AuditRecord("v", "a", car, {"r": 2}, 500 * day)
    )
    store.add_egress_counts(
        [
            EgressCount(VIN, "1970-01-02", "tbox/status", "remote_control", "p", 5),
            EgressCount(VIN, "1971-05-01", "tbox/status", "remote_control", "p", 6),
            EgressCount(VIN, "1970-01-02", "tbox/trip", "energy_consumption", "p", 7),
        ]
    )
    removed = store.purge_retention(
        counts_before={"tbox/status": "1971-01-01", "tbox/trip": "1969-01-01"},
        history_before=400 * day,
        audit_content_before=400 * day,
    )
    assert removed == {"egress_counts": 1, "settings_history": 1, "audit_content": 1}
    assert sorted(c.count for c in store.egress_counts(VIN)) == [6, 7]
    assert [h.revision for h in store.history(VIN)] == [2]
    contents = [e["content"] for e in store.audit_entries()]
    assert contents == [None, {"d": 1}, {"r": 2}]  # policy entries are not a car's
    assert store.verify_audit().ok
    # A car's newest settings row stays, however old.
    assert store.purge_retention({}, 10_000 * day, 0.0)["settings_history"] == 0
    assert [h.revision for h in store.history(VIN)] == [2]
