"""The consent store interface: small enough for a PostgreSQL twin."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from gateway.control.audit import AuditRecord, VerifyResult
from gateway.core.identity import IdentityRow
from gateway.core.state import FindMyCarCommand, LocationAnchor, SettingsSnapshot
from gateway.delivery import DeadLetter


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    version: str
    digest: str
    yaml: str
    signer: str  # key id of the operator key that signed it ("config" for the bootstrap file)
    pushed_at: float
    applied_at: float | None
    active: bool


# An egress count's key: (vin, day, stream, feature, policy version).
CountKey = tuple[str, str, str, str, str]


class EgressCount(NamedTuple):
    """Messages forwarded for one vehicle, per day, stream, feature and policy
    version. A named tuple: one is built per car in every commit of the
    acknowledgement path (a frozen dataclass costs three times as much), and
    its fields are the egress table's columns in order."""

    vin: str
    day: str  # YYYY-MM-DD, UTC
    stream: str
    feature: str
    policy_version: str
    count: int  # type: ignore[assignment]  # shadows tuple.count: read by name only


@dataclass(frozen=True, slots=True)
class StoredVehicle:
    snapshot: SettingsSnapshot
    window_until: float


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """A settings_history row for the capture-time check: applied settings, or
    (source `restriction`/`restriction_lifted`) a restriction set or lifted."""

    snapshot: SettingsSnapshot
    merged: int  # how many later rows were folded into it (0: as applied)


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A vehicle message held until its car's settings reach `revision`
    (contract rule 12). Only `sealed` holds content (AES-GCM, bound to subject)."""

    subject: str  # keyed hash of the VIN, never the VIN
    revision: int
    parked_at: float
    expires_at: float
    stream: str
    size: int
    sealed: bytes
    id: int = 0  # assigned by the store


@dataclass(frozen=True, slots=True)
class IncidentHold:
    """A security incident during which protocol data is not purged (notice L115)."""

    id: int
    opened_at: float
    until: float
    reason: str
    actor: str
    closed_at: float | None

    def active(self, now: float) -> bool:
        return self.closed_at is None and self.opened_at <= now < self.until


@dataclass(frozen=True, slots=True)
class ParkResult:
    id: int
    evicted: tuple[tuple[int, str, int], ...]  # (id, stream, size) pushed out by the bounds
    applied: bool = False  # not parked: the revision is applied (by another instance)


@dataclass(frozen=True, slots=True)
class Changes:
    """What other instances committed to a shared store since a position of
    its change log (`seq`: the new position)."""

    seq: int
    states: frozenset[str] = frozenset()  # cars whose settings, restriction, ... changed
    anchors: frozenset[str] = frozenset()  # cars whose location anchor changed
    policy: bool = False  # a policy was pushed or activated
    resync: bool = False  # the log no longer reaches back that far: reload everything


class ConsentStore(Protocol):
    """Durable per-vehicle privacy state.

    Every method returns only once the change is durable (committed and
    synced): callers rely on that before acknowledging or announcing it.
    Methods are blocking; the service runs them off the event loop.
    """

    def attach_key(self, key: bytes, subject_of: Callable[[str], str]) -> int:
        """Key the audit content hashes with `key` from now on and bring a
        store that still names cars by VIN to naming them by `subject_of(vin)`
        (no VIN left in any file). Returns the rows changed; idempotent."""

    def apply_settings(
        self, snapshot: SettingsSnapshot, record: AuditRecord | None = None, merge: bool = False
    ) -> None:
        """Make `snapshot` the vehicle's applied settings, append it to the history
        and (when given) to the audit ledger, in one transaction. With `merge`
        (a car over its settings rate) it is folded into the latest history row
        as the strictest combination of both, with no new audit entry; the
        history of a vehicle is compacted the same way beyond its row limit."""

    def open_window(self, vin: str, until: float) -> None:
        """Record an open find-my-car window (gateway epoch seconds)."""

    def save_find_my_car(
        self,
        vin: str,
        commands: tuple[FindMyCarCommand, ...],
        window_until: float,
        unchanged_since: int | None = None,
    ) -> bool:
        """Replace the vehicle's find-my-car commands (contract rule 17: the
        commands-per-hour cap and spent fixes survive a restart) and its
        window end, in one transaction; with `unchanged_since`, only if no
        other instance changed them after that position of the change log
        (False otherwise, nothing written)."""

    def find_my_car_commands(
        self, subjects: Collection[str] | None = None
    ) -> dict[str, tuple[FindMyCarCommand, ...]]:
        """Every vehicle's find-my-car commands (or these cars'), oldest first."""

    def load_all(self, subjects: Collection[str] | None = None) -> Iterator[StoredVehicle]:
        """Every vehicle with applied settings (or these), for the in-memory hot path."""

    def history(self, vin: str) -> list[SettingsSnapshot]:
        """Applied settings of one vehicle, oldest first."""

    def capture_history(
        self, subjects: Collection[str] | None = None, *, mirrors: bool = True
    ) -> Iterator[HistoryRow]:
        """Every settings history row (or these cars'), restriction periods
        included, grouped by vehicle, oldest first (the in-memory capture-time
        intervals). With `mirrors=False`, a car whose whole history is one
        unmerged row equal to its applied settings is left out: its interval
        follows from the settings row (most cars, at a restart)."""

    def settings_without_history(self, subjects: Collection[str] | None = None) -> set[str]:
        """Cars with applied settings and no history row (a store filled by
        other means, or written before histories were kept)."""

    def restricted_vins(self, subjects: Collection[str] | None = None) -> set[str]: ...

    def restriction(self, vin: str) -> tuple[float, str] | None:
        """(since, actor) when processing of the vehicle's data is restricted."""

    def set_restriction(self, vin: str, restricted: bool, record: AuditRecord) -> bool:
        """Set or lift; audited; a change is also a settings history row (from
        `record.at` on nothing, or the applied settings again, was allowed).
        Returns whether anything changed."""

    def erase_vehicle(
        self,
        vin: str,
        subject: str,
        record: AuditRecord,
        identity: IdentityRow | None = None,
        events: Sequence[tuple[float, str, bytes]] = (),
        scrub: bool = True,
    ) -> dict[str, int]:
        """Delete everything held about a vehicle; scrub its audit content. In
        the same transaction keep `identity` under `subject` (epoch, revision
        floor, restriction: what survives) and queue `events` (due_at, topic,
        payload) for delayed publication."""

    def identities(self, subjects: Collection[str] | None = None) -> dict[str, IdentityRow]:
        """What survived erasures, by subject (or these subjects')."""

    def set_identity_restricted(self, subject: str, restricted: bool) -> bool: ...

    def pending_erasure_events(self) -> list[tuple[int, float, str, bytes]]:
        """Queued app erasure events (id, due_at, topic, payload), earliest first."""

    def delete_pending_erasure_event(self, event_id: int) -> None: ...

    def save_policy(self, policy: StoredPolicy, record: AuditRecord) -> None:
        """Store a policy and make it the active one (audited). In the same
        transaction, refuse with VersionConflict what `check_new_version` refuses
        against every version ever stored."""

    def activate_policy(self, version: str, applied_at: float, record: AuditRecord) -> None:
        """Make a stored version the active one again (audited). KeyError when
        it was never stored, VersionConflict when it is active already."""

    def policies(self) -> list[StoredPolicy]: ...

    def active_policy(self) -> StoredPolicy | None: ...

    def add_egress_counts(self, counts: list[EgressCount]) -> None:
        """Add these counts; durable when this returns (the acknowledgements wait for it)."""

    def egress_counts(self, vin: str) -> list[EgressCount]:
        """`vin`'s counts (every one written, in its row yet or not), by day,
        stream, feature and policy version."""

    def save_anchors(self, anchors: Mapping[str, LocationAnchor]) -> None:
        """Make these the vehicles' location anchors (never an older one over a newer)."""

    def load_anchors(
        self, subjects: Collection[str] | None = None
    ) -> Iterator[tuple[str, LocationAnchor]]:
        """Every vehicle's location anchor (or these cars'), so a restart cannot force a refresh."""

    def claim_anchor(
        self, vin: str, previous: float | None, anchor: LocationAnchor
    ) -> LocationAnchor | None:
        """Store `anchor` if the stored one is still the one refreshed at
        `previous` (None: none): None when stored, else the one stored first."""

    def change_position(self) -> int:
        """The newest position of the change log (0 without one)."""

    def sweep_lease(self) -> bool:
        """Whether this instance is the one releasing orphaned parked messages."""

    def applied_parked(self, applied_before: float) -> list[ParkedMessage]:
        """Parked messages whose car had a revision at least theirs applied
        before `applied_before`."""

    def unapplied_parked_ids(self) -> list[int]:
        """Ids of parked messages still waiting for their revision."""

    def read_snapshot(self) -> AbstractContextManager[None]:
        """Reads made inside see one committed state of the store."""

    def changes_since(self, seq: int) -> Changes:
        """What other instances sharing this store changed since `seq` of its
        change log (a store no other instance writes: nothing, ever)."""

    def add_dead_letter(self, letter: DeadLetter, max_rows: int) -> tuple[int, int]:
        """Store a dead letter, evicting the oldest beyond `max_rows`: (id, evicted)."""

    def dead_letters(
        self, ids: list[int] | None = None, after: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        """Given ids, or the first `limit` with an id above `after`, oldest first."""

    def dead_letter_count(self) -> int: ...

    def delete_dead_letters(self, ids: list[int] | None) -> int: ...

    def purge_dead_letters(self, now: float) -> int: ...

    def park(
        self, message: ParkedMessage, max_bytes_per_subject: int, max_bytes: int
    ) -> ParkResult:
        """Store a parked message; evict the oldest beyond the byte bounds."""

    def parked(
        self, subject: str | None = None, up_to_revision: int | None = None
    ) -> list[ParkedMessage]: ...

    def delete_parked(self, ids: list[int]) -> int: ...

    def expired_parked(self, now: float) -> list[tuple[int, str, int]]:
        """(id, stream, size) of parked messages past their maximum wait."""

    def parked_stats(self) -> tuple[int, int, set[str]]: ...

    def log_access(
        self, at: float, client: str, actor: str, method: str, path: str, status: int
    ) -> None: ...

    def purge_access_log(self, older_than: float) -> int: ...

    def purge_retention(
        self,
        counts_before: Mapping[str, str],
        history_before: float,
        audit_content_before: float,
    ) -> dict[str, int]:
        """What the gateway holds, bounded by the declared retention: egress
        counts of each stream before its day (YYYY-MM-DD), settings history rows
        applied before `history_before` (each car keeps its newest), audit
        content of vehicle entries before `audit_content_before` (the chain and
        the content hash stay: the ledger still verifies)."""

    def set_objection(
        self, subject: str, feature: str, objected: bool, record: AuditRecord
    ) -> bool:
        """Object to a feature for a car, or withdraw it (Art. 21; audited).
        Kept across settings changes and erasure; an ownership change drops
        them (they were the previous owner's). Returns whether it changed."""

    def objections(self, subjects: Collection[str] | None = None) -> dict[str, frozenset[str]]:
        """Objected features by subject."""

    def open_incident(
        self, opened_at: float, until: float, reason: str, record: AuditRecord
    ) -> int:
        """Record an incident hold (audited); its id."""

    def close_incident(self, incident_id: int, at: float, record: AuditRecord) -> bool:
        """End a hold early (audited); False when unknown or already closed."""

    def incidents(self) -> list[IncidentHold]: ...

    def access_log(self) -> list[tuple[Any, ...]]: ...

    def append_audit(self, record: AuditRecord) -> None: ...

    def audit_entries(self, subject: str | None = None) -> list[dict[str, Any]]: ...

    def verify_audit(self) -> VerifyResult: ...

    def check_writable(self) -> None:
        """Raise when a write would fail (readiness probe)."""

    def close(self) -> None: ...
