"""Egress counts on SQLite: durable as one journal row per commit, folded into
the per-car rows later.

Each forwarded message is counted, and its acknowledgement waits until the
count is durable (gateway/accounting.py). Upserting the per-car rows at every
commit touches about one page per car: on a store holding weeks of counts,
12-18 µs of the store thread per message, and the thread's commits then
bound the gateway's throughput (`python -m bench egress-store`). Here a
commit appends one row holding its counts, and a car's counts are added to
its row once they have waited FOLD_AFTER_S, in one upsert for all of the
messages of that time.

The invariant, kept by every transaction: the journal's rows add up to
`pending`, which is exactly what is counted and not yet in `egress_counts`.
A fold upserts some of `pending` and appends the same counts negated, in one
transaction; a crash at any point leaves a journal that still adds up to
what the table lacks (read back at open), so nothing is counted twice or
lost. Erasure and retention compact the journal (rewrite it as one row of
`pending`, without what they remove), so no row keeps a count the table no
longer has. Readers see the table plus `pending`: a read writes nothing.

PostgreSQL does not use this: instances of a shared group each hold their
own `pending`, and an older instance would erase without the journal.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable

from gateway.store.base import EgressCount

# (vin, day, stream, feature, policy version): the table's key columns
CountKey = tuple[str, str, str, str, str]
# How long a count may wait in the journal before its car's row gets it.
# Messages of one car and stream within this time cost one upsert.
FOLD_AFTER_S = 30.0
# Each commit folds at least this many due counts (and at least as many as it
# appends): the journal keeps up with any rate of new cars.
FOLD_AT_LEAST = 256
# Counts waiting, at most (oldest folded first beyond it): bounds memory.
MAX_PENDING = 50_000
# Journal rows, or counts in them, before the journal is rewritten as one row
# of `pending`: what a start reads back stays small.
COMPACT_AFTER_ROWS = 2_000
COMPACT_AFTER_COUNTS = 200_000

UPSERT_COUNTS = (
    "INSERT INTO egress_counts VALUES (?,?,?,?,?,?) ON CONFLICT"
    "(vin, day, stream, feature, policy_version) DO UPDATE SET"
    " count = egress_counts.count + excluded.count"
)


def _encode(rows: Iterable[tuple[str, str, str, str, str, int]]) -> str:
    return json.dumps([list(r) for r in rows], separators=(",", ":"))


class EgressJournal:
    """The counts not yet in `egress_counts`, and the journal rows that hold them.

    Not thread-safe: the store calls it under its lock, inside its write
    transactions, and applies what a transaction changed only after the
    commit (the callables returned)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # key -> [count, when it began waiting]; insertion order is that order.
        self._pending: dict[CountKey, list[float]] = {}
        self._rows = 0  # journal rows
        self._entries = 0  # counts in them
        self._clock = clock

    def __len__(self) -> int:
        return len(self._pending)

    def load(self, db: sqlite3.Connection) -> None:
        """`pending` from the journal as the last run left it."""
        pending: dict[CountKey, list[float]] = {}
        now, rows, entries = self._clock(), 0, 0
        for (text,) in db.execute("SELECT counts FROM egress_journal ORDER BY seq"):
            rows += 1
            counts = json.loads(text)
            entries += len(counts)
            for vin, day, stream, feature, version, n in counts:
                entry = pending.setdefault((vin, day, stream, feature, version), [0, now])
                entry[0] += n
        self._pending = {k: v for k, v in pending.items() if v[0] != 0}
        self._rows, self._entries = rows, entries

    def append(self, db: sqlite3.Connection, counts: list[EgressCount]) -> Callable[[], None]:
        """In a write transaction: journal `counts`, fold what is due. Returns
        what to apply once it is committed."""
        now = self._clock()
        db.execute("INSERT INTO egress_journal (counts) VALUES (?)", (_encode(counts),))
        folded = self._due(now, max(FOLD_AT_LEAST, len(counts)))
        if folded:
            db.executemany(UPSERT_COUNTS, folded)
            db.execute(
                "INSERT INTO egress_journal (counts) VALUES (?)",
                (_encode((*r[:5], -r[5]) for r in folded),),
            )

        def apply() -> None:
            pending = self._pending
            for row in folded:
                key = row[:5]
                entry = pending[key]
                entry[0] -= row[5]
                if entry[0] == 0:
                    del pending[key]
            for c in counts:
                key = (c.vin, c.day, c.stream, c.feature, c.policy_version)
                waiting = pending.get(key)
                if waiting is None:
                    pending[key] = [c.count, now]
                else:
                    waiting[0] += c.count
            self._rows += 2 if folded else 1
            self._entries += len(counts) + len(folded)

        return apply

    def _due(self, now: float, at_most: int) -> list[tuple[str, str, str, str, str, int]]:
        """The oldest waiting counts to fold now: those that waited
        FOLD_AFTER_S, and beyond MAX_PENDING any."""
        over = len(self._pending) - MAX_PENDING
        limit = max(at_most, over)
        due: list[tuple[str, str, str, str, str, int]] = []
        for key, (n, since) in self._pending.items():  # oldest first
            if len(due) >= limit or (len(due) >= over and now - since < FOLD_AFTER_S):
                break
            due.append((*key, int(n)))
        return due

    @property
    def compaction_due(self) -> bool:
        return self._rows > COMPACT_AFTER_ROWS or self._entries > COMPACT_AFTER_COUNTS

    def compact(
        self, db: sqlite3.Connection, drop: Callable[[CountKey], bool] | None = None
    ) -> tuple[int, Callable[[], None]]:
        """In a write transaction: rewrite the journal as one row of `pending`,
        less the counts `drop` selects (erased, past retention). Returns how
        many were dropped, and what to apply once it is committed."""
        kept = {k: v for k, v in self._pending.items() if drop is None or not drop(k)}
        db.execute("DELETE FROM egress_journal")
        if kept:
            db.execute(
                "INSERT INTO egress_journal (counts) VALUES (?)",
                (_encode((*k, int(v[0])) for k, v in kept.items()),),
            )
        dropped = len(self._pending) - len(kept)

        def apply() -> None:
            self._pending = kept
            self._rows, self._entries = (1 if kept else 0), len(kept)

        return dropped, apply

    def waiting(self, vin: str) -> list[EgressCount]:
        """`vin`'s counts not yet in the table."""
        return [EgressCount(*k, int(v[0])) for k, v in self._pending.items() if k[0] == vin]
