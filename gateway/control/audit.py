"""Append-only, hash-chained audit ledger (in the consent store's database).

Each entry commits to the previous entry's hash. Personal content is kept
apart from the chain: the chain covers a hash of the content, so erasure can
replace the content by a tombstone and the chain still verifies. Subjects are
recorded as a keyed hash of the VIN, never the VIN itself.
"""

from __future__ import annotations

import hashlib
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
    entry_hash   TEXT NOT NULL
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


def content_hash(content_json: str) -> str:
    return hashlib.sha256(content_json.encode()).hexdigest()


def entry_hash(
    seq: int, at: float, actor: str, action: str, subject: str, c_hash: str, prev: str
) -> str:
    body = _canonical([seq, repr(at), actor, action, subject, c_hash, prev])
    return hashlib.sha256(body.encode()).hexdigest()


def append(db: sqlite3.Connection, record: AuditRecord) -> int:
    """Append inside the caller's transaction. Returns the new sequence number."""
    row = db.execute("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
    body = _canonical(record.content)
    c_hash = content_hash(body)
    digest = entry_hash(seq, record.at, record.actor, record.action, record.subject, c_hash, prev)
    db.execute(
        "INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?)",
        (seq, record.at, record.actor, record.action, record.subject, body, c_hash, prev, digest),
    )
    return seq


def scrub_subject(db: sqlite3.Connection, subject: str) -> int:
    """Erasure: drop the personal content of a subject's entries; keep the chain."""
    cur = db.execute(
        "UPDATE audit_log SET content=NULL WHERE subject=? AND content IS NOT NULL", (subject,)
    )
    return cur.rowcount


@dataclass(frozen=True, slots=True)
class VerifyResult:
    entries: int
    head: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(db: sqlite3.Connection) -> VerifyResult:
    """Recompute the chain: any edited, inserted or removed entry shows up."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    count = 0
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
        if content is not None and content_hash(content) != c_hash:
            problems.append(f"entry {seq}: content was modified")
        if entry_hash(seq, at, actor, action, subject, c_hash, prev_hash) != digest:
            problems.append(f"entry {seq}: entry fields were modified")
        prev = digest
        expected_seq = seq + 1
    return VerifyResult(entries=count, head=prev, problems=problems)
