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
marked with B (`cycle`, not in effect), and the commit of the last chunk
records B as the checkpoint in effect (meta `egress_checkpoint`). From then
on the rows in effect are the chunks of B and the rows after B; every row
up to B is dead and deleted a few per commit. A crash before that record
leaves the old rows in effect and the chunks ignored. A checkpoint starts
once the rows hold several times what waits (it costs what waits, so it is
paid for by as many counts again), or after CHECKPOINT_AFTER_ROWS rows.

An erasure or a retention purge takes its counts out of every row that
names them (and drops a checkpoint under way), in its own transaction, so
no row keeps a count, or the fact that a car had one, after its row is gone.
Readers see the table plus `pending`: a read writes nothing.

PostgreSQL does not use this: instances of a shared group each hold their
own `pending`, and an older instance would erase without the journal.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from gateway.store.base import CountKey, EgressCount

log = logging.getLogger("gateway.store")

Entry = tuple[str, str, str, str, str, int]
# A key's count waiting, and since when (immutable: a checkpoint copies the
# dict, not every value).
Waiting = tuple[int, float]
# How long a count may wait in the journal before its car's row gets it.
# Messages of one car and stream within this time cost one upsert.
FOLD_AFTER_S = 30.0
# Each commit folds at least this many due counts (and at least as many as it
# appends): the journal keeps up with any rate of new cars.
FOLD_AT_LEAST = 256
# Keys waiting, at most: bounds memory. A commit's counts of keys that find no
# room go straight into their rows (as without a journal), so many keys per
# car cost no more than upserting them.
MAX_PENDING = 50_000
# A checkpoint starts when the rows in effect hold this many times what waits
# (and at least CHECKPOINT_MIN_COUNTS), or after this many rows: what a
# start reads back stays bounded.
CHECKPOINT_RATIO = 4
CHECKPOINT_MIN_COUNTS = 50_000
CHECKPOINT_AFTER_ROWS = 20_000
# Counts a checkpoint writes per commit, and dead rows deleted per commit:
# a few milliseconds at most.
CHECKPOINT_CHUNK = 2_000
DEAD_ROWS_PER_COMMIT = 32
_META_KEY = "egress_checkpoint"


UPSERT_COUNTS = (
    "INSERT INTO egress_counts VALUES (?,?,?,?,?,?) ON CONFLICT"
    "(vin, day, stream, feature, policy_version) DO UPDATE SET"
    " count = egress_counts.count + excluded.count"
)
_INSERT = "INSERT INTO egress_journal (cycle, first_day, counts) VALUES (?,?,?)"


def _insert(db: sqlite3.Connection, entries: Sequence[Entry], cycle: int = 0) -> None:
    text = json.dumps(entries, separators=(",", ":"))
    db.execute(_INSERT, (cycle, min(e[1] for e in entries), text))


class _Checkpoint:
    def __init__(
        self, upto: int, rows: int, entries: int, snapshot: dict[CountKey, Waiting]
    ) -> None:
        self.upto = upto  # the last row it replaces (also its cycle id)
        self.rows, self.entries = rows, entries  # what it replaces
        # `pending` as of `upto`: a copy of the dict (its values are immutable),
        # read a chunk at a time.
        self.size = len(snapshot)
        self.items = iter(snapshot.items())
        self.written = 0  # of snapshot
        self.chunks = 0


class EgressJournal:
    """The counts not yet in `egress_counts`, and the journal rows that hold them.

    Not thread-safe: the store calls it under its lock, inside its write
    transactions, and applies what a transaction changed only after the
    commit (the callables returned)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # key -> (count, when it began waiting); insertion order is that order.
        self._pending: dict[CountKey, Waiting] = {}
        self._rows = 0  # journal rows in effect
        self._entries = 0  # counts in them
        self._effective = 0  # the checkpoint in effect: rows up to it are dead
        self._dead_upto = 0  # dead rows may remain up to this seq
        self._checkpoint: _Checkpoint | None = None  # under way
        self._not_before_rows = 0  # after a failed upkeep: as many rows again
        self._failing = False
        self._clock = clock

    def load(self, db: sqlite3.Connection) -> None:
        """`pending` from the journal as the last run left it (a checkpoint
        left unfinished is not in effect)."""
        row = db.execute("SELECT value FROM meta WHERE key=?", (_META_KEY,)).fetchone()
        self._effective = int(row[0]) if row else 0
        pending: dict[CountKey, int] = {}
        now, rows, entries = self._clock(), 0, 0
        for (text,) in db.execute(
            f"SELECT counts FROM egress_journal WHERE {self._in_effect()} ORDER BY seq"
        ):
            rows += 1
            counts = json.loads(text)
            entries += len(counts)
            for vin, day, stream, feature, version, n in counts:
                key = (vin, day, stream, feature, version)
                pending[key] = pending.get(key, 0) + n
        self._pending = {k: (n, now) for k, n in pending.items() if n != 0}
        self._rows, self._entries = rows, entries
        self._dead_upto = self._effective
        self._checkpoint = None

    def _in_effect(self) -> str:
        """SQL: the rows in effect (the checkpoint's chunks and the rows after it)."""
        b = self._effective
        return f"((cycle = 0 AND seq > {b}) OR (cycle = {b} AND {b} > 0))"

    # ------------------------------------------------------------------ counts

    def append(self, db: sqlite3.Connection, counts: list[EgressCount]) -> Callable[[], None]:
        """In a write transaction: journal `counts`, fold what is due (its
        negation in the same row). Counts of new keys that find no room under
        MAX_PENDING go straight into their rows. Returns what to apply once
        it is committed."""
        now = self._clock()
        pending = self._pending
        folded = self._due(now, max(FOLD_AT_LEAST, len(counts)))
        room = MAX_PENDING - len(pending) + len(folded)
        refolded = {row[:5] for row in folded}  # their new counts wait anew
        journaled: list[EgressCount] = []
        direct: list[EgressCount] = []
        new: set[CountKey] = set()
        for c in counts:
            key = (c.vin, c.day, c.stream, c.feature, c.policy_version)
            if key in new or (key in pending and key not in refolded):
                journaled.append(c)
            elif room > 0:
                room -= 1
                new.add(key)
                journaled.append(c)
            else:
                direct.append(c)
        if folded or direct:
            db.executemany(UPSERT_COUNTS, [*folded, *direct])
        if journaled or folded:
            # An EgressCount is its row, in column order.
            _insert(db, [*journaled, *((*r[:5], -r[5]) for r in folded)])

        def apply() -> None:
            for row in folded:
                key = row[:5]
                n, since = pending[key]
                if n == row[5]:
                    del pending[key]
                else:  # never: a fold takes all that waits
                    pending[key] = (n - row[5], since)
            for c in journaled:
                key = (c.vin, c.day, c.stream, c.feature, c.policy_version)
                waiting = pending.get(key)
                pending[key] = (
                    (c.count, now) if waiting is None else (waiting[0] + c.count, waiting[1])
                )
            if journaled or folded:
                self._rows += 1
                self._entries += len(journaled) + len(folded)

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
            due.append((*key, n))
        return due

    def waiting(self, vin: str) -> list[EgressCount]:
        """`vin`'s counts not yet in the table."""
        return [EgressCount(*k, v[0]) for k, v in self._pending.items() if k[0] == vin]

    # ------------------------------------------------------------------ upkeep

    @property
    def upkeep_due(self) -> bool:
        """A checkpoint under way or due, or dead rows to delete."""
        return self._checkpoint is not None or self._dead_upto > 0 or self._checkpoint_wanted()

    def upkeep(self, db: sqlite3.Connection) -> Callable[[], None]:
        """In a write transaction: delete a few dead rows; start a checkpoint
        or write its next chunk (the last one puts it in effect). Returns
        what to apply once committed."""
        dead_left = self._dead_upto
        if dead_left:
            deleted = db.execute(
                "DELETE FROM egress_journal WHERE seq IN (SELECT seq FROM egress_journal"
                " WHERE seq <= ? ORDER BY seq LIMIT ?)",
                (self._dead_upto, DEAD_ROWS_PER_COMMIT),
            ).rowcount
            if deleted < DEAD_ROWS_PER_COMMIT:
                dead_left = 0
        cp = self._checkpoint
        if cp is None and not dead_left and self._checkpoint_wanted():
            upto = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM egress_journal").fetchone()[0])
            cp = _Checkpoint(upto, self._rows, self._entries, self._pending.copy())
        chunk: list[Entry] = []
        finished = False
        if cp is not None:
            chunk = [(*k, v[0]) for k, v in itertools.islice(cp.items, CHECKPOINT_CHUNK)]
            if chunk:
                _insert(db, chunk, cycle=cp.upto)
            finished = cp.written + len(chunk) >= cp.size
            if finished:
                db.execute(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                    " SET value=excluded.value",
                    (_META_KEY, str(cp.upto)),
                )
        started = cp

        def apply() -> None:
            self._dead_upto = dead_left
            self._not_before_rows, self._failing = 0, False
            if started is None:
                return
            started.written += len(chunk)
            started.chunks += 1 if chunk else 0
            if finished:
                self._rows += started.chunks - started.rows
                self._entries += started.size - started.entries
                self._effective = self._dead_upto = started.upto
                self._checkpoint = None
            else:
                self._checkpoint = started

        return apply

    def _checkpoint_wanted(self) -> bool:
        return self._rows >= self._not_before_rows and (
            self._rows > CHECKPOINT_AFTER_ROWS
            or self._entries > max(CHECKPOINT_MIN_COUNTS, CHECKPOINT_RATIO * len(self._pending))
        )

    def upkeep_failed(self, exc: Exception) -> None:
        """The checkpoint under way is dropped (its chunks are not in effect);
        tried again after as many rows again: a disk too full for a chunk
        must not cost every commit."""
        self._checkpoint = None
        self._not_before_rows = self._rows + max(1, CHECKPOINT_AFTER_ROWS // 10)
        self._dead_upto = 0  # tried again with the next checkpoint
        if not self._failing:
            log.warning("egress journal upkeep failed (tried again later): %s", exc)
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
        a checkpoint under way is dropped (its chunks that name them are
        deleted; the rest wait to be deleted as dead rows). Returns the
        waiting keys removed, and what to apply once committed."""
        rows = 0
        entries = 0
        b = self._effective
        for seq, cycle, text in db.execute(
            f"SELECT seq, cycle, counts FROM egress_journal WHERE {rows_where}", params
        ).fetchall():
            row: list[Entry] = [tuple(e) for e in json.loads(text)]
            kept = [e for e in row if not drop(e)]
            if len(kept) == len(row):
                continue
            in_effect = (cycle == 0 and seq > b) or (b > 0 and cycle == b)
            if kept and in_effect:
                db.execute(
                    "UPDATE egress_journal SET counts=?, first_day=? WHERE seq=?",
                    (json.dumps(kept, separators=(",", ":")), min(e[1] for e in kept), seq),
                )
            else:  # emptied, dead, or a chunk of a checkpoint under way (dropped)
                db.execute("DELETE FROM egress_journal WHERE seq=?", (seq,))
                rows += 1 if in_effect else 0
            if in_effect:
                entries += len(row) - len(kept)
        gone = [k for k in self._pending if drop(k)]

        dropped = self._checkpoint

        def apply() -> None:
            for key in gone:
                del self._pending[key]
            self._rows -= rows
            self._entries -= entries
            if dropped is not None:
                # Its chunks are dead: deleted once a later checkpoint is in effect.
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
