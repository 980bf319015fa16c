"""Append-only, hash-chained audit ledger (in the consent store's database).

Each entry commits to the previous entry's hash. Personal content is kept
apart from the chain: the chain covers a hash of the content, so erasure can
replace the content by a tombstone and the chain still verifies. Subjects are
recorded as a keyed hash of the VIN, never the VIN itself.

The content hash is keyed (`hmac:` + HMAC-SHA-256 under a key derived from
the pseudonymization key): content is small and guessable (a revision, a few
feature flags), so a plain hash of an erased entry would let anyone with a VIN
and a guess confirm it. Entries written before (schema < 8) keep their plain
SHA-256 and verify as they are. Their content named the VIN; the schema-8
migration removed it, kept per entry the hash of the content as redacted
(`redacted_hash`), and chained a `ledger_redacted` entry with a digest of
every (entry, redacted hash): the chain still tells a redacted entry from a
tampered one, and erasing a redacted entry's content later keeps it so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq          INTEGER PRIMARY KEY,
    at           REAL NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    subject      TEXT NOT NULL,
    content      TEXT,
    content_hash TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    entry_hash   TEXT NOT NULL,
    redacted_hash TEXT  -- schema 8: SHA-256 of the content as redacted (see below)
);
CREATE INDEX IF NOT EXISTS audit_log_subject ON audit_log (subject);
"""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    actor: str  # token name, "vehicle", "gateway"
    action: str  # settings_applied, policy_pushed, policy_rolled_back, restriction_*, erasure, ...
    subject: str  # keyed hash of a VIN, or "" / a policy version
    content: dict[str, Any]
    at: float


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


KEYED_PREFIX = "hmac:"
REDACTED_ACTION = "ledger_redacted"


def ledger_key(pseudonymization_key: bytes) -> bytes:
    """The content-hash key: derived, so it is rotated with the key it derives from."""
    return hmac.new(pseudonymization_key, b"audit-ledger-content", hashlib.sha256).digest()


def content_hash(content_json: str, key: bytes | None = None) -> str:
    """Keyed when `key` is given (every entry the gateway writes); plain SHA-256
    for entries of schema < 8 and for stores opened without a key (tools)."""
    if key is None:
        return hashlib.sha256(content_json.encode()).hexdigest()
    return KEYED_PREFIX + hmac.new(key, content_json.encode(), hashlib.sha256).hexdigest()


def redaction_digest(entries: list[tuple[int, str]]) -> str:
    """Digest of (seq, SHA-256 of the content as redacted) of every redacted entry."""
    return hashlib.sha256(_canonical(sorted(entries)).encode()).hexdigest()


def entry_hash(
    seq: int, at: float, actor: str, action: str, subject: str, c_hash: str, prev: str
) -> str:
    body = _canonical([seq, repr(at), actor, action, subject, c_hash, prev])
    return hashlib.sha256(body.encode()).hexdigest()


def append(db: sqlite3.Connection, record: AuditRecord, key: bytes | None = None) -> int:
    """Append inside the caller's transaction. Returns the new sequence number."""
    row = db.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
    body = _canonical(record.content)
    c_hash = content_hash(body, key)
    # The time as the column keeps it (a float): an int would hash otherwise.
    at = float(record.at)
    digest = entry_hash(seq, at, record.actor, record.action, record.subject, c_hash, prev)
    db.execute(
        "INSERT INTO audit_log (seq, at, actor, action, subject, content, content_hash,"
        " prev_hash, entry_hash) VALUES (?,?,?,?,?,?,?,?,?)",
        (seq, at, record.actor, record.action, record.subject, body, c_hash, prev, digest),
    )
    return seq


def scrub_subject(db: sqlite3.Connection, subject: str) -> int:
    """Erasure: drop the personal content of a subject's entries; keep the chain."""
    cur = db.execute(
        "UPDATE audit_log SET content=NULL WHERE subject=? AND content IS NOT NULL", (subject,)
    )
    return cur.rowcount


def redact_vins(db: sqlite3.Connection, key: bytes, at: float) -> int:
    """Schema 8: remove the `vin` key from every entry's content, inside the
    caller's transaction, and chain a `ledger_redacted` entry recording which
    entries changed and into what. Returns how many entries changed."""
    changed: list[tuple[int, str]] = []
    rows = db.execute("SELECT seq, content FROM audit_log WHERE content LIKE '%\"vin\"%'")
    for seq, content in rows.fetchall():
        value = json.loads(content)
        if not isinstance(value, dict) or "vin" not in value:
            continue
        del value["vin"]
        body = _canonical(value)
        redacted = content_hash(body)
        db.execute(
            "UPDATE audit_log SET content=?, redacted_hash=? WHERE seq=?", (body, redacted, seq)
        )
        changed.append((int(seq), redacted))
    if changed:
        append(
            db,
            AuditRecord(
                actor="gateway",
                action=REDACTED_ACTION,
                subject="",
                content={
                    "reason": "schema 8: the VIN removed from the content of earlier entries",
                    "entries": len(changed),
                    "digest": redaction_digest(changed),
                },
                at=at,
            ),
            key,
        )
    return len(changed)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    entries: int
    head: str
    problems: list[str]
    redacted: int = 0  # content changed by the schema-8 migration, as its entry records
    unchecked: int = 0  # keyed content hashes not checked (opened without the key)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(db: sqlite3.Connection, key: bytes | None = None) -> VerifyResult:
    """Recompute the chain: any edited, inserted or removed entry shows up."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    count = redacted = unchecked = 0
    # What the schema-8 migration changed, and what its chained entry says it changed.
    columns = {str(r[1]) for r in db.execute("PRAGMA table_info(audit_log)")}
    marks = (
        {
            int(seq): str(h)
            for seq, h in db.execute(
                "SELECT seq, redacted_hash FROM audit_log WHERE redacted_hash IS NOT NULL"
            )
        }
        if "redacted_hash" in columns  # a store of schema < 8 not re-keyed yet
        else {}
    )
    vouched = not marks
    for row in db.execute(
        "SELECT seq, at, actor, action, subject, content, content_hash, prev_hash, entry_hash"
        " FROM audit_log ORDER BY seq"
    ):
        seq, at, actor, action, subject, content, c_hash, prev_hash, digest = row
        count += 1
        if seq != expected_seq:
            problems.append(f"entry {expected_seq}: missing (next entry is {seq})")
        if prev_hash != prev:
            problems.append(f"entry {seq}: does not chain to the previous entry")
        if content is not None:
            keyed = str(c_hash).startswith(KEYED_PREFIX)
            if keyed and key is None:
                unchecked += 1
                vouched = vouched or action == REDACTED_ACTION  # unchecked, as said
            elif content_hash(content, key if keyed else None) == c_hash:
                if action == REDACTED_ACTION and marks:
                    recorded = json.loads(content)
                    vouched = recorded.get("entries") == len(marks) and recorded.get(
                        "digest"
                    ) == redaction_digest(list(marks.items()))
            elif marks.get(seq) == content_hash(content):
                redacted += 1
            else:
                problems.append(f"entry {seq}: content was modified")
        if entry_hash(seq, at, actor, action, subject, c_hash, prev_hash) != digest:
            problems.append(f"entry {seq}: entry fields were modified")
        prev = digest
        expected_seq = seq + 1
    if not vouched:
        problems.append("redacted entries do not match the ledger_redacted entry")
    return VerifyResult(count, prev, problems, redacted, unchecked)
