"""Egress counts on SQLite: durable as one journal row per commit, folded into
the per-car rows later.

Each forwarded message is counted, and its acknowledgement waits until the
count is durable (gateway/accounting.py). Upserting the per-car rows at every
commit touches about one page per car: on a store holding weeks of counts,
12-20 µs of the store thread per message, and the thread's commits then
bound the gateway's throughput (`python -m bench egress-store`). Here a
commit appends one row holding its counts, and a car's counts are added to
its row once they have waited FOLD_AFTER_S, in one upsert for all of the
messages of that time.

The invariant, kept by every transaction: the journal's rows in effect
(`cycle` 0) add up to `pending`, which is exactly what is counted and not yet
in `egress_counts`. A fold upserts some of `pending` and appends the same
counts negated, in one transaction; a crash at any point leaves a journal
that still adds up to what the table lacks (read back at open), so nothing is
counted twice or lost.

The journal is kept short by checkpoints, a chunk per commit so that no
commit waits long: `pending` as of the last row B is written in chunks
marked with the checkpoint (not in effect), and the transaction that writes
the last chunk deletes the rows up to B and puts the chunks in effect. A
crash in between leaves the old rows in effect and the chunks ignored.

An erasure or a retention purge takes its counts out of every row that
names them (and drops a checkpoint under way), in its own transaction, so
no row keeps a count, or the fact that a car had one, after its row is gone.
Readers see the table plus `pending`: a read writes nothing.

PostgreSQL does not use this: instances of a shared group each hold their
own `pending`, and an older instance would erase without the journal.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from gateway.store.base import EgressCount

log = logging.getLogger("gateway.store")

# (vin, day, stream, feature, policy version): the table's key columns
CountKey = tuple[str, str, str, str, str]
Entry = tuple[str, str, str, str, str, int]
# How long a count may wait in the journal before its car's row gets it.
# Messages of one car and stream within this time cost one upsert.
FOLD_AFTER_S = 30.0
# Each commit folds at least this many due counts (and at least as many as it
# appends): the journal keeps up with any rate of new cars.
FOLD_AT_LEAST = 256
# Counts waiting, at most (oldest folded first beyond it): bounds memory.
MAX_PENDING = 50_000
# Journal rows, or counts in them, before a checkpoint starts: what a start
# reads back stays small.
COMPACT_AFTER_ROWS = 2_000
COMPACT_AFTER_COUNTS = 200_000
# Counts a checkpoint writes per commit: a few milliseconds at most.
CHECKPOINT_CHUNK = 2_000

UPSERT_COUNTS = (
    "INSERT INTO egress_counts VALUES (?,?,?,?,?,?) ON CONFLICT"
    "(vin, day, stream, feature, policy_version) DO UPDATE SET"
    " count = egress_counts.count + excluded.count"
)
_INSERT = "INSERT INTO egress_journal (counts, first_day, cycle) VALUES (?,?,?)"


def _insert(db: sqlite3.Connection, entries: Sequence[Entry], cycle: int = 0) -> int:
    """Append one row; its seq."""
    text = json.dumps(entries, separators=(",", ":"))
    cursor = db.execute(_INSERT, (text, min(e[1] for e in entries), cycle))
    return int(cursor.lastrowid or 0)


class _Checkpoint:
    def __init__(self, upto: int, rows: int, entries: int, snapshot: list[Entry]) -> None:
        self.upto = upto  # the last row it replaces (also its cycle id)
        self.rows, self.entries = rows, entries  # what it replaces
        self.snapshot = snapshot  # `pending` as of `upto`
        self.written = 0  # of snapshot
        self.chunks = 0


class EgressJournal:
    """The counts not yet in `egress_counts`, and the journal rows that hold them.

    Not thread-safe: the store calls it under its lock, inside its write
    transactions, and applies what a transaction changed only after the
    commit (the callables returned)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # key -> [count, when it began waiting]; insertion order is that order.
        self._pending: dict[CountKey, list[float]] = {}
        self._rows = 0  # journal rows in effect
        self._entries = 0  # counts in them
        self._checkpoint: _Checkpoint | None = None
        self._not_before_rows = 0  # after a failed checkpoint: as many rows again
        self._failing = False
        self._clock = clock

    def __len__(self) -> int:
        return len(self._pending)

    def load(self, db: sqlite3.Connection) -> None:
        """`pending` from the journal as the last run left it (a checkpoint
        left unfinished is not in effect: its rows are dropped by the next)."""
        pending: dict[CountKey, list[float]] = {}
        now, rows, entries = self._clock(), 0, 0
        for (text,) in db.execute("SELECT counts FROM egress_journal WHERE cycle=0 ORDER BY seq"):
            rows += 1
            counts = json.loads(text)
            entries += len(counts)
            for vin, day, stream, feature, version, n in counts:
                entry = pending.setdefault((vin, day, stream, feature, version), [0, now])
                entry[0] += n
        self._pending = {k: v for k, v in pending.items() if v[0] != 0}
        self._rows, self._entries = rows, entries
        self._checkpoint = None

    # ------------------------------------------------------------------ counts

    def append(self, db: sqlite3.Connection, counts: list[EgressCount]) -> Callable[[], None]:
        """In a write transaction: journal `counts`, fold what is due. Returns
        what to apply once it is committed."""
        now = self._clock()
        _insert(db, counts)  # an EgressCount is its row, in column order
        folded = self._due(now, max(FOLD_AT_LEAST, len(counts)))
        if folded:
            db.executemany(UPSERT_COUNTS, folded)
            _insert(db, [(*r[:5], -r[5]) for r in folded])

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

    def _due(self, now: float, at_most: int) -> list[Entry]:
        """The oldest waiting counts to fold now: those that waited
        FOLD_AFTER_S, and beyond MAX_PENDING any."""
        over = len(self._pending) - MAX_PENDING
        limit = max(at_most, over)
        due: list[Entry] = []
        for key, (n, since) in self._pending.items():  # oldest first
            if len(due) >= limit or (len(due) >= over and now - since < FOLD_AFTER_S):
                break
            due.append((*key, int(n)))
        return due

    def waiting(self, vin: str) -> list[EgressCount]:
        """`vin`'s counts not yet in the table."""
        return [EgressCount(*k, int(v[0])) for k, v in self._pending.items() if k[0] == vin]

    # ------------------------------------------------------------- checkpoints

    @property
    def checkpoint_due(self) -> bool:
        return self._checkpoint is not None or (
            self._rows >= self._not_before_rows
            and (self._rows > COMPACT_AFTER_ROWS or self._entries > COMPACT_AFTER_COUNTS)
        )

    def checkpoint_step(self, db: sqlite3.Connection) -> Callable[[], None]:
        """In a write transaction: start a checkpoint or write its next chunk;
        the last chunk puts it in effect. Returns what to apply once committed."""
        cp = self._checkpoint
        if cp is None:
            db.execute("DELETE FROM egress_journal WHERE cycle != 0")  # an unfinished one
            upto = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM egress_journal").fetchone()[0])
            snapshot = [(*k, int(v[0])) for k, v in self._pending.items()]
            cp = _Checkpoint(upto, self._rows, self._entries, snapshot)
        chunk = cp.snapshot[cp.written : cp.written + CHECKPOINT_CHUNK]
        if chunk:
            _insert(db, chunk, cycle=cp.upto)
        finished = cp.written + len(chunk) >= len(cp.snapshot)
        if finished:
            db.execute("DELETE FROM egress_journal WHERE seq <= ? AND cycle = 0", (cp.upto,))
            db.execute("UPDATE egress_journal SET cycle = 0 WHERE cycle = ?", (cp.upto,))
        started = cp

        def apply() -> None:
            started.written += len(chunk)
            started.chunks += 1 if chunk else 0
            if finished:
                self._rows += started.chunks - started.rows
                self._entries += len(started.snapshot) - started.entries
                self._checkpoint = None
            else:
                self._checkpoint = started
            self._not_before_rows = 0
            self._failing = False

        return apply

    def checkpoint_failed(self, exc: Exception) -> None:
        """Dropped (its rows are not in effect), tried again after as many
        rows again: a disk too full for a chunk must not cost every commit."""
        self._checkpoint = None
        self._not_before_rows = self._rows + COMPACT_AFTER_ROWS
        if not self._failing:
            log.warning("egress journal checkpoint failed (tried again later): %s", exc)
        self._failing = True

    # ----------------------------------------------------------------- removal

    def remove(
        self,
        db: sqlite3.Connection,
        drop: Callable[[Entry | CountKey], bool],
        rows_where: str,
        params: tuple[object, ...],
    ) -> tuple[list[CountKey], Callable[[], None]]:
        """In a write transaction: take the counts `drop` selects out of every
        journal row that may hold them (`rows_where`) and out of `pending`;
        a checkpoint under way is dropped. Returns the waiting keys removed,
        and what to apply once committed."""
        db.execute("DELETE FROM egress_journal WHERE cycle != 0")
        rows = 0
        entries = 0
        for seq, text in db.execute(
            f"SELECT seq, counts FROM egress_journal WHERE cycle = 0 AND ({rows_where})", params
        ).fetchall():
            row: list[Entry] = [tuple(e) for e in json.loads(text)]
            kept = [e for e in row if not drop(e)]
            if len(kept) == len(row):
                continue
            entries += len(row) - len(kept)
            if kept:
                db.execute(
                    "UPDATE egress_journal SET counts=?, first_day=? WHERE seq=?",
                    (json.dumps(kept, separators=(",", ":")), min(e[1] for e in kept), seq),
                )
            else:
                db.execute("DELETE FROM egress_journal WHERE seq=?", (seq,))
                rows += 1
        gone = [k for k in self._pending if drop(k)]

        def apply() -> None:
            for key in gone:
                del self._pending[key]
            self._rows -= rows
            self._entries -= entries
            self._checkpoint = None

        return gone, apply

    def remove_vehicle(
        self, db: sqlite3.Connection, vin: str
    ) -> tuple[list[CountKey], Callable[[], None]]:
        return self.remove(db, lambda e: e[0] == vin, "instr(counts, ?) > 0", (json.dumps(vin),))

    def remove_before(
        self, db: sqlite3.Connection, counts_before: Mapping[str, str]
    ) -> tuple[list[CountKey], Callable[[], None]]:
        if not counts_before:
            return [], lambda: None
        return self.remove(
            db,
            lambda e: e[1] < counts_before.get(e[2], ""),
            "first_day < ?",
            (max(counts_before.values()),),
        )

    @staticmethod
    def keys_in_table(db: sqlite3.Connection, keys: Collection[CountKey]) -> int:
        """How many of `keys` have a row (a removal reports each key once)."""
        return sum(
            1
            for key in keys
            if db.execute(
                "SELECT 1 FROM egress_counts WHERE vin=? AND day=? AND stream=? AND feature=?"
                " AND policy_version=?",
                key,
            ).fetchone()
        )
