"""Egress counts through the SQLite store's journal (gateway/store/egress_journal.py):
durable when written, each counted exactly once through folds, reopens and
compactions, gone with an erasure or past retention, bounded in memory; on a
real SQLite file, and PostgreSQL left writing its rows straight."""

from __future__ import annotations

import functools
import json
import random
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.control.audit import AuditRecord
from gateway.core.identity import subject
from gateway.store import ConsentStore, EgressCount, SqliteConsentStore, egress_journal
from gateway.store.egress_journal import FOLD_AFTER_S
from gateway.store.sqlite import SCHEMA_VERSION

CARS = [f"{i:032x}" for i in range(1, 41)]  # subjects, as the store names cars
DAY = "2026-12-05"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def count(car: str, n: int = 1, day: str = DAY, stream: str = "tbox/status") -> EgressCount:
    return EgressCount(car, day, stream, "remote_control", "2026.1", n)


def table_rows(path: Path) -> Counter[tuple[str, ...]]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT vin, day, stream, feature, policy_version, count FROM egress_counts"
        )
        return Counter({tuple(r[:5]): int(r[5]) for r in rows})
    finally:
        db.close()


def journal_net(path: Path) -> tuple[int, Counter[tuple[str, ...]], int]:
    """(rows in effect, what they add up to, counts in them)"""
    db = sqlite3.connect(path)
    try:
        meta = db.execute("SELECT value FROM meta WHERE key='egress_checkpoint'").fetchone()
        b = int(meta[0]) if meta else 0
        rows = [
            json.loads(t)
            for (t,) in db.execute(
                "SELECT counts FROM egress_journal"
                " WHERE (cycle = 0 AND seq > ?) OR (cycle = ? AND ? > 0)",
                (b, b, b),
            )
        ]
    finally:
        db.close()
    net: Counter[tuple[str, ...]] = Counter()
    for row in rows:
        for *key, n in row:
            net[tuple(key)] += n
    return len(rows), +net, sum(len(row) for row in rows)  # +net: zero entries dropped


def all_rows(path: Path) -> list[list[list[object]]]:
    """Every journal row, in effect or not."""
    db = sqlite3.connect(path)
    try:
        return [json.loads(t) for (t,) in db.execute("SELECT counts FROM egress_journal")]
    finally:
        db.close()


def totals(store: SqliteConsentStore, cars: list[str] = CARS) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for car in cars:
        for c in store.egress_counts(car):
            out[tuple(c[:5])] += c.count
    return out


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / SqliteConsentStore.FILENAME


def test_a_count_is_durable_when_written_and_folded_once_it_has_waited(path: Path) -> None:
    clock = Clock()
    store = SqliteConsentStore(path, clock=clock)
    try:
        store.add_egress_counts([count(CARS[0], 2), count(CARS[1])])
        # In the journal, not yet in the car's row; readers see it all the same.
        assert table_rows(path) == Counter()
        assert journal_net(path)[1] == Counter(
            {
                (CARS[0], DAY, "tbox/status", "remote_control", "2026.1"): 2,
                (CARS[1], DAY, "tbox/status", "remote_control", "2026.1"): 1,
            }
        )
        assert [c.count for c in store.egress_counts(CARS[0])] == [2]
        # Data about a vehicle, for the key checks at a start (keyed subjects).
        assert store.holds_vehicle_data()
        # A reopen (what a crash leaves: the journal) reads it back.
        with_reopen = SqliteConsentStore(path, clock=clock)
        assert [c.count for c in with_reopen.egress_counts(CARS[0])] == [2]
        with_reopen.close()
        clock.now = FOLD_AFTER_S - 1
        store.add_egress_counts([count(CARS[0], 3)])
        assert table_rows(path) == Counter()  # not waited long enough
        clock.now = FOLD_AFTER_S + 0.5
        store.add_egress_counts([count(CARS[2])])
        # The cars whose counts began waiting long enough ago are in their rows
        # (all of a car's counts of the day at once); the newest car's waits on.
        key = (CARS[0], DAY, "tbox/status", "remote_control", "2026.1")
        assert table_rows(path) == Counter({key: 5, (CARS[1], *key[1:]): 1})
        assert journal_net(path)[1] == Counter({(CARS[2], *key[1:]): 1})
        assert [c.count for c in store.egress_counts(CARS[0])] == [5]
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert [c.count for c in reopened.egress_counts(CARS[0])] == [5]  # never twice
        assert [c.count for c in reopened.egress_counts(CARS[1])] == [1]
    finally:
        reopened.close()


@pytest.mark.parametrize("seed", range(6))
def test_every_count_is_counted_once_through_folds_reopens_and_compactions(
    path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint after 7 rows (seeds 0, 1) or 30 counts in them (seeds 2, 3).
    by_rows = seed < 2
    monkeypatch.setattr(egress_journal, "CHECKPOINT_AFTER_ROWS", 7 if by_rows else 10**6)
    monkeypatch.setattr(egress_journal, "CHECKPOINT_MIN_COUNTS", 10**6 if by_rows else 30)
    monkeypatch.setattr(egress_journal, "CHECKPOINT_RATIO", 1)
    monkeypatch.setattr(egress_journal, "FOLD_AT_LEAST", 5)
    # A checkpoint takes several commits, and so does deleting the rows it
    # replaced: restarts fall in the middle of both.
    monkeypatch.setattr(egress_journal, "CHECKPOINT_CHUNK", 16)
    monkeypatch.setattr(egress_journal, "DEAD_ROWS_PER_COMMIT", 3)
    if seed >= 4:  # fewer keys may wait than arrive: the rest go straight to their rows
        monkeypatch.setattr(egress_journal, "MAX_PENDING", 15)
    rng, clock = random.Random(seed), Clock()
    expected: Counter[tuple[str, ...]] = Counter()
    store = SqliteConsentStore(path, clock=clock)
    try:
        for step in range(300):
            clock.now += rng.choice((0.0, 0.5, 3.0, 12.0))
            batch = [
                count(rng.choice(CARS), rng.randint(1, 3), day=rng.choice((DAY, "2026-12-06")))
                for _ in range(rng.randint(1, 12))
            ]
            store.add_egress_counts(batch)
            for c in batch:
                expected[tuple(c[:5])] += c.count
            if rng.random() < 0.05:  # a restart: the journal read back
                store.close()
                store = SqliteConsentStore(path, clock=clock)
            if step % 25 == 0:
                rows, net, entries = journal_net(path)
                # At most 80 keys (40 cars, 2 days) wait: a checkpoint takes at
                # most 5 commits after the dead rows are gone (a few commits).
                if by_rows:
                    assert rows <= 25
                else:
                    assert entries <= 80 + 30 + 24 * 12
                assert len(all_rows(path)) <= 60  # dead ones included
                assert table_rows(path) + net == expected
                assert totals(store) == expected
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert totals(reopened) == expected
    finally:
        reopened.close()


def test_what_waits_is_bounded(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress_journal, "MAX_PENDING", 30)
    store = SqliteConsentStore(path, clock=Clock())  # the clock stands still: nothing is due
    try:
        cars = [f"{i:032x}" for i in range(200)]
        for i in range(0, 200, 10):
            store.add_egress_counts([count(car) for car in cars[i : i + 10]])
        assert len(journal_net(path)[1]) <= 40  # at most the cap and one commit
        assert sum(table_rows(path).values()) >= 160  # the oldest were folded
        assert totals(store, cars) == Counter({tuple(count(c)[:5]): 1 for c in cars})
    finally:
        store.close()


def test_an_erasure_leaves_no_journal_row_naming_the_car(path: Path) -> None:
    clock = Clock()
    store = SqliteConsentStore(path, clock=clock)
    erased, kept = CARS[0], CARS[1]
    try:
        store.add_egress_counts([count(erased, 4), count(kept)])
        clock.now = FOLD_AFTER_S + 1
        store.add_egress_counts([count(erased, 2), count(kept, 5)])  # folds the first two
        db = sqlite3.connect(path)
        assert any(erased in t for (t,) in db.execute("SELECT counts FROM egress_journal"))
        removed = store.erase_vehicle(
            erased, erased, AuditRecord("dpo", "erasure", erased, {}, 9.0)
        )
        # One count key, in its row and still waiting: reported once.
        assert removed["egress_counts"] == 1
        assert not any(erased in t for (t,) in db.execute("SELECT counts FROM egress_journal"))
        db.close()
        assert store.egress_counts(erased) == []
        assert [c.count for c in store.egress_counts(kept)] == [6]
        clock.now += FOLD_AFTER_S + 1
        store.add_egress_counts([count(kept)])  # folds what waited: nothing of the erased car
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert reopened.egress_counts(erased) == []
        assert [c.count for c in reopened.egress_counts(kept)] == [7]
        assert erased not in {k[0] for k in table_rows(path)}
    finally:
        reopened.close()


def test_retention_takes_waiting_counts_past_their_day_too(path: Path) -> None:
    store = SqliteConsentStore(path, clock=Clock())
    try:
        store.add_egress_counts(
            [
                count(CARS[0], 3, day="2026-01-01"),
                count(CARS[0], 4),
                count(CARS[0], 5, stream="tbox/trip", day="2026-01-01"),
            ]
        )
        removed = store.purge_retention({"tbox/status": "2026-06-01"}, 0.0, 0.0)
        assert removed["egress_counts"] == 1
        assert sorted((c.day, c.stream, c.count) for c in store.egress_counts(CARS[0])) == [
            ("2026-01-01", "tbox/trip", 5),
            (DAY, "tbox/status", 4),
        ]
        db = sqlite3.connect(path)
        assert not any(
            '2026-01-01","tbox/status' in t
            for (t,) in db.execute("SELECT counts FROM egress_journal")
        )
        db.close()
    finally:
        store.close()


def test_a_store_the_previous_release_wrote_keeps_its_counts(tmp_path: Path) -> None:
    """Schema 12 (counts in their rows, no journal) opens as 13 and counts on."""
    path = tmp_path / SqliteConsentStore.FILENAME
    shutil.copy(Path(__file__).parent / "data" / "consent-schema12.sqlite3", path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("12",)
    db.close()
    key = bytes(range(32))
    car = subject(key, "WDB00000000000001")
    store = SqliteConsentStore(path)
    try:
        store.attach_key(key, functools.partial(subject, key))
        assert store.meta("schema_version") == str(SCHEMA_VERSION) == "13"
        assert [(c.day, c.count) for c in store.egress_counts(car)] == [
            ("2026-12-01", 7),
            ("2026-12-02", 3),
        ]
        store.add_egress_counts(
            [EgressCount(car, "2026-12-02", "tbox/status", "remote_control", "2026.1", 1)]
        )
        assert [(c.day, c.count) for c in store.egress_counts(car)] == [
            ("2026-12-01", 7),
            ("2026-12-02", 4),
        ]
    finally:
        store.close()


def test_postgresql_writes_counts_straight_into_their_rows(
    open_store: Callable[[], ConsentStore], request: pytest.FixtureRequest
) -> None:
    """Instances of a shared group each hold their own waiting counts, and an
    older one would erase without the journal: PostgreSQL keeps no journal,
    and stays at the schema a previous release sharing it can open."""
    store = open_store()
    try:
        store.add_egress_counts([count(CARS[0], 2)])
        read = store._read  # type: ignore[attr-defined]
        in_rows = bool(read("SELECT 1 FROM egress_counts LIMIT 1"))
        tables = read(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name='egress_journal'"
            if "postgresql" in request.node.callspec.id
            else "SELECT COUNT(*) FROM sqlite_master WHERE name='egress_journal'"
        )[0][0]
        version = store.meta("schema_version")  # type: ignore[attr-defined]
    finally:
        store.close()
    if "postgresql" in request.node.callspec.id:
        assert in_rows and tables == 0 and version == "12"
    else:
        assert not in_rows and tables == 1 and version == "13"


def test_a_failed_upkeep_neither_fails_the_write_nor_loses_a_count(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The counts are committed before the upkeep: raising then would make
    the caller write them again (counted twice). A failing one is not tried
    at every commit, and is said once."""
    monkeypatch.setattr(egress_journal, "CHECKPOINT_AFTER_ROWS", 20)
    attempts = 0
    upkeep = egress_journal.EgressJournal.upkeep

    def failing(self: egress_journal.EgressJournal, db: sqlite3.Connection) -> object:
        nonlocal attempts
        attempts += 1
        if attempts <= 3:
            raise sqlite3.OperationalError("database or disk is full")
        return upkeep(self, db)

    monkeypatch.setattr(egress_journal.EgressJournal, "upkeep", failing)
    store = SqliteConsentStore(path, clock=Clock())
    try:
        for n in range(1, 31):  # a row per commit: due from the 21st on
            store.add_egress_counts([count(CARS[0], n)])
        assert 3 < attempts < 10  # 21, 23, 25 failed; then every commit while under way
        assert caplog.text.count("egress journal upkeep failed") == 1
        assert journal_net(path)[0] <= 10  # a checkpoint went through
        assert [c.count for c in store.egress_counts(CARS[0])] == [465]
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert [c.count for c in reopened.egress_counts(CARS[0])] == [465]
    finally:
        reopened.close()


def test_no_journal_row_is_larger_than_a_commit_or_a_checkpoint_chunk(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint writes what waits a chunk per commit, and its dead rows
    go a few per commit: no commit waits for all of it (the stall that made
    an earlier journal fold 5 s of counts at once)."""
    monkeypatch.setattr(egress_journal, "CHECKPOINT_AFTER_ROWS", 5)
    monkeypatch.setattr(egress_journal, "CHECKPOINT_CHUNK", 25)
    monkeypatch.setattr(egress_journal, "DEAD_ROWS_PER_COMMIT", 4)
    cars = [f"{i:032x}" for i in range(400)]
    store = SqliteConsentStore(path, clock=Clock())  # nothing is folded: 400 wait
    try:
        for i in range(0, 400, 10):
            store.add_egress_counts([count(car) for car in cars[i : i + 10]])
        sizes = [len(row) for row in all_rows(path)]
        assert max(sizes) <= 25
        assert len(sizes) < 40  # checkpoints put in effect, dead rows deleted
        assert totals(store, cars) == Counter({tuple(count(c)[:5]): 1 for c in cars})
    finally:
        store.close()
    reopened = SqliteConsentStore(path)
    try:
        assert totals(reopened, cars) == Counter({tuple(count(c)[:5]): 1 for c in cars})
    finally:
        reopened.close()


def test_an_upkeep_that_fails_otherwise_does_not_fail_the_write_either(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a database error: a MemoryError while copying what waits,
    raised after the counts are committed, would have the caller retry them."""
    monkeypatch.setattr(egress_journal, "CHECKPOINT_AFTER_ROWS", 2)

    def out_of_memory(self: egress_journal.EgressJournal, db: sqlite3.Connection) -> object:
        raise MemoryError

    monkeypatch.setattr(egress_journal.EgressJournal, "upkeep", out_of_memory)
    store = SqliteConsentStore(path, clock=Clock())
    try:
        for n in (1, 2, 3, 4):
            store.add_egress_counts([count(CARS[0], n)])
        assert [c.count for c in store.egress_counts(CARS[0])] == [10]
    finally:
        store.close()


def test_keys_beyond_what_may_wait_cost_one_upsert_each(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many keys per car (a stream each): those that find no room under
    MAX_PENDING go straight into their rows, journaled not at all; the keys
    that wait keep waiting."""
    monkeypatch.setattr(egress_journal, "MAX_PENDING", 10)
    store = SqliteConsentStore(path, clock=Clock())
    try:
        streams = [f"s{i}" for i in range(4)]
        for _ in range(3):
            store.add_egress_counts([count(car, stream=s) for car in CARS[:5] for s in streams])
        _, net, entries = journal_net(path)
        assert len(net) == 10 and set(net.values()) == {3}  # ten keys waited, three counts each
        assert entries == 30  # nothing else was journaled
        assert len(table_rows(path)) == 10 and set(table_rows(path).values()) == {3}
        assert totals(store, CARS[:5]) == Counter(
            {tuple(count(car, stream=s)[:5]): 3 for car in CARS[:5] for s in streams}
        )
    finally:
        store.close()
