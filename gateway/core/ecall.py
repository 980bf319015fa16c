"""eCall conformance (contract rule 18): bounded, and never refused.

eCall is a legal obligation, so it is forwarded whatever the car's privacy
settings say; what the gateway guarantees instead is that it stays what the
contract says it is. A conforming eCall leaves byte for byte. One that is
not (more than three recent positions, fields outside the contract, or over
the size limit) is trimmed to the contract's fields and still forwarded.
"""

from __future__ import annotations

from telematics.v1 import streams_pb2

MAX_RECENT_POSITIONS = 3
MAX_TEXT_CHARS = 64  # vehicle_type, propulsion: short codes in the contract


def conform_ecall(message: streams_pb2.ECall, payload: bytes, max_bytes: int) -> bytes | None:
    """None when `payload` conforms; else the trimmed message's bytes."""
    if len(message.recent_positions) <= MAX_RECENT_POSITIONS and len(payload) <= max_bytes:
        message.DiscardUnknownFields()
        if message.ByteSize() == len(payload):
            return None
    message.DiscardUnknownFields()
    del message.recent_positions[MAX_RECENT_POSITIONS:]
    for point in (message.position, *message.recent_positions):
        point.DiscardUnknownFields()
    if message.ByteSize() > max_bytes:
        message.vehicle_type = message.vehicle_type[:MAX_TEXT_CHARS]
        message.propulsion = message.propulsion[:MAX_TEXT_CHARS]
    return message.SerializeToString()
