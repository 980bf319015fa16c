"""The state directory of a running gateway: exclusive, private, consistent.

What is in it: `consent.sqlite3` (with `-wal`, `-shm`), `pseudonym.key`
(unless configured elsewhere), `instance.id` and `gateway.lock`.

`gateway run` opens it with `open_state`, which refuses (StateDirError, exit
2) rather than start on state it cannot trust: another gateway using it, a
damaged, empty or unwritable store, a missing or different key. Readers
(`audit verify`) open the store directly and need none of this.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import INSTANCE_ID_PATTERN, LEGACY_INSTANCE_ID, GatewayConfig
from gateway.control.audit import AuditRecord
from gateway.core.identity import subject
from gateway.keys import (
    KEY_BYTES,
    KeyFileError,
    create_key,
    key_fingerprint,
    read_key,
    write_key,
)
from gateway.store import SqliteConsentStore, StoreDamaged, StoreError
from gateway.store.postgres import PostgresConsentStore

log = logging.getLogger("gateway.statedir")

LOCK_FILE = "gateway.lock"
INSTANCE_FILE = "instance.id"
FINGERPRINT_KEY = "key_fingerprint"  # in the store's meta table
# After a key rotation: the first key, kept for what must not change (store
# subjects, seals, audit hashes, grid offsets); the fingerprint is its.
INTERNAL_KEY_FILE = "internal.key"
# Rotated-out pseudonymization keys: refs made with them may still be held
# downstream, so erasure events name those refs too. Named `{when}-{fingerprint}.key`.
RETIRED_KEYS_DIR = "retired-keys"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


class StateDirError(Exception):
    """The state directory cannot be used as it is; the message says why and what to do."""


class StateDir:
    """One gateway per state directory, held for the life of the process.

    flock rather than a pid file: the kernel releases it however the
    process ends (kill -9 included), so a restart after a crash is never
    blocked by a stale lock, and a live holder can never be mistaken for a
    dead one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path / LOCK_FILE
        self.instance_path = path / INSTANCE_FILE
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Create the directory if needed and take it; StateDirError if it is in use."""
        self._prepare()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        except OSError as exc:
            raise StateDirError(f"{self.lock_path}: cannot open: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirError(
                f"state directory {self.path} is in use by "
                + (f"pid {holder}" if holder else "another process (pid not yet recorded)")
                + ": one gateway per state directory; stop that one, or give this one its own"
                " --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def _prepare(self) -> None:
        try:
            self.path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(
                f"state directory {self.path}: cannot create: {exc.strerror or exc}"
            ) from exc
        if not self.path.is_dir():
            raise StateDirError(f"state directory {self.path} is not a directory")
        # A real write: permission bits say nothing for root, and nothing about
        # read-only mounts or immutable directories.
        try:
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-probe-")
        except OSError as exc:
            raise StateDirError(
                f"state directory {self.path} is not writable: {exc.strerror or exc}"
            ) from exc
        os.close(fd)
        os.unlink(probe)
        loose = stat.S_IMODE(self.path.stat().st_mode) & 0o077
        if loose:
            # Not changed here: the directory may be one the operator shares on purpose.
            log.warning(
                "state directory %s is accessible to other users (mode %o); chmod 700 it",
                self.path,
                stat.S_IMODE(self.path.stat().st_mode),
            )

    def instance_id(self, configured: str | None, upgraded: bool) -> str:
        """This gateway's identity: configured, else remembered, else made up once.

        `upgraded`: the store predates this directory having an instance id
        (written by a release without them). Such a directory keeps the
        client ids it always had, so its persistent broker session, and the
        messages queued in it, stay its own.
        """
        stored = self._read_instance_id()
        if configured is not None:
            if stored is not None and stored != configured:
                log.warning(
                    "instance id %s replaces %s stored in %s: broker sessions under the old"
                    " client ids are abandoned",
                    configured,
                    stored,
                    self.instance_path,
                )
            chosen = configured
        elif stored is not None:
            return stored
        else:
            chosen = LEGACY_INSTANCE_ID if upgraded else secrets.token_hex(4)
            log.info("instance id %s recorded in %s", chosen, self.instance_path)
        if chosen != stored:
            _write_private(self.instance_path, f"{chosen}\n".encode())
        return chosen

    def _read_instance_id(self) -> str | None:
        try:
            text = self.instance_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateDirError(f"{self.instance_path}: cannot read: {exc}") from exc
        if not re.fullmatch(INSTANCE_ID_PATTERN, text):
            raise StateDirError(
                f"{self.instance_path}: not an instance id ({text[:40]!r}); it must match"
                f" {INSTANCE_ID_PATTERN}: restore it, or set instance_id explicitly"
            )
        return text


@dataclass
class OpenState:
    """What `gateway run` holds while it runs."""

    state_dir: StateDir
    store: SqliteConsentStore
    key: bytes
    instance_id: str
    internal_key: bytes | None = None  # set once the key was rotated
    retired_keys: tuple[bytes, ...] = ()

    def close(self) -> None:
        self.store.close()
        self.state_dir.unlock()


def open_state(config: GatewayConfig) -> OpenState:
    """Lock the state directory and open its store and key, or refuse (StateDirError).

    With `require_initialized_state` a directory without a store is refused
    before anything is written, and a missing key is never created."""
    if config.require_initialized_state:
        _check_initialized(config)
    state_dir = StateDir(config.state_dir)
    state_dir.lock()
    try:
        db = config.state_dir / SqliteConsentStore.FILENAME
        key_path = config.key_path
        try:
            if config.store.url is not None:
                # Shared by the instances; the key and instance id stay here.
                _make_private(key_path)
                # One of a shared group: its instance id is its lease on the database.
                shared = config.vehicle_broker.shared_group is not None
                store: SqliteConsentStore = PostgresConsentStore(
                    config.store.url,
                    config.limits.history_per_vehicle,
                    exclusive=True,
                    instance=state_dir.instance_id(config.instance_id, False) if shared else None,
                )
            else:
                _check_store_file(db, key_path)
                _make_private(
                    db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), key_path
                )
                store = SqliteConsentStore(db, config.limits.history_per_vehicle)
        except StoreDamaged as exc:
            raise StateDirError(
                f"{exc}; restore {db.name} from a backup (to start over instead, move it"
                " away: the applied privacy settings and the audit ledger go with it)"
            ) from exc
        except StoreError as exc:
            raise StateDirError(str(exc)) from exc
        try:
            # A release without instance ids recorded no key fingerprint; if it
            # ever ran (recorded its policy, then connected with the bare
            # client ids), its broker session is under those ids.
            upgraded = store.meta(FINGERPRINT_KEY) is None and (
                bool(store.policies()) or store.holds_vehicle_data()
            )
            internal_path = config.state_dir / INTERNAL_KEY_FILE
            internal_key = _read_internal_key(internal_path)
            if internal_key is not None:
                # Rotated: the store was written with the internal key.
                _check_fingerprint(store, internal_path, internal_key)
                key, fingerprint = _read_rotated_key(key_path), None
            else:
                key, fingerprint = _open_key(
                    store, key_path, may_create=not config.require_initialized_state
                )
            retired = read_retired_keys(config.state_dir)
            # Refusals come before any of these writes; the fingerprint goes
            # last, as it is what marks the directory as no longer upgraded.
            instance_id = state_dir.instance_id(config.instance_id, upgraded)
            if fingerprint is not None:
                store.set_meta(FINGERPRINT_KEY, fingerprint)
            # Keyed audit hashes from now on; a store written before schema 8
            # is re-keyed here (VINs become subjects), with the key just checked.
            stable = internal_key if internal_key is not None else key
            rekeyed = store.attach_key(stable, functools.partial(subject, stable))
            if rekeyed:
                log.warning(
                    "consent store upgraded to schema 8: %d rows now name cars by their"
                    " keyed hash, never the VIN",
                    rekeyed,
                )
        except BaseException:
            store.close()
            raise
    except BaseException:
        state_dir.unlock()
        raise
    return OpenState(state_dir, store, key, instance_id, internal_key, retired)


def _check_initialized(config: GatewayConfig) -> None:
    """A directory that is missing, or holds no consent store (or an empty
    one), is most likely a state volume that is not mounted: refused, with
    nothing written, rather than started as a new state."""
    path = config.state_dir
    db = path / SqliteConsentStore.FILENAME
    if not path.is_dir():
        what = "it does not exist"
    elif config.store.url is not None:
        # The store is shared (PostgreSQL); what must be here is the key.
        if config.key_path.is_file():
            return
        what = f"no key {config.key_path.name}"
    else:
        try:
            size: int | None = db.stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise StateDirError(f"consent store {db}: {exc.strerror or exc}") from exc
        if size:
            return
        what = f"no consent store {db.name}" if size is None else f"{db.name} is empty"
    raise StateDirError(
        f"state directory {path} is not initialised ({what}) and require_initialized_state"
        " is set: is the state volume mounted? A new state directory is set up once with"
        f" `python -m gateway init --state-dir {path}`"
    )


@dataclass
class InitReport:
    created: list[str]  # what `init_state` wrote: key, instance id, store
    instance_id: str
    key_path: Path
    fingerprint: str


def init_state(config: GatewayConfig) -> InitReport:
    """`gateway init`: lock the directory, create what is missing (key,
    instance id, an empty store bound to the key by its fingerprint) and
    check what is there, exactly as a run would; StateDirError otherwise.
    An initialised directory is left as it is."""
    db = config.state_dir / SqliteConsentStore.FILENAME
    had = {
        "pseudonymization key": config.key_path.exists(),
        "instance id": (config.state_dir / INSTANCE_FILE).exists(),
        "consent store": db.exists() and db.stat().st_size > 0,
    }
    state = open_state(config)
    try:
        fingerprint = state.store.meta(FINGERPRINT_KEY) or key_fingerprint(state.key)
    finally:
        state.close()
    return InitReport(
        [what for what, existed in had.items() if not existed],
        state.instance_id,
        config.key_path,
        fingerprint,
    )


def _check_store_file(db: Path, key_path: Path) -> None:
    """Refuses a store that is empty next to a key, or unwritable."""
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateDirError(f"consent store {db}: {exc.strerror or exc}") from exc
    if size == 0 and key_path.exists():
        # A store is never empty once written; next to a key it means the
        # state was lost (truncated, or replaced by an empty file).
        raise StateDirError(
            f"consent store {db} is empty (0 bytes) but the pseudonymization key {key_path}"
            " exists: the consent state (applied privacy settings, policies, audit ledger) was"
            f" lost. Restore {db.name} from a backup. To start fresh on purpose, remove {db}"
            f" (keeping {key_path} keeps pseudonyms stable), or remove both to start from"
            " nothing"
        )
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        # SQLite would silently open an unwritable file read-only and fail at
        # the first write, holding the pipeline: refuse now, with the reason.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateDirError(
                f"consent store {path} is not writable: {exc.strerror or exc} (the gateway"
                " records every privacy setting before enforcing it)"
            ) from exc


def _open_key(
    store: SqliteConsentStore, key_path: Path, may_create: bool = True
) -> tuple[bytes, str | None]:
    """The key, checked against the one the store was written with, and its
    fingerprint when the store has none yet (for the caller to record)."""
    stored = store.meta(FINGERPRINT_KEY)
    try:
        key = read_key(key_path)
    except FileNotFoundError:
        if not may_create:
            raise StateDirError(
                f"pseudonymization key {key_path} is missing and require_initialized_state is"
                " set: restore the key (or mount the secret that holds it); a new key would"
                " change every pseudonym"
            ) from None
        if stored is not None or store.holds_vehicle_data():
            # A new key would silently change every pseudonym, location offset
            # and audit subject: the backend could no longer link them.
            raise StateDirError(
                f"pseudonymization key {key_path} is missing, but the consent store"
                f" {store.path} was written with a key"
                + (f" (fingerprint {stored})" if stored else "")
                + ". Restore the key from its backup; a new key would change every pseudonym."
                f" To start over on purpose, move {store.path} away as well"
            ) from None
        key = create_key(key_path)
    except KeyFileError as exc:
        raise StateDirError(str(exc)) from exc
    actual = key_fingerprint(key)
    if stored is None:
        return key, actual
    if stored != actual:
        raise StateDirError(
            f"pseudonymization key {key_path} does not match the key the consent store"
            f" {store.path} was written with (fingerprint {actual}, expected {stored}):"
            " restore the right key; a different key would change every pseudonym"
        )
    return key, None


def _read_internal_key(path: Path) -> bytes | None:
    try:
        return read_key(path)
    except FileNotFoundError:
        return None
    except KeyFileError as exc:
        raise StateDirError(str(exc)) from exc


def _read_rotated_key(path: Path) -> bytes:
    try:
        return read_key(path)
    except FileNotFoundError:
        raise StateDirError(
            f"pseudonymization key {path} is missing after a key rotation: restore it from"
            " its backup (a new key would change every pseudonym again; to rotate on"
            " purpose, use `gateway rotate-key`)"
        ) from None
    except KeyFileError as exc:
        raise StateDirError(str(exc)) from exc


def _check_fingerprint(store: SqliteConsentStore, path: Path, key: bytes) -> None:
    stored, actual = store.meta(FINGERPRINT_KEY), key_fingerprint(key)
    if stored is not None and stored != actual:
        raise StateDirError(
            f"key {path} does not match the key the consent store {store.path} was written"
            f" with (fingerprint {actual}, expected {stored}): restore the right key"
        )


def read_retired_keys(state_dir: Path) -> tuple[bytes, ...]:
    folder = state_dir / RETIRED_KEYS_DIR
    if not folder.is_dir():
        return ()
    try:
        return tuple(read_key(path) for path in sorted(folder.glob("*.key")))
    except KeyFileError as exc:
        raise StateDirError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Rotation:
    retired: Path
    retired_fingerprint: str
    new_fingerprint: str
    internal_created: bool


def rotate_key(config: GatewayConfig, now: float) -> Rotation:
    """Replace the pseudonymization key (the gateway must be stopped: the
    state directory's lock is taken). What leaves the gateway changes (app
    refs, MAC pseudonyms, seq hashes); what names cars inside it does not: on
    the first rotation the current key becomes the internal key. The old key
    is retired, not deleted: erasure events name the refs it made."""
    state_dir = StateDir(config.state_dir)
    state_dir.lock()
    try:
        db = config.state_dir / SqliteConsentStore.FILENAME
        if config.store.url is not None:
            try:  # the gateway is stopped: its lock on the database is free
                store: SqliteConsentStore = PostgresConsentStore(config.store.url, exclusive=True)
            except StoreError as exc:
                raise StateDirError(
                    f"{exc}. Stop every gateway on this database first (with a shared group:"
                    " all its instances; then copy the new key files to each of them)"
                ) from exc
        elif not db.exists():
            raise StateDirError(f"no consent store at {db}: nothing to rotate")
        else:
            store = SqliteConsentStore(db)
        try:
            internal_path = config.state_dir / INTERNAL_KEY_FILE
            internal = _read_internal_key(internal_path)
            current = _read_rotated_key(config.key_path)
            created = internal is None
            if internal is None:
                _check_fingerprint(store, config.key_path, current)
                write_key(internal_path, current)
                internal = current
            else:
                _check_fingerprint(store, internal_path, internal)
            store.attach_key(internal, functools.partial(subject, internal))
            old_fp = key_fingerprint(current)
            retired_dir = config.state_dir / RETIRED_KEYS_DIR
            retired_dir.mkdir(mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            retired = retired_dir / f"{stamp}-{old_fp}.key"
            write_key(retired, current)
            new = secrets.token_bytes(KEY_BYTES)
            write_key(config.key_path, new)
            new_fp = key_fingerprint(new)
            store.append_audit(
                AuditRecord(
                    actor="operator",
                    action="pseudonym_key_rotated",
                    subject="",
                    content={"retired": old_fp, "new": new_fp, "internal_created": created},
                    at=now,
                )
            )
        finally:
            store.close()
    finally:
        state_dir.unlock()
    return Rotation(retired, old_fp, new_fp, created)


def _make_private(*paths: Path) -> None:
    """Tighten files an earlier release created with the default umask."""
    for path in paths:
        try:
            current = stat.S_IMODE(path.stat().st_mode)
            if current & 0o077:
                path.chmod(PRIVATE_FILE)
                log.info("tightened %s from mode %o to %o", path, current, PRIVATE_FILE)
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. a key on a read-only secrets mount
            log.warning("cannot make %s private: %s", path, exc.strerror or exc)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
