"""The header of a vehicle message, read without parsing the message.

A message the car's current settings drop (privacy mode, a feature off,
restriction, objection) needs only its header to be decided: the VIN it
names (a mismatch is a spoof, reported as such) and the settings revision it
was captured under (a newer one than the applied is held, rule 12). Nearly
half of a typical fleet's messages end so, and a full protobuf parse is most
of their cost.

The reader answers only for payloads whose header every protobuf parser reads
the same way, and None for anything else, which then takes the full parse:
every stream message has `Header header = 1`, and Header has `string vin = 1`
and `uint64 settings_revision = 4`. It walks every top-level field (so a
second header, which a parser would merge into the first, is seen) and every
header field (the last revision wins, as in a parser). Tags and lengths must
be in their shortest form, as every encoder writes them: a parser that looks
fields up by their tag bytes (protobuf's pure-Python one) would read a padded
tag as another field. What it does not check is the inside of the other
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
_MAX_TAG_BYTES: Final = 5  # tags and lengths are 32-bit
_UINT32_END: Final = 1 << 32
_UINT64_END: Final = 1 << 64
# Top-level fields walked before leaving the payload to the parser: a real
# message has a few dozen; a flood of tiny fields is the parser's to refuse.
_MAX_FIELDS: Final = 256


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


def _shortest(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A tag or length: as `_varint`, and (-1, -1) unless it is in its
    shortest form and 32-bit (what upb accepts and every encoder writes)."""
    start = pos
    value, pos = _varint(data, pos, end)
    if value < 0 or value >= _UINT32_END or pos - start > _MAX_TAG_BYTES:
        return -1, -1
    if pos - start > 1 and data[pos - 1] == 0:
        return -1, -1  # a padded form: 0x8a 0x00 for 0x0a
    return value, pos


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
        length, pos = _shortest(data, pos, end)
        if length < 0:
            return -1
        after = pos + length
    else:  # groups (3, 4) and invalid types: not in these messages
        return -1
    return after if after <= end else -1


def peek_header(payload: bytes) -> tuple[str, int] | None:
    """(header.vin, header.settings_revision) as a parser would read them,
    or None when the payload is not plainly one message with one header."""
    end = len(payload)
    pos = 0
    fields = 0
    header_start = -1
    header_end = -1
    while pos < end:
        fields += 1
        if fields > _MAX_FIELDS:
            return None
        tag, pos = _shortest(payload, pos, end)
        if tag <= 7:  # field number 0 is invalid; -1: a broken tag
            return None
        wire_type = tag & 7
        if tag >> 3 == 1:
            if wire_type != _LEN or header_start >= 0:
                return None  # not a header, or a second one (merged by a parser)
            length, pos = _shortest(payload, pos, end)
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
    vin_start = vin_end = -1
    revision = 0
    pos = header_start
    while pos < header_end:
        tag, pos = _shortest(payload, pos, header_end)
        if tag <= 7:
            return None
        field, wire_type = tag >> 3, tag & 7
        if field == 1:
            if wire_type != _LEN or vin_start >= 0:
                return None  # a second VIN: the parser checks each one's text
            length, pos = _shortest(payload, pos, header_end)
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
    if vin_start < 0:
        return "", revision
    try:
        return payload[vin_start:vin_end].decode("utf-8"), revision
    except UnicodeDecodeError:
        return None  # the parser refuses it: its reason is its own
