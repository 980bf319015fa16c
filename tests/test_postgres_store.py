"""The consent store on PostgreSQL (issue 12, item 1), on a private server the
test starts and real Mosquitto: the gateway keeps and enforces consent across
a restart, instances on one database see each other's writes, concurrent
writers keep the audit chain whole, and the configuration selects it. The
store suite itself runs on both backends (tests/test_store.py)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.control.audit import AuditRecord
from gateway.core.identity import subject
from gateway.statedir import open_state
from gateway.store.postgres import PostgresConsentStore, translate
from sim.broker import MosquittoBroker
from sim.postgres import PrivatePostgres
from telematics.v1 import streams_pb2

from .conftest import KEY, VIN, Car, Clients, GatewayHarness, gateway_config
from .test_store import snap

pytestmark = pytest.mark.integration


def test_sqlite_forms_are_translated() -> None:
    assert translate("SELECT a FROM t WHERE b=? AND c LIKE 'x%'", True) == (
        "SELECT a FROM t WHERE b=%s AND c LIKE 'x%%'"
    )
    assert "!~ '[^0-9a-f]'" in translate("WHERE subject NOT GLOB '*[^0-9a-f]*'", False)
    assert "information_schema.columns" in translate("PRAGMA table_info(audit_log)", False)
    assert "BIGINT" in translate("ALTER TABLE t ADD COLUMN n INTEGER NOT NULL DEFAULT 0", False)


async def test_the_gateway_enforces_consent_from_postgresql_across_a_restart(
    postgres: PrivatePostgres, broker: MosquittoBroker, clients: Clients, tmp_path: Path
) -> None:
    harness = GatewayHarness(
        broker.url, broker.url, tmp_path / "state", store_url=postgres.new_database()
    )
    car = clients.car
    service = await harness.start()
    try:
        await car.settings(1, features={"remote_control": True})
        await car.send("tbox/status", _status(car))
        await car.barrier()
        await clients.backend.wait_for(lambda: len(clients.backend.on("/tbox/status")) == 1)
        await car.settings(2, features={"remote_control": False})
    finally:
        await harness.stop(service)
    service = await harness.start()  # a new process on the same database
    try:
        assert service.state_of(VIN) is not None
        await car.send("tbox/status", _status(car))
        await car.send("tbox/ecall", car.header(streams_pb2.ECall()))
        await car.barrier()
        await clients.backend.wait_for(lambda: bool(clients.backend.on("/tbox/ecall")))
        assert len(clients.backend.on("/tbox/status")) == 1  # the toggle held
        assert [s.revision for s in service.store.history(service.audit_subject(VIN))] == [1, 2]
        assert service.store.verify_audit().ok
    finally:
        await harness.stop(service)


def _status(car: Car) -> streams_pb2.VehicleStatus:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0)
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    car.header(msg)
    return msg


def test_instances_on_one_database_see_each_others_writes(postgres: PrivatePostgres) -> None:
    url = postgres.new_database()
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        a.apply_settings(snap(4))
        assert {v.snapshot.vin: v.snapshot.revision for v in b.load_all()} == {VIN: 4}
        b.apply_settings(snap(3))  # older: never overwrites
        b.apply_settings(snap(5))
        assert [v.snapshot.revision for v in a.load_all()] == [5]
    finally:
        a.close()
        b.close()


def test_concurrent_writers_keep_the_audit_chain_whole(postgres: PrivatePostgres) -> None:
    """Writers on several instances are serialised: every entry links to the
    one before it, none is lost, the chain verifies."""
    url = postgres.new_database()
    stores = [PostgresConsentStore(url) for _ in range(4)]
    for store in stores:
        store.attach_key(KEY, functools.partial(subject, KEY))

    def write(store: PostgresConsentStore, n: int) -> None:
        for i in range(25):
            store.append_audit(AuditRecord(f"writer-{n}", "test_entry", f"s{i}", {"i": i}, i))

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        entries = stores[0].audit_entries()
        assert len(entries) == 100
        result = stores[0].verify_audit()
        assert result.ok, result
    finally:
        for store in stores:
            store.close()


def test_configuration_selects_postgresql(postgres: PrivatePostgres, tmp_path: Path) -> None:
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path / "state")
    config.store = StoreConfig(url=postgres.new_database())
    state = open_state(config)
    try:
        assert isinstance(state.store, PostgresConsentStore)
        assert config.key_path.is_file()  # the key stays in the state directory
        assert not (tmp_path / "state" / "consent.sqlite3").exists()
    finally:
        state.store.close()
        state.state_dir.unlock()


def test_a_bad_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="url"):
        StoreConfig(url="mysql://x")


def test_a_second_gateway_on_one_database_is_refused(
    postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """Until instances share their consent state, a second one would decide
    with settings it never re-reads: refused, saying why."""
    from gateway.statedir import StateDirError

    url = postgres.new_database()
    configs = []
    for name in ("a", "b"):
        config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path / name)
        config.store = StoreConfig(url=url)
        configs.append(config)
    first = open_state(configs[0])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pseudonym.key").write_bytes(configs[0].key_path.read_bytes())
    try:
        with pytest.raises(StateDirError, match="another gateway is deciding"):
            open_state(configs[1])
    finally:
        first.store.close()
        first.state_dir.unlock()
    second = open_state(configs[1])  # the first is gone: its lock with it
    second.store.close()
    second.state_dir.unlock()


async def test_a_lost_database_connection_holds_the_pipeline_and_loses_nothing(
    postgres: PrivatePostgres, broker: MosquittoBroker, clients: Clients, tmp_path: Path
) -> None:
    """The server drops the gateway's connection (a failover, a restart): the
    settings that arrive meanwhile are applied once the store reconnects, and
    nothing is decided on what was not stored (fail closed)."""
    import psycopg

    url = postgres.new_database()
    harness = GatewayHarness(broker.url, broker.url, tmp_path / "state", store_url=url)
    service = await harness.start()
    car = clients.car
    try:
        await car.settings(1, features={"remote_control": False})
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.rsplit("/", 1)[1],),
            ).fetchone()
        assert dropped is not None and dropped[0] >= 1
        await car.settings(2, features={"remote_control": True})  # waits for PrivacyApplied
        await car.send("tbox/status", _status(car))
        await car.barrier()
        await clients.backend.wait_for(lambda: len(clients.backend.on("/tbox/status")) == 1)
        assert [s.revision for s in service.store.history(service.audit_subject(VIN))] == [1, 2]
    finally:
        await harness.stop(service)


def test_a_failed_write_lock_leaves_the_store_usable(postgres: PrivatePostgres) -> None:
    """The write lock cannot be had (another writer holds it past our lock
    timeout): that write fails, the connection is not left in an aborted
    transaction, the next write works."""
    import psycopg

    from gateway.store.postgres import WRITE_LOCK

    url = postgres.new_database()
    store = PostgresConsentStore(url)
    holder = psycopg.connect(url, autocommit=True)
    try:
        store._pg._connection().execute("SET lock_timeout = '200ms'")
        holder.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK,))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            store.apply_settings(snap(1))
        holder.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))
        store.apply_settings(snap(2))
        assert [v.snapshot.revision for v in store.load_all()] == [2]
    finally:
        holder.close()
        store.close()


def test_no_password_in_the_url_or_in_messages() -> None:
    from gateway.store.postgres import redact_url

    with pytest.raises(ValueError, match="password file"):
        StoreConfig(url="postgresql://gw@db/x?password=hunter2")
    assert "hunter2" not in redact_url("postgresql://gw:hunter2@db/x")
    assert "hunter2" not in redact_url("postgresql://gw@db/x?sslmode=require&password=hunter2")
