"""The header of a vehicle message, read without parsing the message.

A message the car's current settings drop (privacy mode, a feature off,
restriction, objection) needs only its header to be decided: the VIN it
names (a mismatch is a spoof, reported as such) and the settings revision it
was captured under (a newer one than the applied is held, rule 12). Nearly
half of a typical fleet's messages end so, and a full protobuf parse is most
of their cost.

The reader answers only for payloads whose header the protobuf parser would
read the same way, and None for anything else, which then takes the full
parse: every stream message has `Header header = 1`, and Header has
`string vin = 1` and `uint64 settings_revision = 4`. It walks every
top-level field (so a second header, which the parser would merge into the
first, is seen) and every header field (the last occurrence of a scalar
wins, as in the parser). What it does not check is the inside of the other
top-level fields: a dropped message whose body would not decode is reported
under the setting that drops it, not as undecodable.
"""

from __future__ import annotations

from typing import Final

# Final: compiled, a constant, not a lookup in the module's namespace.
# Wire types (protobuf encoding).
_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_I32: Final = 5
_MAX_VARINT_BYTES: Final = 10  # a negative int32 takes all ten
_UINT64_END: Final = 1 << 64


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or (-1, -1) when absent or too long."""
    byte = data[pos] if pos < end else 0x100
    if byte < 0x80:  # tags, lengths and small values: one byte
        return byte, pos + 1
    value = 0
    shift = 0
    limit = pos + _MAX_VARINT_BYTES
    if limit > end:
        limit = end
    while pos < limit:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, -1


def _skip(data: bytes, pos: int, end: int, wire_type: int) -> int:
    """The position after a field's value, or -1 when it does not fit."""
    if wire_type == _VARINT:
        _, after = _varint(data, pos, end)
        return after
    if wire_type == _I64:
        after = pos + 8
    elif wire_type == _I32:
        after = pos + 4
    elif wire_type == _LEN:
        length, pos = _varint(data, pos, end)
        if length < 0:
            return -1
        after = pos + length
    else:  # groups (3, 4) and invalid types: not in these messages
        return -1
    return after if after <= end else -1


def peek_header(payload: bytes) -> tuple[str, int] | None:
    """(header.vin, header.settings_revision) as the parser would read them,
    or None when the payload is not plainly one message with one header."""
    end = len(payload)
    pos = 0
    header_start = -1
    header_end = -1
    while pos < end:
        tag, pos = _varint(payload, pos, end)
        if tag <= 7:  # field number 0 is invalid; -1: a broken tag
            return None
        wire_type = tag & 7
        if tag >> 3 == 1:
            if wire_type != _LEN or header_start >= 0:
                return None  # not a header, or a second one (merged by the parser)
            length, pos = _varint(payload, pos, end)
            if length < 0 or pos + length > end:
                return None
            header_start, header_end = pos, pos + length
            pos = header_end
            continue
        pos = _skip(payload, pos, end, wire_type)
        if pos < 0:
            return None
    if header_start < 0:
        return None
    vin_start = vin_end = 0
    revision = 0
    pos = header_start
    while pos < header_end:
        tag, pos = _varint(payload, pos, header_end)
        if tag <= 7:
            return None
        field, wire_type = tag >> 3, tag & 7
        if field == 1:
            if wire_type != _LEN:
                return None
            length, pos = _varint(payload, pos, header_end)
            if length < 0 or pos + length > header_end:
                return None
            vin_start, vin_end = pos, pos + length
            pos += length
        elif field == 4:
            if wire_type != _VARINT:
                return None
            revision, pos = _varint(payload, pos, header_end)
            if revision < 0 or revision >= _UINT64_END:
                return None  # the parser would truncate it
        else:
            pos = _skip(payload, pos, header_end, wire_type)
            if pos < 0:
                return None
    try:
        return payload[vin_start:vin_end].decode("utf-8"), revision
    except UnicodeDecodeError:
        return None  # the parser refuses it: its reason is its own
