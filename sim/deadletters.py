"""Dead letters as the checker sees them, and how they account for missing messages.

Contract rule 19: a message a broker refuses is kept in the gateway's durable
dead-letter store and its vehicle message acknowledged. Such a message never
reaches the backend, so the checker would call it lost; it is not lost if a
dead letter stands for it.

Dead letters are sealed (their content is encrypted with a key derived from
the operator's key), so they are matched by what they show in the clear:
the stream (the policy's stream key: `avn/app/{app_id}` for every app), the
subject (a keyed hash of the VIN, first 16 hex characters as the control API
lists it) and the time it was filed. See `account_losses` for the method.

Two sources, both outside the gateway's code:
- the control API, `GET /v1/dead-letters` (operator token): `fetch_dead_letters`;
- the state directory's `consent.sqlite3`, opened read-only:
  `read_dead_letters_from_state`.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUBJECT_CHARS = 16  # the control API lists this prefix of the subject
STORE_FILE = "consent.sqlite3"
DEAD_LETTERS_FILE = "dead_letters.json"
# The checker's publish time and the gateway's filing time come from the same
# clock (one machine); this covers rounding, not clock skew between hosts.
CLOCK_SLACK_S = 1.0


@dataclass(frozen=True)
class DeadLetterRecord:
    id: int
    created_at: float
    subject: str  # first SUBJECT_CHARS hex characters of the keyed subject ("" for none)
    kind: str  # vehicle, command, egress
    edge: str
    stream: str
    reason: str
    code: int
    size: int
    recipient: str = ""  # one recipient of a stream with several ("": all)

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> DeadLetterRecord:
        return cls(
            id=int(item.get("id", 0)),
            created_at=float(item["created_at"]),
            subject=str(item.get("subject", ""))[:SUBJECT_CHARS],
            kind=str(item.get("kind", "")),
            edge=str(item.get("edge", "")),
            stream=str(item["stream"]),
            reason=str(item["reason"]),
            code=int(item.get("code", 0)),
            size=int(item.get("size", 0)),
            recipient=str(item.get("recipient", "")),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fetch_dead_letters(
    base_url: str, token: str, timeout_s: float = 10.0
) -> list[DeadLetterRecord]:
    """Every dead letter, page by page, from the control API."""
    letters: list[DeadLetterRecord] = []
    after = 0
    while True:
        request = urllib.request.Request(
            f"{base_url}/v1/dead-letters?after={after}&limit=1000",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
        letters.extend(DeadLetterRecord.from_json(item) for item in body["dead_letters"])
        if body.get("next_after") is None:
            return letters
        after = int(body["next_after"])


def read_dead_letters_from_state(state_dir: Path) -> list[DeadLetterRecord]:
    """The dead_letters table of a state directory's store, opened read-only (a
    running gateway is not disturbed; the sealed content is not read)."""
    path = (state_dir / STORE_FILE).resolve()
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(dead_letters)")}
        recipient = "recipient" if "recipient" in columns else "''"  # schema < 12: none
        rows = db.execute(
            "SELECT id, created_at, subject, kind, edge, stream, reason, code, size,"
            f" {recipient} FROM dead_letters ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    return [
        DeadLetterRecord(
            int(r[0]),
            float(r[1]),
            str(r[2])[:SUBJECT_CHARS],
            str(r[3]),
            str(r[4]),
            str(r[5]),
            str(r[6]),
            int(r[7]),
            int(r[8]),
            str(r[9]),
        )
        for r in rows
    ]


def save_dead_letters(path: Path, letters: Iterable[DeadLetterRecord]) -> None:
    path.write_text(json.dumps({"dead_letters": [d.to_json() for d in letters]}, indent=1))


def load_dead_letters(path: Path) -> list[DeadLetterRecord]:
    """A file written by `save_dead_letters`, or a saved control API answer."""
    body = json.loads(path.read_text())
    items = body["dead_letters"] if isinstance(body, dict) else body
    return [DeadLetterRecord.from_json(item) for item in items]


@dataclass(frozen=True)
class LostMessage:
    """A message the checker found missing: it must pass, it never arrived."""

    ref: int  # the caller's handle
    vin: str
    stream_key: str  # the policy's stream key, as dead letters name streams
    wall_start: float  # when the car started publishing it


@dataclass
class Accounting:
    matched: list[tuple[LostMessage, DeadLetterRecord]] = field(default_factory=list)
    unaccounted: list[LostMessage] = field(default_factory=list)
    unmatched_letters: list[DeadLetterRecord] = field(default_factory=list)
    by_subject: bool = False  # whether subjects could be used (pseudonym key available)


def account_losses(
    losses: list[LostMessage],
    letters: list[DeadLetterRecord],
    subject_of: Callable[[str], str] | None = None,
) -> Accounting:
    """Match each missing message to at most one dead letter, each letter to at most one
    message.

    A letter can stand for a message when it names the same stream, was filed no
    earlier than the car started to publish the message, and - when `subject_of`
    (VIN -> subject, needs the pseudonym key) is given - names the same car.
    Letters whose subject is no known car's are matched by stream and time only.
    Within a group, letters are taken in filing order and each goes to the
    earliest-published message still unmatched that it can stand for; for this
    kind of constraint (a letter fits every message published before it) that
    matches as many messages as any assignment could.

    What this cannot tell: which of two missing messages of one car and stream a
    letter is for, and whether a letter is for a message that was re-delivered
    later (a gateway killed after filing a letter but before acknowledging
    redelivers the message; its second attempt may be delivered). Unmatched
    letters are reported so such cases stay visible.
    """
    accounting = Accounting(by_subject=subject_of is not None)
    subjects: dict[str, str] = {}
    if subject_of is not None:
        subjects = {loss.vin: subject_of(loss.vin)[:SUBJECT_CHARS] for loss in losses}
    known = set(subjects.values())
    loss_groups: dict[tuple[str, str], list[LostMessage]] = defaultdict(list)
    for loss in losses:
        loss_groups[(subjects.get(loss.vin, ""), loss.stream_key)].append(loss)
    letter_groups: dict[tuple[str, str], list[DeadLetterRecord]] = defaultdict(list)
    anonymous: list[DeadLetterRecord] = []
    for letter in letters:
        if letter.subject in known:
            letter_groups[(letter.subject, letter.stream)].append(letter)
        else:
            anonymous.append(letter)
    leftover: list[LostMessage] = []
    for key, group in loss_groups.items():
        matched, rest, unused = _match(group, letter_groups.pop(key, []))
        accounting.matched.extend(matched)
        leftover.extend(rest)
        accounting.unmatched_letters.extend(unused)
    for unused_group in letter_groups.values():
        accounting.unmatched_letters.extend(unused_group)
    # Second pass: letters that name no known car, by stream and time only.
    by_stream: dict[str, list[LostMessage]] = defaultdict(list)
    for loss in leftover:
        by_stream[loss.stream_key].append(loss)
    anonymous_by_stream: dict[str, list[DeadLetterRecord]] = defaultdict(list)
    for letter in anonymous:
        anonymous_by_stream[letter.stream].append(letter)
    for stream, group in by_stream.items():
        matched, rest, unused = _match(group, anonymous_by_stream.pop(stream, []))
        accounting.matched.extend(matched)
        accounting.unaccounted.extend(rest)
        accounting.unmatched_letters.extend(unused)
    for unused_group in anonymous_by_stream.values():
        accounting.unmatched_letters.extend(unused_group)
    accounting.unaccounted.sort(key=lambda loss: loss.ref)
    accounting.unmatched_letters.sort(key=lambda letter: letter.id)
    return accounting


def _match(
    losses: list[LostMessage], letters: list[DeadLetterRecord]
) -> tuple[list[tuple[LostMessage, DeadLetterRecord]], list[LostMessage], list[DeadLetterRecord]]:
    pending = sorted(losses, key=lambda loss: (loss.wall_start, loss.ref))
    eligible: list[tuple[float, int, LostMessage]] = []
    matched: list[tuple[LostMessage, DeadLetterRecord]] = []
    unused: list[DeadLetterRecord] = []
    position = 0
    for letter in sorted(letters, key=lambda d: (d.created_at, d.id)):
        while (
            position < len(pending)
            and pending[position].wall_start <= letter.created_at + CLOCK_SLACK_S
        ):
            loss = pending[position]
            heapq.heappush(eligible, (loss.wall_start, loss.ref, loss))
            position += 1
        if eligible:
            matched.append((heapq.heappop(eligible)[2], letter))
        else:
            unused.append(letter)
    rest = [item[2] for item in eligible] + pending[position:]
    return matched, rest, unused
