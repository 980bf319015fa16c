"""MQTT v5 packets, client side: build what the client sends, split and decode
what the broker sends. Pure, no I/O (bytes in, bytes or values out), so every
rule of the wire format is unit-tested without a socket; `gateway.edges.mqtt`
wraps it in the asyncio connection.

Only what a QoS <= 1 client with manual acknowledgements needs: CONNECT,
PUBLISH (QoS 0/1 in, QoS 1 out), PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
DISCONNECT out; CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP,
DISCONNECT in. Anything else the broker sends (QoS 2 flows, AUTH, a topic
alias we never allowed) is a protocol error: the connection is closed rather
than guessed at.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15

PINGREQ_PACKET = b"\xc0\x00"
MAX_REMAINING_LENGTH = 268_435_455  # four varint bytes

# Reason codes the gateway acts on.
SUCCESS = 0x00
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
SESSION_TAKEN_OVER = 0x8E
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95

REASON_NAMES = {
    0x00: "Success",
    0x01: "Granted QoS 1",
    0x02: "Granted QoS 2",
    0x04: "Disconnect with will message",
    0x10: "No matching subscribers",
    0x11: "No subscription existed",
    0x80: "Unspecified error",
    0x81: "Malformed packet",
    0x82: "Protocol error",
    0x83: "Implementation specific error",
    0x84: "Unsupported protocol version",
    0x85: "Client identifier not valid",
    0x86: "Bad user name or password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic filter invalid",
    0x90: "Topic name invalid",
    0x91: "Packet identifier in use",
    0x92: "Packet identifier not found",
    0x93: "Receive maximum exceeded",
    0x94: "Topic alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription identifiers not supported",
    0xA2: "Wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    return f"{REASON_NAMES.get(code, 'Unknown reason')} (0x{code:02x})"


class ProtocolError(ValueError):
    """The broker sent something that is not MQTT v5 as this client speaks it.
    `code` is the DISCONNECT reason to answer with."""

    def __init__(self, message: str, code: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ encoding


def encode_varint(value: int) -> bytes:
    if value < 128:
        return _SMALL_VARINTS[value]
    if value < 16_384:  # most PUBLISH packets: two bytes, no loop
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value > MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


_SMALL_VARINTS = [bytes([n]) for n in range(128)]


def varint_size(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int = 0,
    receive_maximum: int = 65535,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError("keepalive must be 0 to 65,535 s")
    if not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError("receive maximum must be 1 to 65,535")
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props = b""
    if session_expiry_s:
        props += b"\x11" + struct.pack(">I", session_expiry_s)
    props += b"\x21" + struct.pack(">H", receive_maximum)
    body = _utf8("MQTT") + bytes([5, flags]) + struct.pack(">H", keepalive_s)
    body += encode_varint(len(props)) + props + _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        raw = password.encode()
        body += len(raw).to_bytes(2, "big") + raw
    return _packet(CONNECT << 4, body)


def publish_properties(user_properties: Sequence[tuple[str, str]]) -> bytes:
    """The property block of a PUBLISH (length first): user properties only.
    Never a Topic Alias: every PUBLISH names its topic in full."""
    props = b"".join(b"\x26" + _utf8(k) + _utf8(v) for k, v in user_properties)
    return encode_varint(len(props)) + props


NO_PROPERTIES = b"\x00"


def publish_header(topic: bytes, packet_id: int, properties: bytes, payload_size: int) -> bytes:
    """A QoS 1 PUBLISH up to its payload (the payload follows as is)."""
    remaining = 4 + len(topic) + len(properties) + payload_size
    return (
        b"\x32"
        + encode_varint(remaining)
        + len(topic).to_bytes(2, "big")
        + topic
        + packet_id.to_bytes(2, "big")
        + properties
    )


DUP_FLAG = 0x08


def publish_size(topic: bytes, properties: bytes, payload_size: int) -> int:
    """Bytes of a QoS 1 PUBLISH on the wire (what Maximum Packet Size limits)."""
    remaining = 4 + len(topic) + len(properties) + payload_size
    return 1 + varint_size(remaining) + remaining


_PUBACK = struct.Struct(">BBH")


def puback_packet(packet_id: int) -> bytes:
    """Success, no reason code or properties (the short form)."""
    return _PUBACK.pack(0x40, 2, packet_id)


# Subscription options: maximum QoS 1, No Local, Retain Handling 2 (a
# retained message is never sent at subscribe time).
SUBSCRIBE_OPTIONS = 0x01 | 0x04 | 0x20


def subscribe_packet(packet_id: int, filters: Sequence[str], options: int) -> bytes:
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one filter")
    body = packet_id.to_bytes(2, "big") + NO_PROPERTIES
    body += b"".join(_utf8(f) + bytes([options]) for f in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def unsubscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one filter")
    body = packet_id.to_bytes(2, "big") + NO_PROPERTIES + b"".join(_utf8(f) for f in filters)
    return _packet((UNSUBSCRIBE << 4) | 0x02, body)


def disconnect_packet(reason: int = SUCCESS) -> bytes:
    return b"\xe0\x00" if reason == SUCCESS else bytes([0xE0, 1, reason])


# ------------------------------------------------------------------ decoding


def decode_varint(buf: bytes | memoryview, i: int) -> tuple[int, int]:
    """(value, offset after it). Raises ProtocolError past four bytes or the end."""
    value = shift = 0
    for _ in range(4):
        if i >= len(buf):
            raise ProtocolError("truncated variable byte integer")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise ProtocolError("variable byte integer longer than four bytes")


# Property id -> how its value is encoded (MQTT v5 section 2.2.2.2).
_BYTE, _U16, _U32, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY,
    0x0B: _VARINT, 0x11: _U32, 0x12: _STRING, 0x13: _U16, 0x15: _STRING,
    0x16: _BINARY, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE, 0x1A: _STRING,
    0x1C: _STRING, 0x1F: _STRING, 0x21: _U16, 0x22: _U16, 0x23: _U16,
    0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip


def _string(buf: bytes | memoryview, i: int, end: int) -> tuple[bytes, int]:
    if i + 2 > end:
        raise ProtocolError("truncated string")
    size = (buf[i] << 8) | buf[i + 1]
    i += 2
    if i + size > end:
        raise ProtocolError("truncated string")
    return bytes(buf[i : i + size]), i + size


def decode_properties(
    buf: bytes | memoryview, i: int, end: int
) -> tuple[dict[int, int | str | bytes], list[tuple[str, str]], int]:
    """(properties by id, user properties, offset after the block)."""
    size, i = decode_varint(buf, i)
    stop = i + size
    if stop > end:
        raise ProtocolError("property block longer than the packet")
    props: dict[int, int | str | bytes] = {}
    user: list[tuple[str, str]] = []
    while i < stop:
        ident = buf[i]
        i += 1
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        value: int | str | bytes
        if kind == _BYTE:
            if i + 1 > stop:
                raise ProtocolError("truncated property")
            value, i = buf[i], i + 1
        elif kind == _U16:
            if i + 2 > stop:
                raise ProtocolError("truncated property")
            value, i = (buf[i] << 8) | buf[i + 1], i + 2
        elif kind == _U32:
            if i + 4 > stop:
                raise ProtocolError("truncated property")
            value, i = int.from_bytes(buf[i : i + 4], "big"), i + 4
        elif kind == _VARINT:
            value, i = decode_varint(buf, i)
        elif kind == _PAIR:
            key, i = _string(buf, i, stop)
            text, i = _string(buf, i, stop)
            user.append((_text(key), _text(text)))
            continue
        else:
            raw, i = _string(buf, i, stop)
            value = _text(raw) if kind == _STRING else raw
        if i > stop:
            raise ProtocolError("truncated property")
        if ident in props:
            raise ProtocolError(f"property 0x{ident:02x} given twice", PROTOCOL_ERROR)
        props[ident] = value
    return props, user, stop


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    reason: int
    receive_maximum: int = 65535
    maximum_packet_size: int | None = None
    server_keepalive_s: int | None = None
    reason_string: str | None = None
    properties: dict[int, int | str | bytes] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.reason == SUCCESS


def decode_connack(body: bytes | memoryview) -> Connack:
    if len(body) < 2:
        raise ProtocolError("CONNACK shorter than 2 bytes")
    if body[0] & 0xFE:
        raise ProtocolError("CONNACK flags reserved bits set")
    props: dict[int, int | str | bytes] = {}
    if len(body) > 2:
        props, _, stop = decode_properties(body, 2, len(body))
        if stop != len(body):
            raise ProtocolError("bytes after the CONNACK properties")
    if 0 < body[1] < 0x80:
        raise ProtocolError(f"CONNACK reason 0x{body[1]:02x} is not a CONNACK reason")
    receive_maximum = props.get(0x21, 65535)
    packet_max = props.get(0x27)
    keepalive = props.get(0x13)
    reason_string = props.get(0x1F)
    if receive_maximum == 0 or packet_max == 0:
        raise ProtocolError("CONNACK Receive Maximum or Maximum Packet Size of 0", PROTOCOL_ERROR)
    return Connack(
        session_present=bool(body[0] & 1),
        reason=body[1],
        receive_maximum=int(receive_maximum),
        maximum_packet_size=int(packet_max) if packet_max is not None else None,
        server_keepalive_s=int(keepalive) if keepalive is not None else None,
        reason_string=str(reason_string) if reason_string is not None else None,
        properties=props,
    )


def decode_publish(first_byte: int, body: bytes | memoryview) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet id or 0, payload) of an incoming PUBLISH."""
    qos = (first_byte >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if qos == 0 and first_byte & DUP_FLAG:
        raise ProtocolError("PUBLISH with DUP at QoS 0")
    if qos == 2:
        raise ProtocolError("PUBLISH with QoS 2 (never subscribed)", PROTOCOL_ERROR)
    n = len(body)
    if n < 2:
        raise ProtocolError("PUBLISH without a topic")
    end = 2 + ((body[0] << 8) | body[1])
    if end == 2:
        raise ProtocolError("PUBLISH without a topic name (no alias was allowed)", PROTOCOL_ERROR)
    if end > n:
        raise ProtocolError("PUBLISH topic longer than the packet")
    try:
        topic = str(body[2:end], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("PUBLISH topic is not UTF-8") from None
    if "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic name with a wildcard", PROTOCOL_ERROR)
    packet_id = 0
    if qos:
        if end + 2 > n:
            raise ProtocolError("PUBLISH without a packet id")
        packet_id = (body[end] << 8) | body[end + 1]
        if packet_id == 0:
            raise ProtocolError("PUBLISH with packet id 0")
        end += 2
    if end >= n:
        raise ProtocolError("PUBLISH without properties")
    if body[end] == 0:  # the usual case: no properties
        end += 1
    else:
        end = _skip_publish_properties(body, end, n)
    return topic, qos, packet_id, bytes(body[end:])


def _skip_publish_properties(buf: bytes | memoryview, i: int, end: int) -> int:
    """Past a PUBLISH's properties without decoding them (the gateway reads
    none); only a Topic Alias is refused: none was allowed. Subscription
    Identifiers may repeat."""
    size, i = decode_varint(buf, i)
    stop = i + size
    if stop > end:
        raise ProtocolError("property block longer than the packet")
    while i < stop:
        ident = buf[i]
        i += 1
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        if ident == 0x23:
            raise ProtocolError("PUBLISH with a Topic Alias (none was allowed)", PROTOCOL_ERROR)
        if kind == _BYTE:
            i += 1
        elif kind == _U16:
            i += 2
        elif kind == _U32:
            i += 4
        elif kind == _VARINT:
            _, i = decode_varint(buf, i)
        else:  # string, binary: one length-prefixed value; a pair: two
            for _ in range(2 if kind == _PAIR else 1):
                if i + 2 > stop:
                    raise ProtocolError("truncated property")
                i += 2 + ((buf[i] << 8) | buf[i + 1])
        if i > stop:
            raise ProtocolError("truncated property")
    return stop


def decode_puback(body: bytes | memoryview) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK."""
    if len(body) < 2:
        raise ProtocolError("PUBACK shorter than 2 bytes")
    if len(body) > 3:
        _, _, end = decode_properties(body, 3, len(body))
        if end != len(body):
            raise ProtocolError("bytes after the PUBACK properties")
    return (body[0] << 8) | body[1], body[2] if len(body) > 2 else SUCCESS


def decode_suback(body: bytes | memoryview) -> tuple[int, list[int]]:
    """(packet id, reason code per filter) of a SUBACK or UNSUBACK."""
    if len(body) < 3:
        raise ProtocolError("SUBACK/UNSUBACK shorter than 3 bytes")
    _, _, i = decode_properties(body, 2, len(body))
    if i == len(body):
        raise ProtocolError("SUBACK/UNSUBACK without a reason code")
    return (body[0] << 8) | body[1], list(body[i:])


def decode_disconnect(body: bytes | memoryview) -> tuple[int, str | None]:
    """(reason code, reason string) of a broker's DISCONNECT."""
    if not body:
        return SUCCESS, None
    reason_string = None
    if len(body) > 1:
        props, _, end = decode_properties(body, 1, len(body))
        if end != len(body):
            raise ProtocolError("bytes after the DISCONNECT properties")
        text = props.get(0x1F)
        reason_string = str(text) if text is not None else None
    return body[0], reason_string


# The fixed-header flags each packet from the broker must carry (PUBLISH's vary).
FIXED_FLAGS = {CONNACK: 0, PUBACK: 0, SUBACK: 0, UNSUBACK: 0, PINGRESP: 0, DISCONNECT: 0}


class PacketReader:
    """Splits the broker's byte stream into packets, without copying bodies.

    `feed` what the connection received, then take packets with `next()`
    until it returns None (the rest of the packet has not arrived). A packet
    that arrives in many pieces is joined once, when it is complete, never
    piece by piece (that would be quadratic in its size).
    """

    __slots__ = ("_buf", "_need", "_pending", "_pending_size", "_pos", "_view", "max_packet_size")

    def __init__(self, max_packet_size: int = MAX_REMAINING_LENGTH + 5) -> None:
        self.max_packet_size = max_packet_size
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._pending: list[bytes] = []  # pieces not yet joined to _buf
        self._pending_size = 0
        self._need = 0  # bytes the packet at _pos needs in all

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as packets."""
        return len(self._buf) - self._pos + self._pending_size

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._pos >= len(self._buf) and not self._pending:
            # The usual case: everything before was taken, start on this.
            self._buf, self._view, self._pos = data, memoryview(data), 0
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._need and len(self._buf) - self._pos + self._pending_size < self._need:
            return  # a large packet still on its way: join once it is whole
        self._join()

    def _join(self) -> None:
        pieces = self._pending
        rest = self._view[self._pos :] if self._pos < len(self._buf) else None
        if rest is None and len(pieces) == 1:
            self._buf = pieces[0]
        else:
            parts: list[bytes | memoryview] = [rest] if rest is not None else []
            parts.extend(pieces)
            self._buf = b"".join(parts)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._pending = []
        self._pending_size = 0

    def next(self) -> tuple[int, memoryview] | None:
        """(first byte, body) of the next complete packet, or None."""
        buf, pos = self._buf, self._pos
        n = len(buf)
        if pos + 2 > n:
            return None
        first = buf[pos]
        byte = buf[pos + 1]
        if byte < 0x80:  # the usual case: a packet under 128 bytes of body
            size, start = byte, pos + 2
        else:
            size = shift = 0
            i = pos + 1
            for _ in range(4):
                if i >= n:
                    return None  # the length itself is not all here yet
                byte = buf[i]
                i += 1
                size |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                raise ProtocolError("remaining length longer than four bytes")
            start = i
        end = start + size
        if end - pos > self.max_packet_size:
            raise ProtocolError(
                f"packet of {end - pos} bytes exceeds the maximum of {self.max_packet_size}",
                PACKET_TOO_LARGE,
            )
        if end > n:
            self._need = end - pos
            return None
        self._need = 0
        self._pos = end
        return first, self._view[start:end]
