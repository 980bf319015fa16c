"""SQLite consent store: one WAL-mode file under the state directory."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from gateway.core.state import LocationMode, SettingsSnapshot
from gateway.store.base import StoredVehicle

SCHEMA_VERSION = 1
_SCHEMA = """
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
    source         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS settings_history_vin ON settings_history (vin, revision);
"""


class SqliteConsentStore:
    """ConsentStore on SQLite.

    WAL with synchronous=FULL: a commit is on disk when it returns, so a
    `kill -9` (or power loss) right after never forgets applied settings.
    One connection guarded by a lock: the service calls it from one worker
    thread, the CLI from the main thread.
    """

    FILENAME = "consent.sqlite3"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: written by a newer gateway (schema {row[0]} > {SCHEMA_VERSION})"
                )

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> SqliteConsentStore:
        return cls(Path(state_dir) / cls.FILENAME)

    def apply_settings(self, snapshot: SettingsSnapshot) -> None:
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
                    self._db.execute(
                        "INSERT INTO settings_history (vin, revision, privacy_mode, location,"
                        " features, applied_at, policy_version, source) VALUES (?,?,?,?,?,?,?,?)",
                        row,
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def open_window(self, vin: str, until: float) -> None:
        with self._lock:
            self._db.execute("UPDATE vehicle_settings SET window_until=? WHERE vin=?", (until, vin))

    def load_all(self) -> Iterator[StoredVehicle]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vin, revision, privacy_mode, location, features, applied_at,"
                " policy_version, source, window_until FROM vehicle_settings"
            ).fetchall()
        for row in rows:
            yield StoredVehicle(_snapshot(row), float(row[8]))

    def history(self, vin: str) -> list[SettingsSnapshot]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vin, revision, privacy_mode, location, features, applied_at,"
                " policy_version, source FROM settings_history WHERE vin=? ORDER BY id",
                (vin,),
            ).fetchall()
        return [_snapshot(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _snapshot(row: tuple[object, ...]) -> SettingsSnapshot:
    return SettingsSnapshot(
        vin=str(row[0]),
        revision=int(row[1]),  # type: ignore[call-overload]
        privacy_mode=bool(row[2]),
        location=LocationMode.parse(int(row[3])),  # type: ignore[call-overload]
        features=json.loads(str(row[4])),
        applied_at=float(row[5]),  # type: ignore[arg-type]
        policy_version=str(row[6]),
        source=str(row[7]),
    )
