"""The gateway's own MQTT v5 codec (pure: bytes in, values out). What the
broker sends is checked against the wire format byte by byte, including
input split at every position and packets that are not MQTT. The codec is
checked against paho's independent encoder and decoder where they overlap."""

from __future__ import annotations

import struct

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.edges import mqtt_codec as codec
from gateway.edges.mqtt_codec import PacketReader, ProtocolError


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_variable_byte_integers_at_every_size_boundary(value: int, encoded: bytes) -> None:
    assert codec.encode_varint(value) == encoded
    assert codec.varint_size(value) == len(encoded)
    assert codec.decode_varint(encoded + b"tail", 0) == (value, len(encoded))


def test_variable_byte_integers_beyond_four_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode_varint(268_435_456)
    with pytest.raises(ProtocolError, match="longer than four bytes"):
        codec.decode_varint(b"\x80\x80\x80\x80\x01", 0)
    with pytest.raises(ProtocolError, match="truncated"):
        codec.decode_varint(b"\x80\x80", 0)


def test_connect_packet_layout() -> None:
    packet = codec.connect_packet(
        "gw-1",
        keepalive_s=30,
        clean_start=False,
        session_expiry_s=86_400,
        receive_maximum=512,
        username="gw",
        password="s3cret",
    )
    props = b"\x11" + struct.pack(">I", 86_400) + b"\x21" + struct.pack(">H", 512)
    body = (
        b"\x00\x04MQTT\x05"
        + bytes([0x80 | 0x40])  # user name and password, no clean start, no will
        + struct.pack(">H", 30)
        + bytes([len(props)])
        + props
        + b"\x00\x04gw-1"
        + b"\x00\x02gw"
        + b"\x00\x06s3cret"
    )
    assert packet == b"\x10" + bytes([len(body)]) + body
    clean = codec.connect_packet("x", keepalive_s=0, clean_start=True)
    assert clean[9] == 0x02  # clean start only; no session expiry property
    assert b"\x11" not in clean[12:16]


def test_publish_properties_match_an_independent_encoder() -> None:
    pairs = [("recipient", "developer"), ("transforms", "coarsen,truncate_ip"), ("k", "ü")]
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = pairs
    assert codec.publish_properties(pairs) == props.pack()  # type: ignore[no-untyped-call]
    assert codec.publish_properties([]) == codec.NO_PROPERTIES


def test_publish_round_trip_through_the_reader() -> None:
    topic, payload = b"tsp/abc/tbox/status", bytes(range(256)) * 3
    props = codec.publish_properties([("recipient", "backend")])
    packet = codec.publish_header(topic, 513, props, len(payload)) + payload
    assert len(packet) == codec.publish_size(topic, props, len(payload))
    reader = PacketReader()
    reader.feed(packet)
    got = reader.next()
    assert got is not None
    first, body = got
    assert first == 0x32  # PUBLISH, QoS 1, no DUP, no retain
    assert codec.decode_publish(first, body) == (topic.decode(), 1, 513, payload)
    assert reader.next() is None and reader.buffered == 0


def test_reader_splits_a_stream_cut_at_every_byte() -> None:
    packets = [
        codec.publish_header(b"a/b", n + 1, codec.NO_PROPERTIES, n * 40) + bytes(n * 40)
        for n in range(6)
    ] + [b"\x40\x02\x00\x07", b"\xd0\x00"]
    stream = b"".join(packets)
    for cut in range(1, len(stream)):
        reader = PacketReader()
        got: list[bytes] = []
        for piece in (stream[:cut], stream[cut:]):
            reader.feed(piece)
            while (packet := reader.next()) is not None:
                first, body = packet
                got.append(bytes([first]) + codec.encode_varint(len(body)) + bytes(body))
        assert got == packets, cut


def test_a_large_packet_in_many_pieces_is_joined_once_complete() -> None:
    payload = bytes(1 << 20)
    packet = codec.publish_header(b"t", 1, codec.NO_PROPERTIES, len(payload)) + payload
    reader = PacketReader()
    pieces = [packet[i : i + 4096] for i in range(0, len(packet), 4096)]
    for piece in pieces[:-1]:
        reader.feed(piece)
        assert reader.next() is None
    assert reader.buffered == len(packet) - len(pieces[-1])
    # Pieces wait unjoined while the packet is incomplete (no quadratic copying).
    assert len(reader._pending) > 1
    reader.feed(pieces[-1])
    got = reader.next()
    assert got is not None and codec.decode_publish(*got)[3] == payload


def test_reader_refuses_a_packet_above_its_limit() -> None:
    reader = PacketReader(max_packet_size=100)
    reader.feed(b"\x30\xe8\x07")  # remaining length 1000
    with pytest.raises(ProtocolError) as exc:
        reader.next()
    assert exc.value.code == codec.PACKET_TOO_LARGE


@pytest.mark.parametrize(
    ("first", "body", "message"),
    [
        (0x36, b"\x00\x01a\x00\x01\x00", "QoS 3"),
        (0x34, b"\x00\x01a\x00\x01\x00", "QoS 2"),
        (0x32, b"\x00\x00\x00\x01\x03\x23\x00\x01", "no alias was allowed"),
        (0x32, b"\x00\x09ab", "topic longer than the packet"),
        (0x32, b"\x00\x01a\x00\x00\x00", "packet id 0"),
        (0x32, b"\x00\x01a\x00\x01", "without properties"),
        (0x32, b"\x00\x01a\x00\x01\x05\x01", "property block longer than the packet"),
        (0x38, b"\x00\x01a\x00", "DUP at QoS 0"),
        (0x32, b"\x00\x03a/+\x00\x01\x00", "wildcard"),
        (0x32, b"\x00\x01a\x00\x01\x03\x23\x00\x01", "Topic Alias"),
        (0x30, b"\x00\x02\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_malformed_publishes_are_protocol_errors(first: int, body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_publish(first, body)


def test_strict_acks_and_disconnects() -> None:
    with pytest.raises(ProtocolError, match="not a CONNACK reason"):
        codec.decode_connack(b"\x00\x01")
    with pytest.raises(ProtocolError, match="after the PUBACK properties"):
        codec.decode_puback(b"\x00\x01\x00\x00\xff")
    with pytest.raises(ProtocolError, match="without a reason code"):
        codec.decode_suback(b"\x00\x01\x00")
    with pytest.raises(ProtocolError, match="after the DISCONNECT properties"):
        codec.decode_disconnect(b"\x00\x00\xff")


def test_qos_0_publish_has_no_packet_id() -> None:
    assert codec.decode_publish(0x30, b"\x00\x01a\x00xyz") == ("a", 0, 0, b"xyz")


def test_connack_properties() -> None:
    props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 20
    props.MaximumPacketSize = 4096
    props.ServerKeepAlive = 15
    props.TopicAliasMaximum = 10
    props.AssignedClientIdentifier = "auto-1"
    props.UserProperty = [("a", "b")]
    reply = codec.decode_connack(b"\x01\x00" + props.pack())  # type: ignore[no-untyped-call]
    assert reply.session_present and reply.accepted
    assert (reply.receive_maximum, reply.maximum_packet_size, reply.server_keepalive_s) == (
        20,
        4096,
        15,
    )
    assert reply.properties[0x12] == "auto-1"
    refused = codec.decode_connack(b"\x00\x87\x05\x1f\x00\x02no")
    assert not refused.accepted and refused.reason_string == "no"
    assert codec.decode_connack(b"\x00\x00").receive_maximum == 65535  # absent: the maximum


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00", "shorter"),
        (b"\x02\x00\x00", "reserved"),
        (b"\x00\x00\x03\x21\x00\x00", "Receive Maximum or Maximum Packet Size of 0"),
        (b"\x00\x00\x02\x7f\x00", "unknown property"),
        (b"\x00\x00\x06\x21\x00\x01\x21\x00\x02", "given twice"),
        (b"\x00\x00\x09\x21\x00\x01", "longer than the packet"),
    ],
)
def test_malformed_connacks_are_protocol_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_connack(body)


def test_acks_and_disconnect() -> None:
    assert codec.puback_packet(0x1234) == b"\x40\x02\x12\x34"
    assert codec.decode_puback(b"\x12\x34") == (0x1234, 0)
    assert codec.decode_puback(b"\x12\x34\x87\x00") == (0x1234, 0x87)
    assert codec.decode_suback(b"\x00\x05\x00\x01\x87") == (5, [0x01, 0x87])
    assert codec.decode_disconnect(b"") == (0, None)
    assert codec.decode_disconnect(b"\x8e\x05\x1f\x00\x02hi") == (0x8E, "hi")
    assert codec.disconnect_packet() == b"\xe0\x00"
    assert codec.disconnect_packet(0x81) == b"\xe0\x01\x81"


def test_subscribe_and_unsubscribe_layout() -> None:
    sub = codec.subscribe_packet(7, ["vehicle/#", "$share/g/tsp/+/cmd/+"], codec.SUBSCRIBE_OPTIONS)
    body = (
        b"\x00\x07\x00" + b"\x00\x09vehicle/#" + b"\x25" + b"\x00\x14$share/g/tsp/+/cmd/+" + b"\x25"
    )
    assert sub == b"\x82" + bytes([len(body)]) + body
    unsub = codec.unsubscribe_packet(8, ["vehicle/#"])
    assert unsub == b"\xa2\x0e\x00\x08\x00\x00\x09vehicle/#"
    with pytest.raises(ValueError):
        codec.subscribe_packet(1, [], codec.SUBSCRIBE_OPTIONS)


def test_reason_text_names_the_code() -> None:
    assert codec.reason_text(0x87) == "Not authorized (0x87)"
    assert codec.reason_text(0xFE) == "Unknown reason (0xfe)"


def test_publish_properties_are_skipped_and_subscription_ids_may_repeat() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("a", "b"), ("c", "d")]
    props.ContentType = "application/x-protobuf"
    block = props.pack()  # type: ignore[no-untyped-call]
    assert codec.decode_publish(0x32, b"\x00\x01t\x00\x07" + block + b"payload") == (
        "t",
        1,
        7,
        b"payload",
    )
    two_ids = b"\x04\x0b\x01\x0b\x02"  # Subscription Identifier 1 and 2
    assert codec.decode_publish(0x30, b"\x00\x01t" + two_ids + b"p")[3] == b"p"
