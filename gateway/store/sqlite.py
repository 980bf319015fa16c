"""SQLite consent store: one WAL-mode file under the state directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.control import audit
from gateway.control.audit import AuditRecord, VerifyResult
from gateway.core.identity import IdentityRow
from gateway.core.state import (
    FindMyCarCommand,
    LocationAnchor,
    LocationMode,
    SettingsSnapshot,
    strictest,
)
from gateway.delivery import DeadLetter, DeadLetterKind
from gateway.policy import VersionConflict, check_new_version, version_key
from gateway.store.base import (
    Changes,
    EgressCount,
    HistoryRow,
    IncidentHold,
    ParkedMessage,
    ParkResult,
    StoredPolicy,
    StoredVehicle,
)
from gateway.store.egress_journal import UPSERT_COUNTS, EgressJournal

# 1: v1 gateway. 2: dead_letters. 3: settings_history.merged (snapshots
# compacted into one row). 4: parked (messages held for a settings revision not
# applied yet); settings_history rows of restriction periods. 5:
# find_my_car_commands (contract rule 17). 6: location_anchors (contract rule
# 13). 7: vehicle_identity and pending_erasure_events (identity privacy). 8:
# cars named by subject, never the VIN (needs the key: `attach_key`). 9:
# incident_holds (protocol data kept during a security incident). 10:
# vehicle_identity.ownership (a new owner, a new grid offset). 11: objections
# (Art. 21, per car and legitimate-interest feature). 12:
# dead_letters.recipient (streams with several recipients). New
# tables are created by the schema script on every open; their versions only
# record the step.
SCHEMA_VERSION = 13
HISTORY_LIMIT = 1000  # settings history rows per vehicle before the oldest are merged
# How an older store is brought to SCHEMA_VERSION: the statements that produce
# version N, run in one transaction with recording N. A new table needs no
# entry (_SCHEMA creates what is missing); a new column of an existing table
# does (ALTER TABLE, and its index here rather than in _SCHEMA). New `meta`
# keys need none: older code reads only `schema_version` (so `key_fingerprint`
# is not a schema change, and a store stays readable by the previous release).
# What survives an erasure, keyed by the keyed VIN hash (the audit subject),
# never the VIN: the pseudonym epoch, the revision floor and a restriction.
# And app erasure events waiting for their random delay (only a pseudonym).
_IDENTITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS vehicle_identity (
    subject        TEXT PRIMARY KEY,
    epoch          INTEGER NOT NULL,
    revision_floor INTEGER NOT NULL,
    restricted     INTEGER NOT NULL,
    ownership      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_erasure_events (
    id      INTEGER PRIMARY KEY,
    due_at  REAL NOT NULL,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (),  # dead_letters: a new table
    3: ("ALTER TABLE settings_history ADD COLUMN merged INTEGER NOT NULL DEFAULT 0",),
    # parked: a new table. Restriction periods become settings_history rows
    # from the next change on (sources RESTRICTION_SOURCES): a store written
    # before has none, as if every earlier restriction were still unknown.
    4: (),
    5: (),  # find_my_car_commands: a new table
    6: (),  # location_anchors: a new table
    # New tables (also in _SCHEMA); stated here so the step stands on its own.
    7: tuple(s.strip() for s in _IDENTITY_SCHEMA.split(";") if s.strip()),
    # Cars keyed by subject (keyed hash of the VIN), never the VIN, and the
    # audit column `redacted_hash`: needs the key, so `attach_key` runs it
    # (`_rekey`), not the open.
    8: (),
    9: (),  # incident_holds: a new table
    10: ("ALTER TABLE vehicle_identity ADD COLUMN ownership INTEGER NOT NULL DEFAULT 0",),
    11: (),  # objections: a new table
    12: ("ALTER TABLE dead_letters ADD COLUMN recipient TEXT NOT NULL DEFAULT ''",),
    # egress_journal (SQLite only: _SQLITE_SCHEMA): a new table. A version
    # step all the same: the previous release would not see the counts it
    # holds (nor erase them). PostgreSQL stays at 12 (SQLITE_ONLY_STEPS).
    13: (),
}
# Steps a PostgreSQL database does not take (nothing it stores changes): a
# previous release sharing it keeps opening it.
SQLITE_ONLY_STEPS = frozenset({13})
# Counts not yet in egress_counts, one JSON row per commit (SQLite only:
# gateway/store/egress_journal.py). The small columns first: a scan reads
# them without the row's overflow pages.
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS egress_journal (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: rows up to a checkpoint are dead
    cycle     INTEGER NOT NULL,
    first_day TEXT NOT NULL,
    counts    TEXT NOT NULL
);
"""
KEYED_STEP = 8
# settings_history rows that record a restriction being set or lifted (Art. 18)
# rather than settings the car sent: what was allowed from then on, for the
# capture-time check (rule 11). Not part of history() (the car's settings).
RESTRICTION_SOURCES = ("restriction", "restriction_lifted")
# Tables of data about vehicles; with the audit entries about them, what a
# different pseudonymization key would make inconsistent.
_VEHICLE_TABLES = (
    "vehicle_settings",
    "settings_history",
    "restrictions",
    "egress_counts",
    "location_anchors",
    "find_my_car_commands",
)
T = TypeVar("T")
log = logging.getLogger("gateway.store")
# A VIN in an access-log path (access logs of schema < 8 may name one).
_VIN_IN_PATH = re.compile(r"(/vehicles/)([A-HJ-NPR-Z0-9]{17})(?=/|$)", re.IGNORECASE)
MAX_SQLITE_INT = 2**63 - 1
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vehicle_settings (
    vin            TEXT PRIMARY KEY,
    revision       INTEGER NOT NULL,
    privacy_mode   INTEGER NOT NULL,
    location       INTEGER NOT NULL,
    features       TEXT NOT NULL,
    applied_at     REAL NOT NULL,
    policy_version TEXT NOT NULL,
    source         TEXT NOT NULL,
    window_until   REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings_history (
    id             INTEGER PRIMARY KEY,
    vin            TEXT NOT NULL,
    revision       INTEGER NOT NULL,
    privacy_mode   INTEGER NOT NULL,
    location       INTEGER NOT NULL,
    features       TEXT NOT NULL,
    applied_at     REAL NOT NULL,
    policy_version TEXT NOT NULL,
    source         TEXT NOT NULL,
    merged         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS settings_history_vin ON settings_history (vin, revision);
CREATE TABLE IF NOT EXISTS restrictions (
    vin   TEXT PRIMARY KEY,
    since REAL NOT NULL,
    actor TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS policies (
    version    TEXT PRIMARY KEY,
    digest     TEXT NOT NULL,
    yaml       TEXT NOT NULL,
    signer     TEXT NOT NULL,
    pushed_at  REAL NOT NULL,
    applied_at REAL,
    active     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS egress_counts (
    vin            TEXT NOT NULL,
    day            TEXT NOT NULL,
    stream         TEXT NOT NULL,
    feature        TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    count          INTEGER NOT NULL,
    PRIMARY KEY (vin, day, stream, feature, policy_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS access_log (
    at     REAL NOT NULL,
    client TEXT NOT NULL,
    actor  TEXT NOT NULL,
    method TEXT NOT NULL,
    path   TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS access_log_at ON access_log (at);
CREATE TABLE IF NOT EXISTS objections (
    subject TEXT NOT NULL,
    feature TEXT NOT NULL,
    since   REAL NOT NULL,
    actor   TEXT NOT NULL,
    PRIMARY KEY (subject, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS incident_holds (
    id        INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL,
    until     REAL NOT NULL,
    reason    TEXT NOT NULL,
    actor     TEXT NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    subject    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    edge       TEXT NOT NULL,
    stream     TEXT NOT NULL,
    feature    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    code       INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    sealed     BLOB NOT NULL,
    recipient  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS dead_letters_subject ON dead_letters (subject);
CREATE TABLE IF NOT EXISTS location_anchors (
    vin          TEXT PRIMARY KEY,
    refreshed_at REAL NOT NULL,
    latitude     REAL NOT NULL,
    longitude    REAL NOT NULL,
    odometer_km  REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dead_letters_expires ON dead_letters (expires_at);
CREATE TABLE IF NOT EXISTS find_my_car_commands (
    vin         TEXT NOT NULL,
    position    INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    until       REAL NOT NULL,
    fixes       INTEGER NOT NULL,
    PRIMARY KEY (vin, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parked (
    id         INTEGER PRIMARY KEY,
    subject    TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    parked_at  REAL NOT NULL,
    expires_at REAL NOT NULL,
    stream     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sealed     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS parked_subject ON parked (subject, revision);
CREATE INDEX IF NOT EXISTS parked_expires ON parked (expires_at);
"""
    + _IDENTITY_SCHEMA
    + audit.SCHEMA
)


class StoreError(RuntimeError):
    """The consent store cannot be used as it is; the message names the file and why."""


class StoreDamaged(StoreError):
    """The file is not an intact consent store: only a backup brings its content back."""


def _version_order(version: str) -> tuple[int, ...]:
    try:
        return version_key(version)
    except ValueError:  # not a policy version (a store filled by other means)
        return ()


def _newer(version: str, than: str) -> bool:
    try:
        return version_key(version) > version_key(than)
    except ValueError:  # not a policy version (a store filled by other means)
        return False


def _store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if "file is not a database" in text:
        return StoreDamaged(f"consent store {path} is not an SQLite database (overwritten?)")
    if "malformed" in text:
        return StoreDamaged(f"consent store {path} is damaged (truncated or corrupted): {text}")
    if "readonly" in text or "read-only" in text:
        return StoreError(f"consent store {path} is not writable: {text}")
    return StoreError(f"consent store {path}: {text}")


class SqliteConsentStore:
    """ConsentStore on SQLite.

    WAL with synchronous=FULL: a commit is on disk when it returns, so a
    `kill -9` (or power loss) right after never forgets applied settings.
    One connection guarded by a lock: the service calls it from one worker
    thread, the CLI from the main thread.
    """

    FILENAME = "consent.sqlite3"

    def __init__(
        self,
        path: str | Path,
        history_limit: int = HISTORY_LIMIT,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (or create) the store; StoreError when it is damaged or unusable.

        Integrity is checked on every open: a damaged page found later would
        surface as a failed write, and the pipeline holds until writes work.
        `clock`: how long egress counts have waited in the journal (tests and
        benchmarks run it faster).
        """
        self.path = Path(path)
        self.history_limit = max(2, history_limit)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            # Private from the start; SQLite gives -wal and -shm the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._lock = threading.RLock()  # reentrant: reads inside read_snapshot
        self._keyed_step_pending = False
        self._ledger_key: bytes | None = None  # keyed content hashes once attached
        self._egress: EgressJournal | None = EgressJournal(clock)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from exc
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StoreDamaged(
                    f"consent store {self.path} is damaged: integrity check failed: "
                    + "; ".join(problems)
                )
            with self._lock:
                self._db.executescript("BEGIN;" + _SCHEMA + _SQLITE_SCHEMA + "COMMIT;")
                self._migrate()
                if self._egress is not None:
                    self._egress.load(self._db)
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from exc

    def _migrate(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:  # a new store has the current schema
            self._db.execute(
                "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            return
        try:
            version = int(row[0])
        except ValueError:
            raise StoreDamaged(
                f"consent store {self.path} is damaged: schema_version {row[0]!r}"
            ) from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"consent store {self.path} was written by a newer gateway "
                f"(schema {version} > {SCHEMA_VERSION}); run that version"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if target == KEYED_STEP:
                self._keyed_step_pending = True  # attach_key runs it and the rest
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS.get(target, ()):
                    if not self._adds_existing_column(statement):
                        self._db.execute(statement)
                self._db.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(target),)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def use_key_for_verification(self, key: bytes) -> None:
        """Check keyed audit content hashes (read-only tools: no migration)."""
        self._ledger_key = audit.ledger_key(key)

    def attach_key(self, key: bytes, subject_of: Callable[[str], str]) -> int:
        """Use the pseudonymization key from now on: audit content hashes are
        keyed with it, and a store written before schema 8 is re-keyed: every
        VIN becomes its subject (`subject_of`), VINs leave the audit content,
        then the file is rewritten (VACUUM, WAL truncated) so no old page
        holds a VIN. Returns how many rows changed."""
        self._ledger_key = audit.ledger_key(key)
        changed = 0
        with self._lock:
            if self._keyed_step_pending:
                changed = self._rekey(subject_of)  # records `vacuum_pending` with it
                self._keyed_step_pending = False
                self._migrate()  # any later steps
            pending = self._db.execute("SELECT 1 FROM meta WHERE key='vacuum_pending'")
            if pending.fetchone() is not None:
                # Rewrite the file: freed pages still hold the VINs the rows had
                # (also after a crash between the re-keying and this).
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("VACUUM")
                self._db.execute("DELETE FROM meta WHERE key='vacuum_pending'")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def _rekey(self, subject_of: Callable[[str], str]) -> int:
        db = self._db
        db.create_function("car_subject", 1, subject_of, deterministic=True)
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = 0
            columns = {str(r[1]) for r in db.execute("PRAGMA table_info(audit_log)")}
            if "redacted_hash" not in columns:
                db.execute("ALTER TABLE audit_log ADD COLUMN redacted_hash TEXT")
            for table in _VEHICLE_TABLES:
                # Every row of a schema-7 store names its car by VIN.
                changed += db.execute(f"UPDATE {table} SET vin = car_subject(vin)").rowcount
            changed += audit.redact_vins(db, self._ledger_key or b"", time.time())
            rows = db.execute("SELECT rowid, path FROM access_log WHERE path LIKE '%/vehicles/%'")
            for rowid, path in rows.fetchall():
                redacted = _VIN_IN_PATH.sub(lambda m: m[1] + subject_of(m[2]), str(path))
                if redacted != path:
                    db.execute("UPDATE access_log SET path=? WHERE rowid=?", (redacted, rowid))
                    changed += 1
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(KEYED_STEP),))
            db.execute(
                "INSERT INTO meta VALUES ('vacuum_pending', '1')"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value"
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return changed

    def _adds_existing_column(self, statement: str) -> bool:
        """A table created by this release's schema already has the column an
        older step adds (a table that was missing when the store was opened)."""
        match = re.fullmatch(r"ALTER TABLE (\w+) ADD COLUMN (\w+) .*", statement)
        if match is None:
            return False
        columns = {str(r[1]) for r in self._db.execute(f"PRAGMA table_info({match[1]})")}
        return match[2] in columns

    @classmethod
    def in_state_dir(
        cls, state_dir: str | Path, history_limit: int = HISTORY_LIMIT
    ) -> SqliteConsentStore:
        return cls(Path(state_dir) / cls.FILENAME, history_limit)

    # --------------------------------------------------------------------- meta

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO meta VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
        )

    def holds_vehicle_data(self) -> bool:
        """Whether anything about a vehicle was ever written (keyed with the
        pseudonymization key: audit subjects; downstream: pseudonyms)."""
        journal = ("egress_journal",) if self._egress is not None else ()  # SQLite only
        for table in (*_VEHICLE_TABLES, "parked", *journal):
            if self._read(f"SELECT 1 FROM {table} LIMIT 1"):
                return True
        # Policy entries name a version; every other entry names a vehicle.
        return bool(self._read("SELECT 1 FROM audit_log WHERE action NOT LIKE 'policy%' LIMIT 1"))

    # ----------------------------------------------------------------- settings

    def apply_settings(
        self, snapshot: SettingsSnapshot, record: AuditRecord | None = None, merge: bool = False
    ) -> None:
        features = json.dumps(snapshot.features, sort_keys=True, separators=(",", ":"))
        row = (
            snapshot.vin,
            snapshot.revision,
            int(snapshot.privacy_mode),
            int(snapshot.location),
            features,
            snapshot.applied_at,
            snapshot.policy_version,
            snapshot.source,
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                upsert = self._db.execute(
                    "INSERT INTO vehicle_settings (vin, revision, privacy_mode, location, features,"
                    " applied_at, policy_version, source) VALUES (?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(vin) DO UPDATE SET revision=excluded.revision,"
                    " privacy_mode=excluded.privacy_mode, location=excluded.location,"
                    " features=excluded.features, applied_at=excluded.applied_at,"
                    " policy_version=excluded.policy_version, source=excluded.source"
                    " WHERE excluded.revision > vehicle_settings.revision",
                    row,
                )
                # History is the audit trail of applied settings: a snapshot the
                # revision guard refused was never enforced, so it is not recorded.
                if upsert.rowcount > 0:
                    if merge and self._merge_into_latest(snapshot):
                        pass  # a car over its settings rate: folded into its latest row
                    else:
                        self._db.execute(
                            "INSERT INTO settings_history (vin, revision, privacy_mode, location,"
                            " features, applied_at, policy_version, source)"
                            " VALUES (?,?,?,?,?,?,?,?)",
                            row,
                        )
                        if record is not None:
                            audit.append(self._db, record, self._ledger_key)
                        self._compact_history(snapshot.vin)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    _HISTORY_COLUMNS = (
        "id, vin, revision, privacy_mode, location, features, applied_at, policy_version,"
        " source, merged"
    )

    def _merge_into_latest(self, snapshot: SettingsSnapshot) -> bool:
        row = self._db.execute(
            f"SELECT {self._HISTORY_COLUMNS} FROM settings_history WHERE vin=?"
            " ORDER BY id DESC LIMIT 1",
            (snapshot.vin,),
        ).fetchone()
        if row is None or (int(row[9]) == 0 and str(row[8]) in RESTRICTION_SOURCES):
            return False  # a restriction period stays a row of its own
        self._write_merged(int(row[0]), strictest(_snapshot(row[1:]), snapshot), int(row[9]) + 1)
        return True

    def _compact_history(self, vin: str) -> None:
        """Beyond the limit, the two oldest rows of a vehicle become one that allows
        only what both allowed: bounded, and never more permissive than the truth."""
        excess = (
            int(
                self._db.execute(
                    "SELECT count(*) FROM settings_history WHERE vin=?", (vin,)
                ).fetchone()[0]
            )
            - self.history_limit
        )
        for _ in range(max(0, excess)):
            older, newer = self._db.execute(
                f"SELECT {self._HISTORY_COLUMNS} FROM settings_history WHERE vin=?"
                " ORDER BY id LIMIT 2",
                (vin,),
            ).fetchall()
            merged = strictest(_snapshot(older[1:]), _snapshot(newer[1:]))
            self._write_merged(int(newer[0]), merged, int(older[9]) + int(newer[9]) + 1)
            self._db.execute("DELETE FROM settings_history WHERE id=?", (older[0],))

    def _write_merged(self, row_id: int, snapshot: SettingsSnapshot, merged: int) -> None:
        self._db.execute(
            "UPDATE settings_history SET revision=?, privacy_mode=?, location=?, features=?,"
            " applied_at=?, policy_version=?, merged=? WHERE id=?",
            (
                snapshot.revision,
                int(snapshot.privacy_mode),
                int(snapshot.location),
                json.dumps(snapshot.features, sort_keys=True, separators=(",", ":")),
                snapshot.applied_at,
                snapshot.policy_version,
                merged,
                row_id,
            ),
        )

    def open_window(self, vin: str, until: float) -> None:
        with self._lock:
            self._db.execute("UPDATE vehicle_settings SET window_until=? WHERE vin=?", (until, vin))

    def save_find_my_car(
        self,
        vin: str,
        commands: tuple[FindMyCarCommand, ...],
        window_until: float,
        unchanged_since: int | None = None,
    ) -> bool:
        """Replace the car's find-my-car commands (contract rule 17) and its
        window end, in one transaction. With `unchanged_since` (a position of
        a shared store's change log), only if no other instance changed them
        after it (it may have spent a fix): False, nothing written, otherwise."""

        def tx(db: sqlite3.Connection) -> bool:
            if unchanged_since is not None and self._changed_since(
                db, "find_my_car_commands", vin, unchanged_since
            ):
                return False
            db.execute("DELETE FROM find_my_car_commands WHERE vin=?", (vin,))
            db.executemany(
                "INSERT INTO find_my_car_commands VALUES (?,?,?,?,?,?)",
                [
                    (vin, i, c.request_id, c.accepted_at, c.until, c.fixes)
                    for i, c in enumerate(commands)
                ],
            )
            db.execute(
                "UPDATE vehicle_settings SET window_until=? WHERE vin=?", (window_until, vin)
            )
            return True

        return self._write(tx)

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a read transaction; inside a
        transaction already open on this connection, that one)."""
        with self._lock:
            began = not self._db.in_transaction
            if began:
                self._db.execute("BEGIN")
            try:
                yield
            finally:
                if began and self._db.in_transaction:
                    self._db.execute("COMMIT")

    def sweep_lease(self) -> bool:
        """Whether this instance sweeps orphaned parked messages (a store no
        other instance shares: always)."""
        return True

    def applied_parked(self, applied_before: float) -> list[ParkedMessage]:
        """Parked messages whose car has a revision at least theirs applied
        before `applied_before` (held by nobody once that is long enough ago)."""
        return self._parked_rows(
            " WHERE EXISTS (SELECT 1 FROM vehicle_settings v WHERE v.vin = parked.subject"
            " AND v.revision >= parked.revision AND v.applied_at < ?) ORDER BY id",
            (applied_before,),
        )

    def unapplied_parked_ids(self) -> list[int]:
        """Ids of parked messages still waiting for their revision."""
        return [
            int(r[0])
            for r in self._read(
                "SELECT id FROM parked WHERE NOT EXISTS (SELECT 1 FROM vehicle_settings v"
                " WHERE v.vin = parked.subject AND v.revision >= parked.revision)"
            )
        ]

    def _changed_since(self, db: sqlite3.Connection, table: str, subject: str, seq: int) -> bool:
        """Whether another instance changed `subject`'s rows of `table` after
        position `seq` of the change log (an SQLite store has no other instance)."""
        return False

    def find_my_car_commands(
        self, subjects: Collection[str] | None = None
    ) -> dict[str, tuple[FindMyCarCommand, ...]]:
        """Every car's find-my-car commands (or these cars'), oldest first (few cars have any)."""
        found: dict[str, list[FindMyCarCommand]] = {}
        where, params = _one_car("vin", subjects)
        for vin, request_id, accepted_at, until, fixes in self._read(
            "SELECT vin, request_id, accepted_at, until, fixes FROM find_my_car_commands"
            f"{where} ORDER BY vin, position",
            params,
        ):
            found.setdefault(str(vin), []).append(
                FindMyCarCommand(str(request_id), float(accepted_at), float(until), int(fixes))
            )
        return {vin: tuple(commands) for vin, commands in found.items()}

    def load_all(self, subjects: Collection[str] | None = None) -> Iterator[StoredVehicle]:
        """Stream every vehicle in batches.

        A fleet has few distinct feature maps (hundreds for a million cars):
        each distinct JSON text is decoded once and the dict shared, read-only.
        Fetching everything at once and decoding per row left ~600 B per
        vehicle of fragmented heap behind after a restart.
        """
        decoded: dict[str, dict[str, bool]] = {}
        with self._lock:
            cursor = self._db.execute(
                "SELECT vin, revision, privacy_mode, location, features, applied_at,"
                " policy_version, source, window_until FROM vehicle_settings"
                + _one_car("vin", subjects)[0],
                _one_car("vin", subjects)[1],
            )
            while rows := cursor.fetchmany(10_000):
                for row in rows:
                    text = str(row[4])
                    features = decoded.get(text)
                    if features is None:
                        features = decoded[text] = json.loads(text)
                    yield StoredVehicle(_snapshot(row, features), float(row[8]))

    def history(self, vin: str) -> list[SettingsSnapshot]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vin, revision, privacy_mode, location, features, applied_at,"
                " policy_version, source FROM settings_history WHERE vin=?"
                " AND NOT (merged=0 AND source IN (?,?)) ORDER BY id",
                (vin, *RESTRICTION_SOURCES),
            ).fetchall()
        return [_snapshot(r) for r in rows]

    def capture_history(
        self, subjects: Collection[str] | None = None, *, mirrors: bool = True
    ) -> Iterator[HistoryRow]:
        """Every history row (restriction periods included), by vehicle, oldest
        first (or these cars'); without the cars whose history only mirrors
        their settings when `mirrors` is False (see ConsentStore)."""
        decoded: dict[str, dict[str, bool]] = {}
        where, params = _one_car("vin", subjects)
        if not mirrors:
            where = (where + " AND" if where else " WHERE") + _NOT_A_MIRROR
            params = (*params, *RESTRICTION_SOURCES)
        with self._lock:
            cursor = self._db.execute(
                "SELECT vin, revision, privacy_mode, location, features, applied_at,"
                " policy_version, source, merged FROM settings_history"
                + where
                + " ORDER BY vin, id",
                params,
            )
            while rows := cursor.fetchmany(10_000):
                for row in rows:
                    text = str(row[4])
                    features = decoded.get(text)
                    if features is None:
                        features = decoded[text] = json.loads(text)
                    yield HistoryRow(_snapshot(row, features), int(row[8]))

    def settings_without_history(self, subjects: Collection[str] | None = None) -> set[str]:
        where, params = _one_car("s.vin", subjects)
        return {
            str(row[0])
            for row in self._read(
                "SELECT s.vin FROM vehicle_settings s"
                + (where + " AND" if where else " WHERE")
                + " NOT EXISTS (SELECT 1 FROM settings_history h WHERE h.vin = s.vin)",
                params,
            )
        }

    # ------------------------------------------------------------ transactions

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one IMMEDIATE transaction: all of it is durable, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _write_then_apply(
        self, fn: Callable[[sqlite3.Connection, list[Callable[[], None]]], T]
    ) -> T:
        """`_write(fn)`; what `fn` queues runs once it is committed, under the
        lock: the egress journal changes only with what was committed."""
        after_commit: list[Callable[[], None]] = []
        with self._lock:
            result = self._write(lambda db: fn(db, after_commit))
            for apply in after_commit:
                apply()
            return result

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -------------------------------------------------------------- restriction

    def set_restriction(self, vin: str, restricted: bool, record: AuditRecord) -> bool:
        """Returns whether anything changed."""

        def tx(db: sqlite3.Connection) -> bool:
            if restricted:
                cur = db.execute(
                    "INSERT INTO restrictions VALUES (?,?,?) ON CONFLICT DO NOTHING",
                    (vin, record.at, record.actor),
                )
            else:
                cur = db.execute("DELETE FROM restrictions WHERE vin=?", (vin,))
            if cur.rowcount:
                audit.append(db, record, self._ledger_key)
                self._record_restriction_period(vin, restricted, record.at)
            return cur.rowcount > 0

        return self._write(tx)

    def _record_restriction_period(self, vin: str, restricted: bool, at: float) -> None:
        """A settings_history row for the restriction set (nothing allowed from
        `at`, recorded as privacy mode so compaction stays conservative) or
        lifted (the applied settings again): data captured while restricted
        never passes later (rule 11). Nothing for a car without settings."""
        row = self._db.execute(
            "SELECT vin, revision, privacy_mode, location, features, applied_at,"
            " policy_version, source FROM vehicle_settings WHERE vin=?",
            (vin,),
        ).fetchone()
        if row is None:
            return
        self._db.execute(
            "INSERT INTO settings_history (vin, revision, privacy_mode, location,"
            " features, applied_at, policy_version, source) VALUES (?,?,?,?,?,?,?,?)",
            (
                vin,
                row[1],
                1 if restricted else row[2],
                row[3],
                row[4],
                at,
                row[6],
                RESTRICTION_SOURCES[0 if restricted else 1],
            ),
        )
        self._compact_history(vin)

    def restricted_vins(self, subjects: Collection[str] | None = None) -> set[str]:
        where, params = _one_car("vin", subjects)
        return {str(r[0]) for r in self._read(f"SELECT vin FROM restrictions{where}", params)}

    def restriction(self, vin: str) -> tuple[float, str] | None:
        rows = self._read("SELECT since, actor FROM restrictions WHERE vin=?", (vin,))
        return (float(rows[0][0]), str(rows[0][1])) if rows else None

    # ------------------------------------------------------------------ erasure

    def erase_vehicle(
        self,
        vin: str,
        subject: str,
        record: AuditRecord,
        identity: IdentityRow | None = None,
        events: Sequence[tuple[float, str, bytes]] = (),
        scrub: bool = True,
    ) -> dict[str, int]:
        """Delete what is held about a vehicle; scrub its audit content (chain
        kept) unless `scrub` is false (an ownership change: the trail stays).

        In the same transaction: `identity` (what survives the erasure) is
        stored under `subject`, and `events` (due_at, topic, payload) are
        queued for publication after their delay."""

        journal = self._egress

        def tx(db: sqlite3.Connection, after_commit: list[Callable[[], None]]) -> dict[str, int]:
            if identity is not None:
                survivor = self._survivor(db, vin, subject, identity, scrub)
                db.execute(
                    "INSERT INTO vehicle_identity (subject, epoch, revision_floor,"
                    " restricted, ownership) VALUES (?,?,?,?,?) ON CONFLICT(subject) DO UPDATE"
                    " SET epoch=excluded.epoch, revision_floor=excluded.revision_floor,"
                    " restricted=excluded.restricted, ownership=excluded.ownership",
                    (
                        subject,
                        survivor.epoch,
                        survivor.revision_floor,
                        int(survivor.restricted),
                        survivor.ownership,
                    ),
                )
            db.executemany(
                "INSERT INTO pending_erasure_events (due_at, topic, payload) VALUES (?,?,?)",
                events,
            )
            waiting_only = 0
            if journal is not None:
                # No journal row may keep a count of the car (nor the fact
                # that it had one).
                gone, apply = journal.remove_vehicle(db, vin)
                after_commit.append(apply)
                waiting_only = len(gone) - journal.keys_in_table(db, gone)
            removed = {
                table: db.execute(f"DELETE FROM {table} WHERE vin=?", (vin,)).rowcount
                for table in (
                    "vehicle_settings",
                    "settings_history",
                    "egress_counts",
                    "restrictions",
                    "location_anchors",
                    "find_my_car_commands",
                )
            }
            removed["dead_letters"] = db.execute(
                "DELETE FROM dead_letters WHERE subject=?", (subject,)
            ).rowcount
            removed["parked"] = db.execute(
                "DELETE FROM parked WHERE subject=?", (subject,)
            ).rowcount
            removed["audit_entries_scrubbed"] = audit.scrub_subject(db, subject) if scrub else 0
            if not scrub:  # an ownership change: the objections were the previous owner's
                removed["objections"] = db.execute(
                    "DELETE FROM objections WHERE subject=?", (subject,)
                ).rowcount
            audit.append(db, record, self._ledger_key)
            removed["egress_counts"] += waiting_only  # each count key once
            return removed

        return self._write_then_apply(tx)

    def _survivor(
        self, db: sqlite3.Connection, vin: str, subject: str, identity: IdentityRow, erasure: bool
    ) -> IdentityRow:
        """`identity` never weaker than what is stored (another instance may
        have restricted the car, applied a newer revision or ended an epoch
        since the caller looked): the later epoch and owner, the higher
        revision floor, and (an erasure, not a new owner) a restriction kept."""
        row = db.execute(
            "SELECT epoch, revision_floor, restricted, ownership FROM vehicle_identity"
            " WHERE subject=?",
            (subject,),
        ).fetchone()
        applied = db.execute("SELECT revision FROM vehicle_settings WHERE vin=?", (vin,)).fetchone()
        restricted = db.execute("SELECT 1 FROM restrictions WHERE vin=?", (vin,)).fetchone()
        epoch, floor, ownership = identity.epoch, identity.revision_floor, identity.ownership
        if row is not None:
            epoch = max(epoch, int(row[0]) + 1)
            floor = max(floor, int(row[1]))
            ownership = max(ownership, int(row[3]) + (0 if erasure else 1))
        if applied is not None:
            floor = max(floor, int(applied[0]))
        kept = row is not None and bool(row[2])  # restricted when erased before
        keep = identity.restricted or (erasure and (restricted is not None or kept))
        return IdentityRow(epoch, floor, keep, ownership)

    # ----------------------------------------------------------------- identity

    def identities(self, subjects: Collection[str] | None = None) -> dict[str, IdentityRow]:
        """What survived erasures, by subject (only cars ever erased)."""
        where, params = _one_car("subject", subjects)
        return {
            str(r[0]): IdentityRow(int(r[1]), int(r[2]), bool(r[3]), int(r[4]))
            for r in self._read(
                "SELECT subject, epoch, revision_floor, restricted, ownership FROM vehicle_identity"
                + where,
                params,
            )
        }

    def set_identity_restricted(self, subject: str, restricted: bool) -> bool:
        """Carry a restriction set or lifted later into the surviving row."""
        return self._write(
            lambda db: (
                db.execute(
                    "UPDATE vehicle_identity SET restricted=? WHERE subject=?",
                    (int(restricted), subject),
                ).rowcount
                > 0
            )
        )

    def pending_erasure_events(self) -> list[tuple[int, float, str, bytes]]:
        """(id, due_at, topic, payload), earliest first."""
        return [
            (int(r[0]), float(r[1]), str(r[2]), bytes(r[3]))
            for r in self._read(
                "SELECT id, due_at, topic, payload FROM pending_erasure_events ORDER BY due_at"
            )
        ]

    def delete_pending_erasure_event(self, event_id: int) -> None:
        self._write(
            lambda db: db.execute("DELETE FROM pending_erasure_events WHERE id=?", (event_id,))
        )

    # ----------------------------------------------------------------- policies

    def save_policy(self, policy: StoredPolicy, record: AuditRecord) -> None:
        """Store a pushed policy and make it the active one.

        Refuses (VersionConflict, nothing written) a version not newer than every
        version ever stored, in the transaction that writes: the check and the
        write cannot be separated by another writer.
        """

        def tx(db: sqlite3.Connection) -> None:
            rows = db.execute("SELECT version, digest, active FROM policies").fetchall()
            active = next((str(r[0]) for r in rows if r[2]), None)
            stored = {str(r[0]): str(r[1]) for r in rows}
            check_new_version(policy.version, policy.digest, stored, active)
            db.execute("UPDATE policies SET active=0 WHERE active=1")
            db.execute(
                "INSERT INTO policies (version, digest, yaml, signer, pushed_at, applied_at,"
                " active) VALUES (?,?,?,?,?,?,1)",
                (
                    policy.version,
                    policy.digest,
                    policy.yaml,
                    policy.signer,
                    policy.pushed_at,
                    policy.applied_at,
                ),
            )
            audit.append(db, record, self._ledger_key)

        self._write(tx)

    def activate_policy(self, version: str, applied_at: float, record: AuditRecord) -> None:
        """Re-activate a stored version (KeyError if none; VersionConflict if active)."""

        def tx(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT active FROM policies WHERE version=?", (version,)).fetchone()
            if row is None:
                raise KeyError(version)
            if row[0]:
                raise VersionConflict(f"version {version} is already active")
            db.execute("UPDATE policies SET active=0 WHERE active=1")
            db.execute(
                "UPDATE policies SET active=1, applied_at=? WHERE version=?", (applied_at, version)
            )
            # A consent covers what was in force after it: cars that confirmed a
            # newer version now hold this one (a later re-widening asks them again).
            confirmed = [
                r[0] for r in db.execute("SELECT DISTINCT policy_version FROM vehicle_settings")
            ]
            newer = [v for v in confirmed if _newer(v, version)]
            if newer:
                marks = ",".join("?" * len(newer))
                db.execute(
                    "UPDATE vehicle_settings SET policy_version=?"
                    f" WHERE policy_version IN ({marks})",
                    (version, *newer),
                )
            audit.append(db, record, self._ledger_key)

        self._write(tx)

    def policies(self) -> list[StoredPolicy]:
        rows = self._read(
            "SELECT version, digest, yaml, signer, pushed_at, applied_at, active FROM policies"
            " ORDER BY pushed_at"
        )
        return [
            StoredPolicy(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                float(r[4]),
                float(r[5]) if r[5] is not None else None,
                bool(r[6]),
            )
            # Pushed at the same moment: by version (any backend, same order).
            for r in sorted(rows, key=lambda r: (float(r[4]), _version_order(str(r[0]))))
        ]

    def active_policy(self) -> StoredPolicy | None:
        return next((p for p in self.policies() if p.active), None)

    # --------------------------------------------------------- egress counters

    def add_egress_counts(self, counts: list[EgressCount]) -> None:
        """Durable when this returns: in the journal (SQLite, see
        gateway/store/egress_journal.py) or in the table (PostgreSQL)."""
        if not counts:
            return
        journal = self._egress
        if journal is None:
            self._write(lambda db: db.executemany(UPSERT_COUNTS, counts))  # column order
            return
        with self._lock:  # the journal changes only with what was committed
            self._write(lambda db: journal.append(db, counts))()
            if journal.upkeep_due:
                # The counts are committed: a failed upkeep must not make the
                # caller write them again.
                try:
                    self._write(journal.upkeep)()
                except Exception as exc:  # any: the caller would write the counts again
                    journal.upkeep_failed(exc)

    def egress_counts(self, vin: str) -> list[EgressCount]:
        with self._lock:
            rows = self._read(
                "SELECT vin, day, stream, feature, policy_version, count FROM egress_counts"
                " WHERE vin=?",
                (vin,),
            )
            waiting = self._egress.waiting(vin) if self._egress is not None else []
        totals: dict[tuple[str, str, str, str, str], int] = {}
        for r in (*rows, *waiting):
            key = (str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]))
            totals[key] = totals.get(key, 0) + int(r[5])
        return [EgressCount(*k, n) for k, n in sorted(totals.items(), key=lambda kv: kv[0][1:])]

    # --------------------------------------------------------- location anchors

    def save_anchors(self, anchors: Mapping[str, LocationAnchor]) -> None:
        """Upsert the latest location anchor of each vehicle (one transaction).
        A row never moves back in time: a stale write cannot shorten an interval."""

        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO location_anchors VALUES (?,?,?,?,?) ON CONFLICT(vin) DO UPDATE SET"
                " refreshed_at=excluded.refreshed_at, latitude=excluded.latitude,"
                " longitude=excluded.longitude, odometer_km=excluded.odometer_km"
                " WHERE excluded.refreshed_at >= location_anchors.refreshed_at",
                [
                    (vin, a.refreshed_at, a.latitude, a.longitude, a.odometer_km)
                    for vin, a in anchors.items()
                ],
            )

        if anchors:
            self._write(tx)

    def claim_anchor(
        self, vin: str, previous: float | None, anchor: LocationAnchor
    ) -> LocationAnchor | None:
        """Make `anchor` the car's anchor if the stored one is still the one
        refreshed at `previous` (None: no anchor): the one refresh per interval
        (rule 13) when several instances decide the car's messages. None when
        it is stored; otherwise the anchor another instance stored first."""

        def tx(db: sqlite3.Connection) -> LocationAnchor | None:
            row = db.execute(
                "SELECT refreshed_at, latitude, longitude, odometer_km FROM location_anchors"
                " WHERE vin=?",
                (vin,),
            ).fetchone()
            stored = None if row is None else _anchor(row)
            if stored is not None and (previous is None or stored.refreshed_at > previous):
                return stored
            db.execute(
                "INSERT INTO location_anchors VALUES (?,?,?,?,?) ON CONFLICT(vin) DO UPDATE SET"
                " refreshed_at=excluded.refreshed_at, latitude=excluded.latitude,"
                " longitude=excluded.longitude, odometer_km=excluded.odometer_km",
                (vin, anchor.refreshed_at, anchor.latitude, anchor.longitude, anchor.odometer_km),
            )
            return None

        return self._write(tx)

    def load_anchors(
        self, subjects: Collection[str] | None = None
    ) -> Iterator[tuple[str, LocationAnchor]]:
        """Every vehicle's location anchor (or these cars'), streamed in batches."""
        where, params = _one_car("vin", subjects)
        with self._lock:
            cursor = self._db.execute(
                "SELECT vin, refreshed_at, latitude, longitude, odometer_km FROM location_anchors"
                + where,
                params,
            )
            while rows := cursor.fetchmany(10_000):
                for row in rows:
                    yield str(row[0]), _anchor(row[1:])

    def changes_since(self, seq: int) -> Changes:
        """An SQLite store has one instance (its state directory is locked)."""
        return Changes(seq)

    def change_position(self) -> int:
        return 0

    # ------------------------------------------------------------ dead letters

    def add_dead_letter(self, letter: DeadLetter, max_rows: int) -> tuple[int, int]:
        """Store a dead letter; beyond `max_rows` the oldest are evicted.
        Returns (new id, rows evicted)."""

        def tx(db: sqlite3.Connection) -> tuple[int, int]:
            cur = db.execute(
                "INSERT INTO dead_letters (created_at, expires_at, subject, kind, edge, stream,"
                " feature, reason, code, attempts, size, sealed, recipient)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    letter.created_at,
                    letter.expires_at,
                    letter.subject,
                    letter.kind.value,
                    letter.edge,
                    letter.stream,
                    letter.feature,
                    letter.reason,
                    letter.code,
                    letter.attempts,
                    letter.size,
                    letter.sealed,
                    letter.recipient,
                ),
            )
            new_id = int(cur.fetchone()[0])
            evicted = db.execute(
                "DELETE FROM dead_letters WHERE id <= ("
                " SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (max_rows,),
            ).rowcount
            return new_id, evicted

        return self._write(tx)

    def dead_letters(
        self, ids: list[int] | None = None, after: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        sql = (
            "SELECT id, created_at, expires_at, subject, kind, edge, stream, feature, reason,"
            " code, attempts, size, sealed, recipient FROM dead_letters"
        )
        if ids is not None:
            marks = ",".join("?" * len(ids))
            rows = self._read(f"{sql} WHERE id IN ({marks}) ORDER BY id", tuple(ids))
        else:
            rows = self._read(f"{sql} WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [
            DeadLetter(
                id=int(r[0]),
                created_at=float(r[1]),
                expires_at=float(r[2]),
                subject=str(r[3]),
                kind=DeadLetterKind(r[4]),
                edge=str(r[5]),
                stream=str(r[6]),
                feature=str(r[7]),
                reason=str(r[8]),
                code=int(r[9]),
                attempts=int(r[10]),
                size=int(r[11]),
                sealed=bytes(r[12]),
                recipient=str(r[13]),
            )
            for r in rows
        ]

    def dead_letter_count(self) -> int:
        return int(self._read("SELECT count(*) FROM dead_letters")[0][0])

    def delete_dead_letters(self, ids: list[int] | None) -> int:
        """Delete the given dead letters (all when `ids` is None)."""

        def tx(db: sqlite3.Connection) -> int:
            if ids is None:
                return int(db.execute("DELETE FROM dead_letters").rowcount)
            return sum(
                db.execute("DELETE FROM dead_letters WHERE id=?", (i,)).rowcount for i in ids
            )

        return self._write(tx)

    def purge_dead_letters(self, now: float) -> int:
        """Retention: dead letters are personal data kept no longer than their stream's."""
        return self._write(
            lambda db: int(
                db.execute("DELETE FROM dead_letters WHERE expires_at <= ?", (now,)).rowcount
            )
        )

    # --------------------------------------------------------------- parked

    def park(
        self, message: ParkedMessage, max_bytes_per_subject: int, max_bytes: int
    ) -> ParkResult:
        """Store a message held for its settings revision. Beyond the byte bounds
        (of its car, then of all cars) the oldest are evicted, the new one too
        when it alone is over: never refused, never blocking."""

        def tx(db: sqlite3.Connection) -> ParkResult:
            applied = db.execute(
                "SELECT revision FROM vehicle_settings WHERE vin=?", (message.subject,)
            ).fetchone()
            if applied is not None and int(applied[0]) >= message.revision:
                # Applied meanwhile (by another instance; the same write lock
                # orders both): decide it now, never wait for a revision that came.
                return ParkResult(0, (), applied=True)
            cur = db.execute(
                "INSERT INTO parked (subject, revision, parked_at, expires_at, stream, size,"
                " sealed) VALUES (?,?,?,?,?,?,?) RETURNING id",
                (
                    message.subject,
                    message.revision,
                    message.parked_at,
                    message.expires_at,
                    message.stream,
                    message.size,
                    message.sealed,
                ),
            )
            new_id = int(cur.fetchone()[0])
            evicted: list[tuple[int, str, int]] = []
            for where, params, bound in (
                ("WHERE subject=?", (message.subject,), max_bytes_per_subject),
                ("", (), max_bytes),
            ):
                evicted += [
                    (int(r[0]), str(r[1]), int(r[2]))
                    for r in db.execute(
                        "SELECT id, stream, size FROM (SELECT id, stream, size,"
                        f" sum(size) OVER (ORDER BY id DESC) AS total FROM parked {where}) newest"
                        " WHERE total > ? ORDER BY id",
                        (*params, bound),
                    )
                ]
                db.executemany("DELETE FROM parked WHERE id=?", [(e[0],) for e in evicted])
            return ParkResult(new_id, tuple(evicted))

        return self._write(tx)

    def parked(
        self, subject: str | None = None, up_to_revision: int | None = None
    ) -> list[ParkedMessage]:
        """Parked messages, oldest first: of one car (keyed hash), up to a revision."""
        if subject is None:
            return self._parked_rows(" ORDER BY id")
        return self._parked_rows(
            " WHERE subject=? AND revision<=? ORDER BY id",
            (subject, MAX_SQLITE_INT if up_to_revision is None else up_to_revision),
        )

    def _parked_rows(self, where: str, params: tuple[object, ...] = ()) -> list[ParkedMessage]:
        rows = self._read(
            "SELECT id, subject, revision, parked_at, expires_at, stream, size, sealed FROM parked"
            + where,
            params,
        )
        return [
            ParkedMessage(
                subject=str(r[1]),
                revision=int(r[2]),
                parked_at=float(r[3]),
                expires_at=float(r[4]),
                stream=str(r[5]),
                size=int(r[6]),
                sealed=bytes(r[7]),
                id=int(r[0]),
            )
            for r in rows
        ]

    def delete_parked(self, ids: list[int]) -> int:
        return self._write(
            lambda db: sum(db.execute("DELETE FROM parked WHERE id=?", (i,)).rowcount for i in ids)
        )

    def expired_parked(self, now: float) -> list[tuple[int, str, int]]:
        """(id, stream, size) of parked messages past their maximum wait."""
        rows = self._read(
            "SELECT id, stream, size FROM parked WHERE expires_at <= ? ORDER BY id", (now,)
        )
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def parked_stats(self) -> tuple[int, int, set[str]]:
        """(messages, bytes, subjects) parked."""
        count, size = self._read("SELECT count(*), coalesce(sum(size), 0) FROM parked")[0]
        subjects = {str(r[0]) for r in self._read("SELECT DISTINCT subject FROM parked")}
        return int(count), int(size), subjects

    # ------------------------------------------------------ protocol data, audit

    def log_access(
        self, at: float, client: str, actor: str, method: str, path: str, status: int
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO access_log VALUES (?,?,?,?,?,?)",
                (at, client, actor, method, path, status),
            )

    def purge_access_log(self, older_than: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM access_log WHERE at < ?", (older_than,)).rowcount

    def purge_retention(
        self,
        counts_before: Mapping[str, str],
        history_before: float,
        audit_content_before: float,
    ) -> dict[str, int]:
        journal = self._egress

        def tx(db: sqlite3.Connection, after_commit: list[Callable[[], None]]) -> dict[str, int]:
            waiting_only = 0
            if journal is not None:
                # Counts waiting for their row are recent; the rows that name
                # an older day lose it all the same.
                gone, apply = journal.remove_before(db, counts_before)
                after_commit.append(apply)
                waiting_only = len(gone) - journal.keys_in_table(db, gone)
            counts = waiting_only + sum(
                db.execute(
                    "DELETE FROM egress_counts WHERE stream=? AND day<?", (stream, day)
                ).rowcount
                for stream, day in counts_before.items()
            )
            # Each car keeps its newest row: what is allowed now.
            history = db.execute(
                "DELETE FROM settings_history WHERE applied_at<? AND id NOT IN"
                " (SELECT MAX(id) FROM settings_history GROUP BY vin)",
                (history_before,),
            ).rowcount
            content = db.execute(
                # Vehicle entries only (named by a subject; policy entries name a version).
                "UPDATE audit_log SET content=NULL WHERE at<? AND content IS NOT NULL"
                " AND length(subject)=32 AND subject NOT GLOB '*[^0-9a-f]*'",
                (audit_content_before,),
            ).rowcount
            return {"egress_counts": counts, "settings_history": history, "audit_content": content}

        return self._write_then_apply(tx)

    def set_objection(
        self, subject: str, feature: str, objected: bool, record: AuditRecord
    ) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            if objected:
                cur = db.execute(
                    "INSERT INTO objections VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                    (subject, feature, record.at, record.actor),
                )
            else:
                cur = db.execute(
                    "DELETE FROM objections WHERE subject=? AND feature=?", (subject, feature)
                )
            if cur.rowcount:
                audit.append(db, record, self._ledger_key)
            return cur.rowcount > 0

        return self._write(tx)

    def objections(self, subjects: Collection[str] | None = None) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        where, params = _one_car("subject", subjects)
        for car, feature in self._read(f"SELECT subject, feature FROM objections{where}", params):
            found.setdefault(str(car), set()).add(str(feature))
        return {k: frozenset(v) for k, v in found.items()}

    def open_incident(
        self, opened_at: float, until: float, reason: str, record: AuditRecord
    ) -> int:
        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO incident_holds (opened_at, until, reason, actor) VALUES (?,?,?,?)"
                " RETURNING id",
                (opened_at, until, reason, record.actor),
            )
            new_id = int(cur.fetchone()[0])
            audit.append(db, record, self._ledger_key)
            return new_id

        return self._write(tx)

    def close_incident(self, incident_id: int, at: float, record: AuditRecord) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE incident_holds SET closed_at=? WHERE id=? AND closed_at IS NULL",
                (at, incident_id),
            )
            if cur.rowcount:
                audit.append(db, record, self._ledger_key)
            return cur.rowcount > 0

        return self._write(tx)

    def incidents(self) -> list[IncidentHold]:
        return [
            IncidentHold(int(r[0]), float(r[1]), float(r[2]), str(r[3]), str(r[4]), r[5])
            for r in self._read(
                "SELECT id, opened_at, until, reason, actor, closed_at FROM incident_holds"
                " ORDER BY id"
            )
        ]

    def access_log(self) -> list[tuple[Any, ...]]:
        return self._read(
            "SELECT at, client, actor, method, path, status FROM access_log ORDER BY at"
        )

    def append_audit(self, record: AuditRecord) -> None:
        self._write(lambda db: audit.append(db, record, self._ledger_key))

    def audit_entries(self, subject: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT seq, at, actor, action, subject, content FROM audit_log"
        rows = (
            self._read(sql + " WHERE subject=? ORDER BY seq", (subject,))
            if subject
            else self._read(sql + " ORDER BY seq")
        )
        return [
            {
                "seq": r[0],
                "at": r[1],
                "actor": r[2],
                "action": r[3],
                "subject": r[4],
                "content": json.loads(r[5]) if r[5] is not None else None,
            }
            for r in rows
        ]

    def verify_audit(self) -> VerifyResult:
        with self._lock:
            return audit.verify(self._db, self._ledger_key)

    def check_writable(self) -> None:
        """Raises when a write fails (readiness probe): a real, committed write,
        since taking the write lock succeeds on a read-only or full database."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO meta VALUES ('ready_probe', '') ON CONFLICT(key) DO UPDATE"
                " SET value = CASE meta.value WHEN '' THEN '.' ELSE '' END"
            )
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _snapshot(row: tuple[object, ...], features: dict[str, bool] | None = None) -> SettingsSnapshot:
    return SettingsSnapshot(
        vin=str(row[0]),
        revision=int(row[1]),  # type: ignore[call-overload]
        privacy_mode=bool(row[2]),
        location=LocationMode.parse(int(row[3])),  # type: ignore[call-overload]
        features=features if features is not None else json.loads(str(row[4])),
        applied_at=float(row[5]),  # type: ignore[arg-type]
        policy_version=str(row[6]),
        source=str(row[7]),
    )


# A car's history is more than a mirror of its settings: several rows, a
# merged row, a restriction row, or one row that differs from its settings
# (or has none). One pass over the history (each row's flags and text
# compared in SQL, a key lookup of its settings row): a fraction of reading
# and decoding every row in Python.
_NOT_A_MIRROR = (
    " vin IN (SELECT h.vin FROM settings_history h LEFT JOIN vehicle_settings s"
    " ON s.vin = h.vin GROUP BY h.vin HAVING COUNT(*) > 1 OR SUM(CASE WHEN h.merged = 0"
    " AND s.vin IS NOT NULL AND h.revision = s.revision AND h.privacy_mode = s.privacy_mode"
    " AND h.location = s.location AND h.features = s.features"
    " AND h.applied_at = s.applied_at AND h.policy_version = s.policy_version"
    " AND h.source = s.source AND h.source NOT IN (?, ?) THEN 0 ELSE 1 END) > 0)"
)


def _one_car(column: str, subjects: Collection[str] | None) -> tuple[str, tuple[object, ...]]:
    """A WHERE clause selecting these cars' rows (None: every car's)."""
    if subjects is None:
        return "", ()
    chosen = tuple(subjects)
    return f" WHERE {column} IN ({','.join('?' * len(chosen)) or 'NULL'})", chosen


def _anchor(row: Sequence[Any]) -> LocationAnchor:
    return LocationAnchor(
        float(row[0]), float(row[1]), float(row[2]), None if row[3] is None else float(row[3])
    )
