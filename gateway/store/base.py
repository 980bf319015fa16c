"""The consent store interface: small enough for a PostgreSQL twin."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.control.audit import AuditRecord, VerifyResult
from gateway.core.identity import IdentityRow
from gateway.core.state import SettingsSnapshot
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


@dataclass(frozen=True, slots=True)
class EgressCount:
    """Messages forwarded for one vehicle, per day, stream, feature and policy version."""

    vin: str
    day: str  # YYYY-MM-DD, UTC
    stream: str
    feature: str
    policy_version: str
    count: int


@dataclass(frozen=True, slots=True)
class StoredVehicle:
    snapshot: SettingsSnapshot
    window_until: float


class ConsentStore(Protocol):
    """Durable per-vehicle privacy state.

    Every method returns only once the change is durable (committed and
    synced): callers rely on that before acknowledging or announcing it.
    Methods are blocking; the service runs them off the event loop.
    """

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

    def load_all(self) -> Iterator[StoredVehicle]:
        """Every vehicle with applied settings, for the in-memory hot path."""

    def history(self, vin: str) -> list[SettingsSnapshot]:
        """Applied settings of one vehicle, oldest first."""

    def restricted_vins(self) -> set[str]: ...

    def restriction(self, vin: str) -> tuple[float, str] | None:
        """(since, actor) when processing of the vehicle's data is restricted."""

    def set_restriction(self, vin: str, restricted: bool, record: AuditRecord) -> bool:
        """Set or lift; audited. Returns whether anything changed."""

    def erase_vehicle(
        self,
        vin: str,
        subject: str,
        record: AuditRecord,
        identity: IdentityRow | None = None,
        events: Sequence[tuple[float, str, bytes]] = (),
    ) -> dict[str, int]:
        """Delete everything held about a vehicle; scrub its audit content. In
        the same transaction keep `identity` under `subject` (epoch, revision
        floor, restriction: what survives) and queue `events` (due_at, topic,
        payload) for delayed publication."""

    def identities(self) -> dict[str, IdentityRow]:
        """What survived erasures, by subject."""

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

    def add_egress_counts(self, counts: list[EgressCount]) -> None: ...

    def egress_counts(self, vin: str) -> list[EgressCount]: ...

    def add_dead_letter(self, letter: DeadLetter, max_rows: int) -> tuple[int, int]:
        """Store a dead letter, evicting the oldest beyond `max_rows`: (id, evicted)."""

    def dead_letters(
        self, ids: list[int] | None = None, after: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        """Given ids, or the first `limit` with an id above `after`, oldest first."""

    def dead_letter_count(self) -> int: ...

    def delete_dead_letters(self, ids: list[int] | None) -> int: ...

    def purge_dead_letters(self, now: float) -> int: ...

    def log_access(
        self, at: float, client: str, actor: str, method: str, path: str, status: int
    ) -> None: ...

    def purge_access_log(self, older_than: float) -> int: ...

    def access_log(self) -> list[tuple[Any, ...]]: ...

    def append_audit(self, record: AuditRecord) -> None: ...

    def audit_entries(self, subject: str | None = None) -> list[dict[str, Any]]: ...

    def verify_audit(self) -> VerifyResult: ...

    def check_writable(self) -> None:
        """Raise when a write would fail (readiness probe)."""

    def close(self) -> None: ...
