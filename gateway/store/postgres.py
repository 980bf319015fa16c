"""ConsentStore on PostgreSQL, for several gateway instances sharing one state.

The store logic is SqliteConsentStore's: its SQL is written to run on both
(upserts with ON CONFLICT, RETURNING, table-qualified SET expressions), and
the few SQLite-only forms are translated here (placeholders, PRAGMA
table_info, GLOB, BEGIN IMMEDIATE). One logic in one place: a change to the
store is made once and the same test suite runs against both backends.

Write transactions take one advisory lock, so writers on every instance are
serialised like SQLite's single writer: the audit ledger's hash chain gets
one next entry at a time, and a transaction sees the rows the one before it
committed. A lost connection is reopened on the next call; the failing call
raises, and the service retries it holding its pipeline (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg

from gateway.store.base import Changes
from gateway.store.sqlite import (
    _SCHEMA,
    HISTORY_LIMIT,
    SCHEMA_VERSION,
    SQLITE_ONLY_STEPS,
    SqliteConsentStore,
    StoreError,
)

# The schema a PostgreSQL database is at: SQLite's, less its own steps.
POSTGRES_SCHEMA_VERSION = max(v for v in range(1, SCHEMA_VERSION + 1) if v not in SQLITE_ONLY_STEPS)

T = TypeVar("T")
log = logging.getLogger("gateway.store")
# pg_advisory_xact_lock key of the store's write transactions ("gw" "cs").
WRITE_LOCK = 0x6777_6373
# Session locks ("gw" "in"): a gateway without a shared group holds
# (INSTANCE_LOCK, 0) exclusively, so it is the one deciding with this database;
# gateways of a shared group hold it shared, plus (INSTANCE_LOCK, hash of their
# instance id) exclusively: their lease, so that no two processes run as one
# instance (they would take each other's MQTT sessions over). Held by the
# connection: a crashed instance's lease ends with it.
INSTANCE_LOCK = 0x6777_696E
# Session lock of the one instance that sweeps orphaned parked messages
# ("gw" "sw"); another takes it over when that one's connection ends.
SWEEP_LOCK = 0x6777_7377
# Rows of the change log kept for instances that fell behind (seconds); one
# further behind reloads everything.
CHANGES_KEPT_S = 600.0
# More changes than this since an instance last looked: it reloads everything.
CHANGES_BATCH_MAX = 10_000
# Tables whose rows decide messages, and the column naming the car. A trigger
# logs every change to them (instances reload what others changed before they
# decide: contract rule 21 across instances); the trigger takes the write lock
# first, so log positions are handed out in commit order and an instance that
# has read up to position N has seen every change committed before it.
_LOGGED_TABLES = {
    "vehicle_settings": "vin",
    "settings_history": "vin",
    "restrictions": "vin",
    "objections": "subject",
    "vehicle_identity": "subject",
    "location_anchors": "vin",
    "find_my_car_commands": "vin",
    "parked": "subject",
    "policies": "",
}
_CHANGE_LOG_SQL = f"""
CREATE TABLE IF NOT EXISTS changes (
    seq BIGSERIAL PRIMARY KEY,
    tbl TEXT NOT NULL,
    subject TEXT NOT NULL,
    origin TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);
CREATE OR REPLACE FUNCTION gateway_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock({0x6777_6373});
    IF TG_OP = 'DELETE' THEN r := to_jsonb(OLD); ELSE r := to_jsonb(NEW); END IF;
    INSERT INTO changes (tbl, subject, origin) VALUES (
        TG_TABLE_NAME, coalesce(r ->> TG_ARGV[0], ''), current_setting('application_name'));
    RETURN NULL;
END $$;
""" + "".join(
    f"CREATE OR REPLACE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table}"
    f" FOR EACH ROW EXECUTE FUNCTION gateway_log_change('{column}');\n"
    for table, column in _LOGGED_TABLES.items()
)
_PLACEHOLDER = re.compile(r"\?")
_TABLE_INFO = re.compile(r"^PRAGMA table_info\((\w+)\)$")
_HEX_ONLY = re.compile(r"(\w+) NOT GLOB '\*\[\^0-9a-f\]\*'")


def schema_sql(sqlite_schema: str = _SCHEMA) -> str:
    """The SQLite schema in PostgreSQL's types: 64-bit integers, doubles, bytea."""
    sql = sqlite_schema.replace("WITHOUT ROWID", "")
    sql = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGSERIAL PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    return re.sub(r"\bBLOB\b", "BYTEA", sql)


def translate(sql: str, has_params: bool) -> str:
    """One statement of the SQLite store in PostgreSQL's dialect."""
    stripped = sql.strip()
    info = _TABLE_INFO.match(stripped)
    if info:
        return (
            "SELECT ordinal_position, column_name FROM information_schema.columns"
            f" WHERE table_schema = current_schema() AND table_name = '{info.group(1)}'"
            " ORDER BY ordinal_position"
        )
    if stripped.upper().startswith("ALTER TABLE"):
        sql = schema_sql(sql)
    sql = _HEX_ONLY.sub(r"\1 !~ '[^0-9a-f]'", sql)
    if has_params:
        sql = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
    return sql


def redact_url(url: str) -> str:
    """A database URL fit for a message: no password, in the authority or the query."""
    url = re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


def _param(value: object) -> object:
    # SQLite stores flags as integers; a bool would be a boolean to PostgreSQL.
    return int(value) if isinstance(value, bool) else value


class _Cursor:
    """What the store reads of a cursor: rows, rowcount."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._cursor.description is None:
            return None
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._cursor.description is None:
            return []
        return self._cursor.fetchall()

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        if self._cursor.description is None:
            return []
        return self._cursor.fetchmany(size)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class _Connection:
    """The sqlite3.Connection surface the store uses, on a psycopg connection
    in autocommit mode (transactions are the store's explicit BEGIN/COMMIT)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        self.exclusive = False  # hold the instance locks on every connection
        self.instance: str | None = None  # instance id in a shared group
        self.claimed = False  # the instance locks were ours once
        # Names this process's writes in the change log (its own are skipped).
        self.origin = f"privacy-gateway/{secrets.token_hex(8)}"
        self._sweeper: psycopg.Connection[Any] | None = None  # holds SWEEP_LOCK

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=10, application_name=self.origin
            )
            if self.exclusive:
                problem = self._claim(conn)
                if problem is not None:
                    conn.close()
                    if self.claimed:
                        # Lost with a dropped connection, and taken meanwhile:
                        # deciding on would be two deciders without a shared
                        # view. Stop (fail closed); a supervisor restarts us.
                        log.critical("%s while our connection was down: stopping", problem)
                        os.kill(os.getpid(), signal.SIGTERM)
                    raise StoreError(problem)
                self.claimed = True
            self._conn = conn
        return self._conn

    def sweep_lease(self) -> bool:
        conn = self._connection()
        if self._sweeper is not conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (SWEEP_LOCK,)).fetchone()
            if not row or not row[0]:
                return False
            self._sweeper = conn  # lost with this connection, taken again by the next call
        return True

    def _claim(self, conn: psycopg.Connection[Any]) -> str | None:
        """Take this instance's locks; what stands in the way, if anything."""
        if self.instance is None:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s::int, 0)", (INSTANCE_LOCK,)
            ).fetchone()
            if not row or not row[0]:
                return (
                    "another gateway is deciding with this database (give every instance"
                    " the same vehicle_broker.shared_group to run several)"
                )
            return None
        row = conn.execute(
            "SELECT pg_try_advisory_lock_shared(%s::int, 0)", (INSTANCE_LOCK,)
        ).fetchone()
        if not row or not row[0]:
            return "a gateway without a shared group is deciding with this database"
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s::int, hashtext(%s))", (INSTANCE_LOCK, self.instance)
        ).fetchone()
        if not row or not row[0]:
            return f"another process runs as instance {self.instance!r} on this database"
        return None

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Cursor:
        conn = self._connection()
        try:
            if sql.strip().upper() == "BEGIN IMMEDIATE":
                conn.execute("BEGIN")
                try:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                except psycopg.Error:
                    # Never leave the connection in an aborted transaction.
                    self._rollback(conn)
                    raise
                return _Cursor(conn.cursor())
            cursor = conn.execute(
                cast(Any, translate(sql, bool(params))),
                [_param(p) for p in params] if params else None,
            )
        except psycopg.Error:
            if conn.broken or conn.closed:
                self.close()  # reopened on the next call
            raise
        return _Cursor(cursor)

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            self.close()

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> _Cursor:
        conn = self._connection()
        with conn.cursor() as cursor:
            cursor.executemany(
                cast(Any, translate(sql, True)), [[_param(p) for p in row] for row in rows]
            )
            return _Cursor(cursor)

    def executescript(self, script: str) -> None:
        self._connection().execute(cast(Any, script))

    def close(self) -> None:
        if self._conn is not None:
            try:
                if self.exclusive and not self._conn.closed and not self._conn.broken:
                    # The server drops a session's locks when its backend
                    # exits, which is after the disconnect and, on a busy
                    # server, after a successor's claim: a restarted gateway
                    # would be refused as "another gateway". Released here,
                    # they are gone when close returns.
                    with contextlib.suppress(psycopg.Error):  # gone with it, as before
                        self._conn.execute("SELECT pg_advisory_unlock_all()")
                self._conn.close()
            finally:
                self._conn = None


class _Location(str):
    """A database URL where the SQLite store names its file."""

    @property
    def name(self) -> str:
        return self


class PostgresConsentStore(SqliteConsentStore):
    """ConsentStore on PostgreSQL (`[store] url = "postgresql://..."`)."""

    def __init__(
        self,
        url: str,
        history_limit: int = HISTORY_LIMIT,
        *,
        exclusive: bool = False,
        instance: str | None = None,
    ) -> None:
        """`exclusive`: decide with this database, claimed before anything is
        written (a refused one migrates nothing): alone, or with `instance` as
        one instance of a shared group (its id: a lease no other process gets)."""
        # `path` names the store in messages: the URL without its password.
        self.path = cast(Path, _Location(redact_url(url)))
        self.history_limit = max(2, history_limit)
        self._lock = threading.RLock()
        self._keyed_step_pending = False
        self._ledger_key: bytes | None = None
        # Counts straight into the table: a journal's waiting counts would be
        # each instance's own, and an older instance would erase without it.
        self._egress = None
        self._pg = _Connection(url)
        self._pg.exclusive = exclusive
        self._pg.instance = instance
        self._db = cast(Any, self._pg)
        try:
            with self._lock:
                self._pg.execute("BEGIN IMMEDIATE")
                try:
                    self._pg.executescript(schema_sql())
                    self._pg.executescript(_CHANGE_LOG_SQL)
                    self._migrate()
                    if instance is not None:
                        self._pg.execute(
                            "INSERT INTO instances VALUES (?,?,?) ON CONFLICT(id) DO UPDATE"
                            " SET origin=excluded.origin, started_at=excluded.started_at",
                            (instance, self._pg.origin, time.time()),
                        )
                    self._pg.execute("COMMIT")
                except BaseException:
                    self._pg.execute("ROLLBACK")
                    raise
        except psycopg.Error as exc:
            self._pg.close()
            raise StoreError(f"consent store {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        row = self._pg.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._pg.execute(
                "INSERT INTO meta VALUES ('schema_version', ?)", (str(POSTGRES_SCHEMA_VERSION),)
            )
            return
        version = int(row[0])
        if version > POSTGRES_SCHEMA_VERSION:
            raise StoreError(
                f"consent store {self.path} was written by a newer gateway "
                f"(schema {version} > {POSTGRES_SCHEMA_VERSION}); run that version"
            )
        from gateway.store.sqlite import MIGRATIONS

        for target in range(version + 1, POSTGRES_SCHEMA_VERSION + 1):
            if target in SQLITE_ONLY_STEPS:
                continue
            for statement in MIGRATIONS.get(target, ()):
                if not self._adds_existing_column(statement):
                    self._pg.execute(statement)
            self._pg.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(target),))

    def _write(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            self._pg.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
                self._pg.execute("COMMIT")
                return result
            except BaseException:
                try:
                    self._pg.execute("ROLLBACK")
                except psycopg.Error:
                    self._pg.close()  # the connection is gone: so is the transaction
                raise

    def _changed_since(self, db: Any, table: str, subject: str, seq: int) -> bool:
        """True also when the log no longer reaches back to `seq` (unknown: changed)."""
        row = db.execute(
            "SELECT EXISTS (SELECT 1 FROM changes WHERE seq > ? AND tbl=? AND subject=?"
            " AND origin <> ?), (SELECT value FROM meta WHERE key='changes_pruned_through')",
            (seq, table, subject, self._pg.origin),
        ).fetchone()
        return row is None or bool(row[0]) or int(row[1] or 0) > seq

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (REPEATABLE READ): a car's
        settings, identity and restriction as of one moment."""
        with self._lock:
            self._pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield
            finally:
                try:
                    self._pg.execute("COMMIT")
                except psycopg.Error:
                    self._pg.close()  # the transaction went with the connection

    def sweep_lease(self) -> bool:
        """Whether this instance is the one sweeping orphaned parked messages
        (a session lock: held while its connection lives)."""
        with self._lock:
            return self._pg.sweep_lease()

    def change_position(self) -> int:
        """The change log's newest position: what a start loads includes it."""
        row = self._read(
            "SELECT coalesce(max(seq), 0), (SELECT value FROM meta"
            " WHERE key='changes_pruned_through') FROM changes"
        )[0]
        return max(int(row[0]), int(row[1] or 0))

    def changes_since(self, seq: int) -> Changes:
        """One round trip: other processes' changes after `seq`, and whether
        the log was pruned past it."""
        rows = self._read(
            "SELECT seq, tbl, subject FROM changes WHERE seq > ? AND origin <> ?"
            " UNION ALL SELECT -1, 'pruned', value FROM meta WHERE key='changes_pruned_through'"
            " UNION ALL SELECT max(seq), 'position', '' FROM changes WHERE seq > ?"
            f" ORDER BY 1 LIMIT {CHANGES_BATCH_MAX + 2}",
            (seq, self._pg.origin, seq),
        )
        position, policy, resync = seq, False, len(rows) > CHANGES_BATCH_MAX
        states: set[str] = set()
        anchors: set[str] = set()
        for at, table, subject in rows:
            if table == "pruned":
                resync = resync or int(subject) > seq
            elif table == "position":
                position = max(position, int(at or seq))
            elif table == "policies":
                policy = True
            elif table == "location_anchors":
                anchors.add(str(subject))
            elif table != "parked":  # parked rows are looked up when settings apply
                states.add(str(subject))
        return Changes(position, frozenset(states), frozenset(anchors), policy, resync)

    def prune_changes(self, kept_s: float = CHANGES_KEPT_S) -> int:
        """Forget change-log rows older than `kept_s` on the database's clock
        (the one that stamped them; an instance may run on another); an
        instance that had not read them reloads everything instead."""

        def tx(db: Any) -> int:
            row = db.execute(
                "SELECT max(seq) FROM changes WHERE at < extract(epoch FROM clock_timestamp()) - ?",
                (kept_s,),
            ).fetchone()
            if row is None or row[0] is None:
                return 0
            through = int(row[0])
            db.execute(
                "INSERT INTO meta VALUES ('changes_pruned_through', ?) ON CONFLICT(key)"
                " DO UPDATE SET value=excluded.value",
                (str(through),),
            )
            return int(db.execute("DELETE FROM changes WHERE seq <= ?", (through,)).rowcount)

        return self._write(tx)

    def close(self) -> None:
        with self._lock:
            self._pg.close()
