"""The header read without parsing (gateway/core/header_peek.py): it answers
only what the protobuf parser would read, and the decisions it short-cuts are
the ones the full parse reaches."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import DecisionContext, Drop, DropReason, Hold, decide
from gateway.core.capture import Interval
from gateway.core.header_peek import peek_header
from telematics.v1 import common_pb2, streams_pb2
from tests.test_decide import (
    KEY,
    NOW,
    POLICY,
    STREAMS,
    TS_MS,
    VIN,
    dropped,
    sample,
    state,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = sorted({cls for _, cls in STREAMS.values()}, key=lambda c: c.DESCRIPTOR.full_name)


def _parsed_header(cls: type[Message], payload: bytes) -> tuple[str, int] | None:
    message = cls()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return None
    header = message.header  # type: ignore[attr-defined]
    return header.vin, header.settings_revision


def test_every_stream_message_the_simulator_shape_builds_is_read() -> None:
    # The short cut is taken for what cars send, not only in theory.
    for stream in STREAMS:
        for revision in (0, 1, 7, 2**40, 2**64 - 1):
            message = sample(stream)
            message.header.settings_revision = revision  # type: ignore[attr-defined]
            message.header.seq = 2**63  # type: ignore[attr-defined]
            payload = message.SerializeToString()
            assert peek_header(payload) == (VIN, revision), stream


def test_a_negative_int32_in_the_body_is_ten_bytes_and_still_read() -> None:
    message = sample("tbox/connectivity")
    message.signal_dbm = -76  # type: ignore[attr-defined]
    payload = message.SerializeToString()
    assert b"\xff" * 8 in payload
    assert peek_header(payload) == (VIN, 0)


@settings(max_examples=400, deadline=None)
@given(
    cls=st.sampled_from(CLASSES),
    vin=st.text(max_size=20),
    revision=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    ts=st.integers(-(2**63), 2**63 - 1),
    extra_header=st.binary(max_size=12),
    body=st.binary(max_size=60),
    second_header=st.booleans(),
)
def test_the_header_read_is_the_parsers_or_nothing(
    cls: type[Message],
    vin: str,
    revision: int,
    seq: int,
    ts: int,
    extra_header: bytes,
    body: bytes,
    second_header: bool,
) -> None:
    """Valid headers, a header with stray bytes appended (unknown fields,
    wrong wire types, truncations), arbitrary bodies and a second header (the
    parser merges the two): whenever the reader answers, the parser reads the
    same VIN and revision."""
    header = common_pb2.Header(vin=vin, seq=seq, timestamp_ms=ts, settings_revision=revision)
    header_bytes = header.SerializeToString() + extra_header
    field = b"\x0a" + _varint(len(header_bytes)) + header_bytes
    payload = field + body
    if second_header:
        payload += b"\x0a\x04\x20" + _varint(revision + 1)[:3]
    got = peek_header(payload)
    if got is not None:
        assert got == _parsed_header(cls, payload)
    if not extra_header and not body and not second_header:
        assert got == (vin, revision)  # a plain message is always read


def test_random_mutations_never_read_differently_from_the_parser() -> None:
    rng = random.Random(20261205)
    answered = 0
    for _ in range(20_000):
        stream = rng.choice(list(STREAMS))
        cls = STREAMS[stream][1]
        message = sample(stream)
        message.header.settings_revision = rng.randrange(1, 300)  # type: ignore[attr-defined]
        data = bytearray(message.SerializeToString())
        for _ in range(rng.randint(1, 3)):
            kind = rng.random()
            pos = rng.randrange(len(data))
            if kind < 0.5:
                data[pos] = rng.randrange(256)
            elif kind < 0.75:
                del data[pos : pos + rng.randint(1, 4)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        payload = bytes(data)
        got = peek_header(payload)
        if got is not None:
            answered += 1
            parsed = _parsed_header(cls, payload)
            # The reader does not look inside the body's own fields: when the
            # parser refuses the message, the reader may still answer.
            assert parsed is None or got == parsed, payload
    assert answered > 2_000  # both outcomes well represented


def test_a_revision_past_64_bits_is_left_to_the_parser() -> None:
    # Ten varint bytes can say more than 64 bits; the parser keeps the low
    # 64 (here 5), so a reader taking the whole value would hold what the
    # decision sees as revision 5, or drop what it would hold.
    for value in (2**64 + 5, 2**70 - 1):
        header = common_pb2.Header(vin=VIN).SerializeToString() + b"\x20" + _varint(value)
        payload = b"\x0a" + _varint(len(header)) + header
        parsed = _parsed_header(streams_pb2.VehicleStatus, payload)
        assert parsed == (VIN, value % 2**64)
        assert peek_header(payload) in (None, parsed)


V = VIN.encode()
# Found by a review: each one read by the first version of the reader, and
# each one read differently (or refused) by a parser.
ODD_ENCODINGS = {
    # protobuf's pure-Python parser looks fields up by their tag bytes: a
    # padded tag is another (unknown) field to it, the header to upb.
    "padded header tag": b"\x8a\x00\x13\x0a\x11" + V,
    "padded revision tag after revision 5": b"\x0a\x18\x0a\x11" + V + b"\x20\x05\xa0\x00\x01",
    "padded VIN tag after another VIN": b"\x0a\x27\x0a\x11WVWZZZ1JZXW000002\x8a\x00\x11" + V,
    # upb refuses these.
    "earlier VIN not UTF-8": b"\x0a\x16\x0a\x01\xff\x0a\x11" + V,
    "6-byte header tag": b"\x8a\x80\x80\x80\x80\x00\x13\x0a\x11" + V,
    "6-byte VIN tag": b"\x0a\x18\x8a\x80\x80\x80\x80\x00\x11" + V,
    "tag past 32 bits": b"\x0a\x13\x0a\x11" + V + b"\x80\x80\x80\x80\x10\x00",
    "6-byte VIN length": b"\x0a\x18\x0a\x91\x80\x80\x80\x80\x00" + V,
}


def test_tags_and_lengths_not_in_their_shortest_form_are_left_to_the_parser() -> None:
    for name, payload in ODD_ENCODINGS.items():
        assert peek_header(payload) is None, name
        # And the decision is the full parse's: undecodable, a spoof, held,
        # or (what the parser reads is this car at an applied revision) the
        # setting's drop.
        parsed = _parsed_header(streams_pb2.VehicleStatus, payload)
        decision = _decide(payload)
        if parsed is None:
            dropped(decision, DropReason.UNDECODABLE)
        elif parsed[0] != VIN:
            dropped(decision, DropReason.VIN_MISMATCH)
        elif parsed[1] > PRIVACY.revision:
            assert isinstance(decision, Hold) and decision.revision == parsed[1], name
        else:
            dropped(decision, DropReason.PRIVACY_MODE)


def test_the_reader_agrees_with_protobufs_pure_python_parser_too() -> None:
    """The differential check of this file, under the other protobuf backend
    (a deployment may run it): in a subprocess, as the backend is chosen at
    import."""
    script = """
import random
from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError
from gateway.core.header_peek import peek_header
from telematics.v1 import streams_pb2
from tests.test_header_peek import ODD_ENCODINGS
assert api_implementation.Type() == "python", api_implementation.Type()
rng = random.Random(7)
cases = list(ODD_ENCODINGS.values())
base = streams_pb2.VehicleStatus()
base.header.vin = "WVWZZZ1JZXW000001"
base.header.settings_revision = 3
base.fuel_level_pct = 50.0
plain = base.SerializeToString()
for _ in range(6000):
    data = bytearray(plain + bytes(rng.randrange(256) for _ in range(rng.randint(0, 4))))
    for _ in range(rng.randint(0, 2)):
        data.insert(rng.randrange(len(data)), rng.choice([0x80, 0x00, 0x0a, 0x20, 0x8a, 0xa0]))
    cases.append(bytes(data))
answered = 0
for payload in cases:
    got = peek_header(payload)
    if got is None:
        continue
    answered += 1
    message = streams_pb2.VehicleStatus()
    try:
        message.ParseFromString(payload)
    except (DecodeError, UnicodeDecodeError):
        continue
    assert got == (message.header.vin, message.header.settings_revision), payload
assert answered > 300, answered
print("ok", answered)
"""
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def test_a_flood_of_tiny_fields_is_left_to_the_parser() -> None:
    # 32,768 two-byte fields and no header: the walk stops early (the parser
    # refuses or reads such a payload on its own).
    header = common_pb2.Header(vin=VIN).SerializeToString()
    flood = b"\x58\x00" * 32_768
    assert peek_header(flood) is None
    assert peek_header(b"\x0a" + _varint(len(header)) + header + flood) is None
    assert peek_header(b"\x0a" + _varint(len(header)) + header + b"\x58\x00" * 100) == (VIN, 0)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# --------------------------------------------------------------------------
# In the decision

CTX = DecisionContext(POLICY, KEY)
PRIVACY = state(privacy_mode=True, revision=3)
HISTORY = {VIN: (Interval(3, 3, NOW - 3600, PRIVACY),)}


def _decide(payload: bytes, stream: str = "tbox/status") -> object:
    return decide(CTX, f"vehicle/{VIN}/{stream}", payload, {VIN: PRIVACY}, {}, NOW, HISTORY)


def _status(revision: int, vin: str = VIN) -> streams_pb2.VehicleStatus:
    message = sample("tbox/status", vin=vin, ts_ms=TS_MS)
    assert isinstance(message, streams_pb2.VehicleStatus)
    message.header.settings_revision = revision
    return message


def test_a_message_the_settings_drop_is_dropped_on_its_header_alone() -> None:
    # A body the parser would refuse (a position whose latitude is cut short
    # inside it): the header decides, as the module says; the reason is the
    # setting.
    payload = _status(3).SerializeToString() + b"\x8a\x01\x03\x09\x00\x00"
    assert _parsed_header(streams_pb2.VehicleStatus, payload) is None
    dropped(_decide(payload), DropReason.PRIVACY_MODE)
    # The same body from a car whose settings forward it: the parse decides.
    allowed = state(revision=3)
    decision = decide(
        CTX,
        f"vehicle/{VIN}/tbox/status",
        payload,
        {VIN: allowed},
        {},
        NOW,
        {VIN: (Interval(3, 3, NOW - 3600, allowed),)},
    )
    dropped(decision, DropReason.UNDECODABLE)


def test_the_header_still_holds_a_newer_revision_and_names_a_spoof() -> None:
    # Captured under a revision not applied yet: held, not dropped (rule 12).
    held = _decide(_status(4).SerializeToString())
    assert isinstance(held, Hold) and held.revision == 4
    # Another car's VIN in the header: reported as the spoof it is.
    dropped(
        _decide(_status(3, vin="WVWZZZ1JZXW000002").SerializeToString()), DropReason.VIN_MISMATCH
    )
    # A second header (the parser merges it): the full parse decides, and
    # the merged revision 4 is held.
    merged = _status(3).SerializeToString() + b"\x0a\x02\x20\x04"
    held = _decide(merged)
    assert isinstance(held, Hold) and held.revision == 4
    # The current revision and an unstated one: dropped by the setting.
    for revision in (3, 0):
        decision = _decide(_status(revision).SerializeToString())
        assert isinstance(decision, Drop)
        dropped(decision, DropReason.PRIVACY_MODE)
