"""Identity privacy: pseudonyms that link to nothing (contract rules 15 and 16).

- Pseudonyms derive from (operator key, purpose, vehicle, epoch). Epoch 0 is
  exactly the pseudonym of earlier releases (app backends keep their users
  across an upgrade); an erasure starts the next epoch, after which nothing
  in pseudonymized egress links to before.
- A pseudonymized stream shares no value with the car's VIN-keyed streams:
  `header.seq` becomes a keyed hash of (pseudonym, seq), the capture time is
  coarsened to an operator-set step, every other header field is cleared.
- The VIN is searched in opaque bytes (best effort: encryption defeats it).

Pure functions and one small in-memory book; no I/O, no clock.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from google.protobuf.message import Message

from gateway.core.transforms import hmac_sha256, normalize_mac, pseudonym, pseudonymize_field
from telematics.v1 import common_pb2, privacy_pb2

# Header fields a pseudonymized message keeps (rewritten); every other one,
# present or added later (settings_revision), is cleared.
KEPT_HEADER_FIELDS: Final = frozenset({"vin", "seq", "timestamp_ms"})
# Purpose of the keyed VIN hash that names a car inside the gateway (audit
# subject, identity row, log reference).
SUBJECT_PURPOSE: Final = "audit-subject"


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """What survives an erasure, keyed by the car's keyed VIN hash: the
    pseudonym epoch, the revision floor (settings up to it are void) and
    whether processing was restricted."""

    epoch: int
    revision_floor: int
    restricted: bool
    # Owners the car had before the current one: a new owner gets a new grid
    # offset (the previous owner's coarse values do not place the new one's).
    ownership: int = 0


class IdentityBook:
    """Per-car identity state the decision reads (owned by the service).

    `rows` holds only cars that were ever erased (keyed by subject hash, as
    stored); `epochs` resolves a VIN to its epoch once the car is known
    again. A car absent from both is at epoch 0.
    """

    __slots__ = ("epochs", "ownerships", "rows")

    def __init__(
        self, rows: Mapping[str, IdentityRow] | None = None, epochs: Mapping[str, int] | None = None
    ) -> None:
        self.rows: dict[str, IdentityRow] = dict(rows or {})
        self.epochs: dict[str, int] = dict(epochs or {})
        self.ownerships: dict[str, int] = {}

    def epoch(self, vin: str) -> int:
        return self.epochs.get(vin, 0)

    def learn(self, vin: str, row: IdentityRow) -> None:
        """The VIN behind a stored row is known: its epoch and owner apply."""
        self.epochs[vin] = row.epoch
        if row.ownership:
            self.ownerships[vin] = row.ownership

    def placement(self, vin: str) -> str:
        """What the car's grid offset is derived from: the VIN for its first
        owner (the offsets of earlier releases), the VIN and owner after."""
        ownership = self.ownerships.get(vin, 0)
        return vin if not ownership else f"{vin}\x00owner-{ownership}"

    def row(self, key: bytes, vin: str) -> IdentityRow | None:
        if not self.rows:
            return None
        return self.rows.get(subject(key, vin))


def subject(key: bytes, vin: str) -> str:
    """Keyed hash of a VIN naming the car inside the gateway (never the VIN)."""
    return pseudonym(key, SUBJECT_PURPOSE, vin)


def epoch_pseudonym(key: bytes, purpose: str, value: str, epoch: int) -> str:
    """Keyed pseudonym of `value` for `purpose` in `epoch`.

    Epoch 0 is the pseudonym of earlier releases. Later epochs use a purpose
    no earlier release used ('@' never occurs in a purpose: app ids and field
    names cannot contain it), so epochs are unrelated to each other.
    """
    if epoch == 0:
        return pseudonym(key, purpose, value)
    return pseudonym(key, f"{purpose}@{epoch}", value)


def vin_ref(key: bytes, scope: str, vin: str, epoch: int = 0) -> str:
    """The `{ref}` of a pseudonymized stream (`scope`: app id or stream key)."""
    return epoch_pseudonym(key, f"vin/{scope}", vin, epoch)


def app_scope(app_id: str, rotation_days: int, now: float) -> str:
    """The pseudonym scope of an app: its id, plus the rotation period `now`
    falls in when the app's pseudonyms rotate ('#' never occurs in an app id).
    Periods are aligned for every car, so all rotate at the same instant."""
    if rotation_days <= 0:
        return app_id
    return f"{app_id}#{int(now // (rotation_days * 86400))}"


def pseudonymize_vehicle_field(
    key: bytes, field_name: str, value: str, vin: str, epoch: int = 0
) -> str:
    """A field pseudonym. A Bluetooth MAC is keyed per vehicle and epoch (one
    phone in two cars gives two unrelated values); other fields keep their
    per-field domain (their streams are VIN-keyed, linkable anyway)."""
    if field_name == "bluetooth_mac":
        return epoch_pseudonym(key, f"bluetooth_mac/{vin}", normalize_mac(value), epoch)
    return pseudonymize_field(key, field_name, value)


def seq_token(key: bytes, ref: str, seq: int) -> int:
    """Keyed hash of (pseudonym, seq) as a uint64: the same message always
    maps to the same value (duplicates stay recognisable), and nothing links
    it to the car's counter or to another pseudonym's."""
    digest = hmac_sha256(key, b"header-seq\x00" + ref.encode() + b"\x00" + seq.to_bytes(8, "big"))
    return int.from_bytes(digest[:8], "big")


def coarsen_timestamp(timestamp_ms: int, step_ms: int) -> int:
    """Down to a multiple of `step_ms` (0 stays 0: not stated)."""
    if step_ms <= 0 or timestamp_ms == 0:
        return timestamp_ms
    return timestamp_ms - timestamp_ms % step_ms


def pseudonymize_header(key: bytes, header: common_pb2.Header, ref: str, step_ms: int) -> None:
    """Rewrite a header in place so it shares no value with VIN streams."""
    seq, timestamp_ms = header.seq, header.timestamp_ms
    for field in header.DESCRIPTOR.fields:
        if field.name not in KEPT_HEADER_FIELDS:
            header.ClearField(field.name)
    header.vin = ref
    header.seq = seq_token(key, ref, seq)
    header.timestamp_ms = coarsen_timestamp(timestamp_ms, step_ms)


def app_id_mismatch(message: Message, app_id: str) -> str | None:
    """The value of an `app_id` field that differs from the topic's app id."""
    field = message.DESCRIPTOR.fields_by_name.get("app_id")
    if field is None or field.type != field.TYPE_STRING or field.is_repeated:
        return None
    value = str(getattr(message, field.name))
    return value if value != app_id else None


# --------------------------------------------------------------------------
# The VIN in opaque bytes (best effort)

# Dropped before comparing: separators people and encoders put between
# characters, and NUL (UTF-16LE/BE text of ASCII becomes ASCII).
_STRIP: Final = b" \t\r\n\x00-_.:/\\|,;'\"+"
_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_HEX_CHARS: Final = b"0123456789abcdef"  # searched in lower-cased text
_B64_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_MIN_HEX_RUN: Final = 34  # 17 characters
_MIN_B64_RUN: Final = 23  # 17 bytes


def _class_table(members: bytes) -> bytes:
    return bytes(ord("x") if c in members else ord(".") for c in range(256))


_HEX_TABLE: Final = _class_table(_HEX_CHARS)
_B64_TABLE: Final = _class_table(_B64_CHARS)


def _runs(data: bytes, table: bytes, min_len: int) -> Iterator[bytes]:
    """Maximal runs of at least `min_len` bytes of one character class, found
    with C-speed searches over a class mask (a regex retries at every byte)."""
    mask = data.translate(table)
    needle = b"x" * min_len
    start = mask.find(needle)
    while start != -1:
        end = mask.find(b".", start + min_len)
        if end == -1:
            end = len(mask)
        yield data[start:end]
        start = mask.find(needle, end)


# Escapes that write one byte as hex digits (`\\u00` for text of ASCII).
_HEX_ESCAPES: Final = (b"\\u00", b"\\x", b"%", b"0x", b"&#x")
# At least 17 numbers of 1-3 digits with short separators between them.
_DECIMAL_LIST: Final = re.compile(rb"\d{1,3}(?:[^0-9a-z]{1,4}\d{1,3}){16,}")
_DECIMAL: Final = re.compile(rb"\d{1,3}")
# Lower-cased bytes by class for the decimal list's precondition: each of its
# 16 repeats starts where a separator ([^0-9a-z]) meets a digit.
_DECIMAL_CLASS_TABLE: Final = bytes(
    ord("d") if 48 <= c <= 57 else ord("a") if 97 <= c <= 122 else ord("s") for c in range(256)
)
_DECIMAL_REPEATS: Final = 16


def _in_hex_runs(flat: bytes, target: bytes) -> bool:
    """Whether a run of hex digits in `flat` decodes (either alignment) to text
    holding `target`."""
    for run in _runs(flat, _HEX_TABLE, _MIN_HEX_RUN):
        for start in (0, 1):
            part = run[start : start + (len(run) - start) // 2 * 2]
            if target in _canon(bytes.fromhex(part.decode())):
                return True
    return False


def _canon(data: bytes) -> bytes:
    return data.translate(None, _STRIP).lower()


@lru_cache(maxsize=4096)
def _target(vin: str) -> bytes:
    return _canon(vin.encode())


def vin_in_bytes(data: bytes, vin: str, written: bytes = b"", written_at: int = 0) -> bool:
    """Whether `data` holds the VIN: in any letter case, with separators, as
    UTF-16LE/BE, as hex, or as base64 (standard or URL-safe, any alignment).
    A detector, not a guarantee: encrypted or otherwise encoded VINs pass.

    Every pseudonymized copy pays for this search, so each encoding is tried
    only where its necessary condition holds (cheap C-speed scans first).

    `written` at `written_at`: the value the gateway wrote there itself (the
    copy's pseudonym in its header, a keyed hash), searched as a separator.
    Its 32 hex characters read as a base64 run, which cost four decodes per
    copy, two thirds of the search. Only that one occurrence: the same value
    in the car's own bytes is searched as they are, so a car that learnt its
    pseudonym cannot splice a VIN around it."""
    target = _target(vin)
    if not target:
        return False
    if written and data.startswith(written, written_at):
        data = data[:written_at] + b"\xff" + data[written_at + len(written) :]
    flat = _canon(data)
    if target in flat or _in_hex_runs(flat, target):
        return True
    low = data.lower()
    if b"\\u00" in low or b"\\x" in low or b"%" in low or b"0x" in low or b"&#x" in low:
        # \u0057, \x57, %57, 0x57, &#x57; -> 57: the hex digits of each byte.
        unescaped = low
        for prefix in _HEX_ESCAPES:
            unescaped = unescaped.replace(prefix, b"")
        if _in_hex_runs(_canon(unescaped.replace(b";", b"")), target):
            return True
    if low.translate(_DECIMAL_CLASS_TABLE).count(b"sd") >= _DECIMAL_REPEATS:
        for match in _DECIMAL_LIST.finditer(low):
            # Byte arrays written as numbers: [87, 86, ...], "87 86 ...", &#87;&#86;...
            numbers = [int(n) for n in _DECIMAL.findall(match.group())]
            if max(numbers) < 256 and target in _canon(bytes(numbers)):
                return True
    compact = data.translate(None, b" \t\r\n")
    for run in _runs(compact, _B64_TABLE, _MIN_B64_RUN):
        run = run.translate(_URLSAFE)
        for start in range(4):
            part = run[start:]
            if len(part) % 4 == 1:
                part = part[:-1]
            try:
                # What base64.b64decode does (non-strict), without its wrapper;
                # the padding is implied.
                decoded = binascii.a2b_base64(part + b"=" * (-len(part) % 4))
            except binascii.Error:
                continue
            if target in _canon(decoded):
                return True
    return False


# --------------------------------------------------------------------------
# Erasure events (rule 16)


@dataclass(frozen=True, slots=True)
class ErasureEvents:
    vin_events: tuple[tuple[str, bytes], ...]  # (topic, payload): one per VIN-keyed recipient
    app_events: tuple[tuple[float, str, bytes], ...]  # (due_at, topic, payload)
    refs: tuple[str, ...]


def restriction_event(
    backend_prefix: str, vin: str, restricted: bool, at: float
) -> tuple[str, bytes]:
    """`tsp/{vin}/restriction`: the backend marks (or unmarks) what it stores of
    the car (Art. 18). VIN-keyed: it names no app ref."""
    event = privacy_pb2.RestrictionEvent(vin=vin, restricted=restricted, at_ms=int(at * 1000))
    return f"{backend_prefix}/{vin}/restriction", event.SerializeToString()


def ownership_event(backend_prefix: str, vin: str, at: float) -> tuple[str, bytes]:
    """`tsp/{vin}/ownership`: the backend unlinks the car from its previous owner."""
    event = privacy_pb2.OwnershipEvent(vin=vin, at_ms=int(at * 1000))
    return f"{backend_prefix}/{vin}/ownership", event.SerializeToString()


def erasure_events(
    key: bytes,
    vin_prefixes: Sequence[str],
    vin: str,
    targets: Sequence[tuple[str, str, str]],
    epoch: int,
    now: float,
    delays: Sequence[float],
    step_ms: int,
) -> ErasureEvents:
    """One VIN event (only the VIN) per prefix of a recipient that got the VIN,
    and one event per pseudonym (only that ref, on the pseudonymized stream's
    own topic at its recipient, due after its own delay from `delays`).
    `targets` are (prefix, pseudonym scope, stream topic) triples: one per
    recipient of a pseudonymized stream the car used, and per rotation period
    when an app's pseudonyms rotate.

    A pseudonym's event states when it is published (coarsened), never the
    erasure time of the VIN event, so no field pairs them.
    """
    vin_event = privacy_pb2.ErasureEvent(vin=vin, erased_at_ms=int(now * 1000), reason="art17")
    body = vin_event.SerializeToString()
    events: list[tuple[float, str, bytes]] = []
    refs: list[str] = []
    for (prefix, scope, relative), delay in zip(targets, delays, strict=True):
        ref = vin_ref(key, scope, vin, epoch)
        due = now + delay
        event = privacy_pb2.ErasureEvent(
            refs=[ref],
            erased_at_ms=coarsen_timestamp(int(due * 1000), step_ms),
            reason="art17",
        )
        refs.append(ref)
        events.append((due, f"{prefix}/{ref}/{relative}/erasure", event.SerializeToString()))
    return ErasureEvents(
        tuple((f"{prefix}/{vin}/erasure", body) for prefix in vin_prefixes),
        tuple(events),
        tuple(refs),
    )
