"""Contract rule 17 state is durable: find-my-car commands (the hourly cap,
spent fixes) survive a restart, are erased with the car, and a store written
before they existed opens and works."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.control.audit import AuditRecord
from gateway.core import FindMyCarCommand
from gateway.core.identity import subject
from gateway.store import SqliteConsentStore
from gateway.store.sqlite import SCHEMA_VERSION

from .test_store import OTHER, VIN, by_vin, snap

T0 = 1_800_000_000.0
COMMANDS = (
    FindMyCarCommand("req-1", T0, T0 + 120, 1),
    FindMyCarCommand("", T0 + 300, T0 + 420, 0),
    FindMyCarCommand("req-1", T0 + 301, T0 + 421, 0),  # a request id may repeat
)


KEY = bytes(range(32))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / SqliteConsentStore.FILENAME


@pytest.fixture
def store(open_store: Callable[[], SqliteConsentStore]) -> Iterator[SqliteConsentStore]:
    """On each backend (SQLite, PostgreSQL)."""
    s = open_store()
    yield s
    s.close()


def test_commands_round_trip_and_survive_reopen(
    open_store: Callable[[], SqliteConsentStore], store: SqliteConsentStore
) -> None:
    store.apply_settings(snap(1))
    store.apply_settings(snap(1, vin=OTHER))
    assert store.find_my_car_commands() == {}
    store.save_find_my_car(VIN, COMMANDS, T0 + 421)
    assert store.find_my_car_commands() == {VIN: COMMANDS}
    assert by_vin(store)[VIN].window_until == T0 + 421
    assert by_vin(store)[OTHER].window_until == 0.0
    store.close()
    reopened = open_store()
    try:
        assert reopened.find_my_car_commands() == {VIN: COMMANDS}
        # A save replaces the car's list (a spent fix, an expired command).
        reopened.save_find_my_car(VIN, COMMANDS[1:], T0 + 421)
        assert reopened.find_my_car_commands() == {VIN: COMMANDS[1:]}
        reopened.save_find_my_car(VIN, (), 0.0)
        assert reopened.find_my_car_commands() == {}
    finally:
        reopened.close()


def test_commands_are_erased_with_the_car(store: SqliteConsentStore) -> None:
    store.apply_settings(snap(1))
    store.save_find_my_car(VIN, COMMANDS, T0 + 421)
    record = AuditRecord(actor="op", action="erasure", subject="s", content={}, at=T0)
    removed = store.erase_vehicle(VIN, "s", record)
    assert removed["find_my_car_commands"] == len(COMMANDS)
    assert store.find_my_car_commands() == {}


def test_commands_count_as_vehicle_data(store: SqliteConsentStore) -> None:
    assert not store.holds_vehicle_data()
    store.save_find_my_car(VIN, COMMANDS, T0 + 421)
    assert store.holds_vehicle_data()


def make_schema_3_store(path: Path) -> None:
    """A store as the gateway before rule 17 wrote it (schema 3: no
    find_my_car_commands table), holding a car with an open window."""
    store = SqliteConsentStore(path)
    store.apply_settings(snap(1))
    store.open_window(VIN, T0 + 120)
    store.close()
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TABLE find_my_car_commands")
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
        db.commit()
    finally:
        db.close()


def test_store_of_schema_3_opens_and_works(path: Path) -> None:
    make_schema_3_store(path)
    store = SqliteConsentStore(path)
    try:
        store.attach_key(KEY, functools.partial(subject, KEY))  # schema 8: cars by subject
        car = subject(KEY, VIN)
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        assert by_vin(store)[car].window_until == T0 + 120
        assert store.find_my_car_commands() == {}
        store.save_find_my_car(car, COMMANDS, T0 + 421)
        assert store.find_my_car_commands() == {car: COMMANDS}
    finally:
        store.close()


def test_store_of_schema_4_without_this_table_opens(path: Path) -> None:
    # Version 4 is another change's (a table of its own): whatever it holds,
    # migrating to 5 only needs find_my_car_commands, created when missing.
    make_schema_3_store(path)
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE unrelated_v4 (x INTEGER)")
        db.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
        db.commit()
    finally:
        db.close()
    store = SqliteConsentStore(path)
    try:
        store.attach_key(KEY, functools.partial(subject, KEY))
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        store.save_find_my_car(subject(KEY, VIN), COMMANDS, T0 + 421)
        assert store.find_my_car_commands() == {subject(KEY, VIN): COMMANDS}
    finally:
        store.close()
