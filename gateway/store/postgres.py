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

import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg

from gateway.store.sqlite import (
    _SCHEMA,
    HISTORY_LIMIT,
    SCHEMA_VERSION,
    SqliteConsentStore,
    StoreError,
)

T = TypeVar("T")
log = logging.getLogger("gateway.store")
# pg_advisory_xact_lock key of the store's write transactions ("gw" "cs").
WRITE_LOCK = 0x6777_6373
# Session lock of the one gateway deciding with this database ("gw" "in"):
# until instances share their consent caches (issue 12), a second one would
# decide on settings it never re-reads.
INSTANCE_LOCK = 0x6777_696E
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
        self.exclusive = False  # hold INSTANCE_LOCK on every connection
        self.claimed = False  # INSTANCE_LOCK was ours once

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            if self.exclusive:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (INSTANCE_LOCK,)).fetchone()
                if not row or not row[0]:
                    conn.close()
                    if self.claimed:
                        # Lost with a dropped connection, and taken meanwhile:
                        # deciding on would be two instances with their own
                        # caches. Stop (fail closed); a supervisor restarts us.
                        log.critical(
                            "another gateway instance took this database while our"
                            " connection was down: stopping"
                        )
                        os.kill(os.getpid(), signal.SIGTERM)
                    raise StoreError(
                        "another gateway instance is deciding with this database; one"
                        " instance per database until instances share their consent state"
                    )
                self.claimed = True
            self._conn = conn
        return self._conn

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
        self, url: str, history_limit: int = HISTORY_LIMIT, *, exclusive: bool = False
    ) -> None:
        """`exclusive`: be the one gateway deciding with this database, claimed
        before anything is written (a refused second one migrates nothing)."""
        # `path` names the store in messages: the URL without its password.
        self.path = cast(Path, _Location(redact_url(url)))
        self.history_limit = max(2, history_limit)
        self._lock = threading.Lock()
        self._keyed_step_pending = False
        self._ledger_key: bytes | None = None
        self._pg = _Connection(url)
        self._pg.exclusive = exclusive
        self._db = cast(Any, self._pg)
        try:
            with self._lock:
                self._pg.execute("BEGIN IMMEDIATE")
                try:
                    self._pg.executescript(schema_sql())
                    self._migrate()
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
                "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"consent store {self.path} was written by a newer gateway "
                f"(schema {version} > {SCHEMA_VERSION}); run that version"
            )
        from gateway.store.sqlite import MIGRATIONS

        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(target, ()):
                if not self._adds_existing_column(statement):
                    self._pg.execute(statement)
            self._pg.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(target),)
            )

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

    def close(self) -> None:
        with self._lock:
            self._pg.close()
