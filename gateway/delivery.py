"""Delivery outcomes, refusal classes and dead letters.

A message a broker refuses must not sit in the ordered ack window: MQTT
acknowledges in arrival order, so one message retried forever stalls every
car behind it. A refusal is retried briefly when its reason code says the
broker might accept it later, then the message becomes a dead letter: kept
durably (sealed, since it is personal data), counted, listed by the control
API, erased with its car and bound by retention, and its upstream message
is acknowledged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from enum import Enum, StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class Outcome(Enum):
    """What finally happened to one publish (what the ack window needs to know)."""

    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"


# MQTT v5 PUBACK reason codes a broker may accept on a later attempt: a busy
# or over-quota broker, a packet id clash, an unspecified error. Everything
# else at or above 0x80 (not authorized 0x87, topic name invalid 0x90, packet
# too large 0x95, payload format invalid 0x99, ...) will be refused again.
TRANSIENT_CODES = frozenset({0x80, 0x83, 0x89, 0x91, 0x97})

# Retries of a transient refusal: about one second in all, short enough that
# the ack window (in arrival order) is not held for long.
RETRY_DELAYS_S = (0.1, 0.2, 0.3, 0.4)


def is_transient(code: int) -> bool:
    return code in TRANSIENT_CODES


def refusal_reason(code: int) -> str:
    """A stable label for metrics and listings (bounded: one per reason code)."""
    return _REASONS.get(code, f"refused_0x{code:02x}")


_REASONS = {
    0x80: "unspecified_error",
    0x83: "implementation_specific_error",
    0x87: "not_authorized",
    0x89: "server_busy",
    0x90: "topic_name_invalid",
    0x91: "packet_id_in_use",
    0x95: "packet_too_large",
    0x97: "quota_exceeded",
    0x99: "payload_format_invalid",
}


class DeadLetterKind(StrEnum):
    VEHICLE = "vehicle"  # a vehicle message: re-driving decides it again under current consent
    COMMAND = "command"  # a backend command: re-driving decides it again
    EGRESS = "egress"  # a message the gateway itself produced: re-driving republishes it


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be delivered. Only `sealed` holds content;
    the rest is what an operator needs to decide what to do with it."""

    created_at: float
    expires_at: float
    subject: str  # keyed hash of the VIN ("" when none), the erasure key
    kind: DeadLetterKind
    edge: str  # where the publish was refused
    stream: str
    feature: str
    reason: str
    code: int
    attempts: int
    size: int  # bytes of the refused payload
    sealed: bytes
    id: int = 0  # assigned by the store
    # The one recipient of a multi-recipient stream this letter is for ("":
    # every recipient of the stream): a re-drive sends only its copy.
    recipient: str = ""


class DeadLetterSeal:
    """AES-256-GCM over (topic, payload), bound to the row's subject.

    The key is derived from the operator's pseudonymization key, so a copy
    of the database alone reveals no message content.
    """

    def __init__(self, key: bytes, purpose: bytes = b"dead-letter-seal") -> None:
        # One derived key per purpose (dead letters, parked messages).
        derived = hmac.new(key, purpose + b"\x00v1", hashlib.sha256).digest()
        self._aead = AESGCM(derived)

    def seal(self, topic: str, payload: bytes, subject: str) -> bytes:
        nonce = os.urandom(12)
        topic_bytes = topic.encode()
        plain = struct.pack(">I", len(topic_bytes)) + topic_bytes + payload
        return nonce + self._aead.encrypt(nonce, plain, subject.encode())

    def open(self, sealed: bytes, subject: str) -> tuple[str, bytes]:
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], subject.encode())
        except InvalidTag as exc:
            raise ValueError("dead letter does not open with this key") from exc
        (length,) = struct.unpack_from(">I", plain)
        return plain[4 : 4 + length].decode(), plain[4 + length :]
