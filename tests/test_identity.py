"""Identity privacy (contract rules 15 and 16) on the pure decision core:
pseudonymized streams share nothing with VIN streams, pseudonym epochs, the
VIN in opaque bytes, IPv4 inside IPv6, settings after an erasure."""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import re
from collections.abc import Iterator

import pytest
import yaml
from google.protobuf.message import Message

from gateway.core import DecisionContext, Drop, DropReason, Forward, LocationMode, decide
from gateway.core.decide import ApplySettings
from gateway.core.identity import (
    KEPT_HEADER_FIELDS,
    IdentityBook,
    IdentityRow,
    erasure_events,
    subject,
    vin_in_bytes,
    vin_ref,
)
from gateway.core.transforms import truncate_ip
from gateway.policy import CompiledPolicy, parse_policy
from telematics.v1 import common_pb2, privacy_pb2, streams_pb2

from .test_decide import (
    ALL_FEATURES,
    CONSENT_STREAMS,
    KEY,
    NOW,
    OTHER_VIN,
    POLICY,
    TS_MS,
    VIN,
    dropped,
    forwarded,
    sample,
    settings_payload,
    state,
    window_for,
)

APPS = ("music", "weather")
# Values a pseudonymized stream may share with VIN streams because they are
# public anyway: the app id (also in the topic) and the erasure reason.
PUBLIC_VALUES = {"music", "weather", "art17"}


def ctx(
    epochs: dict[str, int] | None = None, rows: dict[str, IdentityRow] | None = None
) -> DecisionContext:
    return DecisionContext(POLICY, KEY, identity=IdentityBook(rows, epochs))


def leaves(message: Message) -> Iterator[object]:
    """Every set scalar value of a message, nested ones included."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                yield from leaves(item)
            else:
                yield item


def app_message(app: str, seq: int, ts_ms: int) -> streams_pb2.AppTraffic:
    msg = streams_pb2.AppTraffic(app_id=app, content_type="application/json", payload=b"{}")
    msg.header.vin = VIN
    msg.header.seq = seq
    msg.header.timestamp_ms = ts_ms
    return msg


def send(c: DecisionContext, relative: str, msg: Message, vin: str = VIN) -> Forward | Drop:
    features = {**ALL_FEATURES, "third_party.weather": True}
    st = state(features, window_until=window_for(relative))
    decision = decide(c, f"vehicle/{vin}/{relative}", msg.SerializeToString(), {vin: st}, {}, NOW)
    assert not isinstance(decision, ApplySettings)
    return decision


# --------------------------------------------------------------- rule 15


# A variant of the default policy that also pseudonymizes the voice stream: the
# check below must hold for whatever streams a policy pseudonymizes.
VOICE_TOO = parse_policy(
    POLICY.text.replace(
        "  avn/voice:\n    message: VoiceChunk\n",
        "  avn/voice:\n    message: VoiceChunk\n    pseudonymize_vin: true\n",
    )
)


def pseudonymized_topics(policy: CompiledPolicy) -> list[str]:
    """Relative topics of every stream the policy pseudonymizes (two apps for a
    per-app template)."""
    topics = [key for key, s in policy.exact_routes.items() if s.pseudonymize_vin]
    for route in policy.template_routes:
        if route.stream.pseudonymize_vin:
            topics += [route.stream.key.replace("{app_id}", app) for app in APPS]
    return topics


def public(value: object) -> bool:
    """Values that identify nothing: declared constants, flags, small numbers
    (enum values, counts) and the coarse time buckets every car shares."""
    if isinstance(value, bool) or value in PUBLIC_VALUES:
        return True
    if isinstance(value, int):
        return abs(value) < 1000 or value % 60_000 == 0
    return False


@pytest.mark.parametrize("policy", [POLICY, VOICE_TOO], ids=["default", "voice-too"])
@pytest.mark.parametrize("epoch", [0, 3])
def test_pseudonymized_streams_share_no_value_with_the_cars_vin_streams(
    policy: CompiledPolicy, epoch: int
) -> None:
    """The adversary's join: a value seen both on a pseudonym's topic and on the
    car's VIN topics (the car numbers all its messages from one counter and
    stamps them from one clock), or on two pseudonyms' topics of one car."""
    c = DecisionContext(policy, KEY, identity=IdentityBook(None, {VIN: epoch}))
    pseudonymized = pseudonymized_topics(policy)
    assert ("avn/voice" in pseudonymized) == (policy is VOICE_TOO)
    vin_streams = [
        s for s in CONSENT_STREAMS if s not in pseudonymized and not s.startswith("avn/app/")
    ]
    vin_values: set[object] = {VIN}
    seen: dict[str, set[object]] = {topic: set() for topic in pseudonymized}
    seq, ts = 100_000, TS_MS + 123
    for _ in range(3):
        for relative in [*vin_streams, *pseudonymized]:
            seq, ts = seq + 1, ts + 777
            if relative.startswith("avn/app/"):
                msg: Message = app_message(relative.rsplit("/", 1)[1], seq, ts)
            else:
                msg = sample(relative, ts_ms=ts, seq=seq)
            fwd = forwarded(send(c, relative, msg))
            values = set(leaves(type(msg).FromString(fwd.payload))) | set(fwd.topic.split("/"))
            if relative in seen:
                seen[relative] |= values
            else:
                vin_values |= values
    vin_ints = [v for v in vin_values if isinstance(v, int) and not public(v)]
    for topic, values in seen.items():
        shared = {v for v in values & vin_values if not public(v)}
        shared -= {"avn", "app", "tsp", "apps", "application/json", b"{}", *topic.split("/")}
        assert not shared, f"{topic} shares {shared} with VIN streams"
        # A counter's neighbour or a timestamp a moment apart links as well as
        # an equal value.
        near = {
            (v, w)
            for v in values
            if isinstance(v, int) and not public(v)
            for w in vin_ints
            if abs(v - w) <= 1000
        }
        assert not near, f"{topic} values next to VIN-stream values: {sorted(near)[:3]}"
    # Nor do two pseudonymized streams of one car (beyond the coarse time
    # bucket, shared with every car sending in that minute: the timing limit
    # documented in docs/privacy.md).
    for a in seen:
        for b in seen:
            if a < b:
                between = {v for v in seen[a] & seen[b] if not public(v)}
                between -= {"avn", "app", "tsp", "apps", "application/json", b"{}"}
                assert not between, f"{a} and {b} share {between}"


def test_every_other_header_field_is_cleared_generically() -> None:
    msg = app_message("music", 7, TS_MS + 1)
    for field in common_pb2.Header.DESCRIPTOR.fields:  # settings_revision too, once it exists
        if field.name not in KEPT_HEADER_FIELDS and field.cpp_type == field.CPPTYPE_UINT64:
            setattr(msg.header, field.name, 4242)
    out = streams_pb2.AppTraffic.FromString(forwarded(send(ctx(), "avn/app/music", msg)).payload)
    assert {f.name for f, _ in out.header.ListFields()} <= KEPT_HEADER_FIELDS
    assert 4242 not in set(leaves(out))


def test_seq_token_is_stable_per_message_and_unrelated_to_the_counter() -> None:
    def seq_of(seq: int, app: str = "music", epoch: int = 0) -> int:
        fwd = forwarded(send(ctx({VIN: epoch}), f"avn/app/{app}", app_message(app, seq, TS_MS)))
        return streams_pb2.AppTraffic.FromString(fwd.payload).header.seq

    assert seq_of(5) == seq_of(5)  # a redelivered duplicate is still recognisable
    tokens = {seq_of(s) for s in range(1, 50)}
    assert len(tokens) == 49 and not tokens & set(range(0, 10_000))
    assert seq_of(5, "weather") != seq_of(5)  # per pseudonym
    assert seq_of(5, epoch=1) != seq_of(5)  # per epoch
    assert all(0 <= t < 2**64 for t in tokens)


def test_timestamps_are_coarsened_to_the_policy_step() -> None:
    ts = TS_MS + 59_999
    out = streams_pb2.AppTraffic.FromString(
        forwarded(send(ctx(), "avn/app/music", app_message("music", 1, ts))).payload
    )
    assert out.header.timestamp_ms == ts - ts % 60_000
    text = POLICY.text.replace(
        "pseudonymized_timestamp_step_s: 60", "pseudonymized_timestamp_step_s: 900"
    )
    coarse = DecisionContext(parse_policy(text), KEY)
    out = streams_pb2.AppTraffic.FromString(
        forwarded(send(coarse, "avn/app/music", app_message("music", 1, ts))).payload
    )
    assert out.header.timestamp_ms == ts - ts % 900_000
    with pytest.raises(Exception, match="pseudonymized_timestamp_step_s"):
        parse_policy(text.replace("step_s: 900", "step_s: 0"))


def test_app_id_field_must_equal_the_topics_app_id() -> None:
    c = ctx()
    for wrong in ("weather", "", "MUSIC"):
        msg = app_message("music", 1, TS_MS)
        msg.app_id = wrong
        d = dropped(send(c, "avn/app/music", msg), DropReason.APP_ID_MISMATCH)
        assert d.detail == wrong


def _encodings(vin: str) -> dict[str, bytes]:
    raw = vin.encode()
    forms = {
        "lower": raw.lower(),
        "mixed": vin[:8].lower().encode() + raw[8:],
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "hex-colons": ":".join(f"{b:02x}" for b in raw).encode(),
        "hex-lower-vin": raw.lower().hex().encode(),
        "utf16le": vin.encode("utf-16-le"),
        "utf16be": vin.encode("utf-16-be"),
        "utf16-bom": vin.encode("utf-16"),
        "dashes": b"-".join(raw[i : i + 3] for i in range(0, 17, 3)),
        "spaces": b" ".join(bytes([c]) for c in raw),
        "split-lines": raw[:9] + b"\r\n" + raw[9:],
    }
    for prefix in (b"", b"x", b"xy"):  # the three base64 alignments
        forms[f"b64+{len(prefix)}"] = base64.b64encode(prefix + raw + b"!")
        forms[f"b64url+{len(prefix)}"] = base64.urlsafe_b64encode(prefix + b"\xfb\xff" + raw)
        forms[f"b64-lower+{len(prefix)}"] = base64.b64encode(prefix + raw.lower())
    forms["b64-utf16"] = base64.b64encode(vin.encode("utf-16-le"))
    # Forms encoders emit for byte arrays and escaped text.
    forms["json-buffer"] = json.dumps({"type": "Buffer", "data": list(raw)}).encode()
    forms["decimal-list"] = " ".join(str(b) for b in raw).encode()
    forms["json-unicode-escapes"] = "".join(f"\\u{b:04x}" for b in raw).encode()
    forms["JSON-unicode-escapes"] = "".join(f"\\u{b:04X}" for b in raw).encode()
    forms["hex-escapes"] = "".join(f"\\x{b:02x}" for b in raw).encode()
    forms["percent"] = "".join(f"%{b:02X}" for b in raw).encode()
    forms["hex-literals"] = ", ".join(f"0x{b:02x}" for b in raw).encode()
    forms["html-entities"] = "".join(f"&#{b};" for b in raw).encode()
    forms["html-hex-entities"] = "".join(f"&#x{b:x};" for b in raw).encode()
    return forms


@pytest.mark.parametrize("form", sorted(_encodings(VIN)))
def test_vin_in_opaque_app_bytes_is_found_in_common_encodings(form: str) -> None:
    encoded = _encodings(VIN)[form]
    msg = app_message("music", 1, TS_MS)
    msg.payload = b'{"track": 7, "ctx": "' + encoded + b'"}'
    dropped(send(ctx(), "avn/app/music", msg), DropReason.VIN_IN_PAYLOAD)
    # Any string field of the app message, not only the payload.
    msg = app_message("music", 1, TS_MS)
    msg.content_type = "text/plain; car=" + encoded.decode("latin-1")
    dropped(send(ctx(), "avn/app/music", msg), DropReason.VIN_IN_PAYLOAD)


@pytest.mark.parametrize("form", sorted(_encodings(OTHER_VIN)))
def test_another_cars_vin_is_not_this_cars_vin(form: str) -> None:
    assert not vin_in_bytes(_encodings(OTHER_VIN)[form], VIN)


def _vin_in_bytes_reference(data: bytes, vin: str) -> bool:
    """The detector's rules written plainly, every form tried on every input:
    what the fast path (preconditions before each form) must agree with."""
    strip = b" \t\r\n\x00-_.:/\\|,;'\"+"

    def canon(b: bytes) -> bytes:
        return b.translate(None, strip).lower()

    def hex_runs(flat: bytes) -> bool:
        for run in re.findall(rb"[0-9a-f]{34,}", flat):
            for start in (0, 1):
                part = run[start : start + (len(run) - start) // 2 * 2]
                if target in canon(bytes.fromhex(part.decode())):
                    return True
        return False

    target = canon(vin.encode())
    flat = canon(data)
    if target in flat or hex_runs(flat):
        return True
    low = data.lower()
    unescaped = low
    for prefix in (b"\\u00", b"\\x", b"%", b"0x", b"&#x"):
        unescaped = unescaped.replace(prefix, b"")
    if hex_runs(canon(unescaped.replace(b";", b""))):
        return True
    for match in re.finditer(rb"\d{1,3}(?:[^0-9a-z]{1,4}\d{1,3}){16,}", low):
        numbers = [int(n) for n in re.findall(rb"\d{1,3}", match.group())]
        if max(numbers) < 256 and target in canon(bytes(numbers)):
            return True
    compact = data.translate(None, b" \t\r\n")
    for run in re.findall(rb"[A-Za-z0-9+/_-]{23,}", compact):
        run = run.translate(bytes.maketrans(b"-_", b"+/"))
        for start in range(4):
            part = run[start:]
            if len(part) % 4 == 1:
                part = part[:-1]
            try:
                decoded = base64.b64decode(part + b"=" * (-len(part) % 4))
            except ValueError:
                continue
            if target in canon(decoded):
                return True
    return False


def test_vin_search_agrees_with_its_plain_reference() -> None:
    """Random mixes of the encodings, cut at random points, in random bytes and
    among digits and separators (which is where the decimal-list precondition
    and the escape check decide): the fast search finds exactly what trying
    every form on every input finds."""
    rng = random.Random(20261204)
    pieces = [*_encodings(VIN).values(), *_encodings(OTHER_VIN).values()]
    noise = [b"0123456789", b", ", b"&#", b";", b"%", b"0x", b"\\x", b"\\u00", b"[", b" "]
    found = 0
    for _ in range(3000):
        parts: list[bytes] = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.3:
                piece = rng.choice(pieces)
                cut = rng.randint(0, len(piece))
                # Whole, or cut at either end (most cuts break the form).
                parts.append(rng.choice((piece, piece[cut:], piece[:cut])))
            elif kind < 0.6:
                parts.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))))
            elif kind < 0.8:
                parts.append(
                    " ".join(str(rng.randint(0, 300)) for _ in range(rng.randint(10, 25))).encode()
                )
            else:
                parts.append(rng.choice(noise) * rng.randint(1, 3))
        data = b"".join(parts)
        expected = _vin_in_bytes_reference(data, VIN)
        assert vin_in_bytes(data, VIN) == expected, data
        found += expected
    assert 300 < found < 2700  # both outcomes well represented


def test_the_pseudonym_the_gateway_wrote_is_searched_as_a_separator() -> None:
    """A pseudonymized copy holds its own pseudonym in its header (32 hex
    characters, which read as a base64 run): that one occurrence is searched
    as a separator. Whatever the car wrote is searched whole, the same value
    in the car's bytes included, so a VIN next to or around it is found."""
    rng = random.Random(20261205)
    pieces = [*_encodings(VIN).values(), *_encodings(OTHER_VIN).values()]
    at = 4
    for _ in range(1500):
        written = rng.getrandbits(128).to_bytes(16, "big").hex().encode()
        parts = [
            rng.choice(pieces)
            if rng.random() < 0.4
            else written
            if rng.random() < 0.2
            else bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 30)))
            for _ in range(rng.randint(1, 4))
        ]
        # Parts apart (a decimal list within 4 bytes of digits is a longer
        # list, which the search takes whole), but
        # the first one right after the pseudonym.
        car = (b"\xfe" * 5).join(parts)
        data = b"\n4\n " + written + car
        found = vin_in_bytes(data, VIN, written, at)
        assert found == _vin_in_bytes_reference(b"\n4\n \xff" + car, VIN), data
        if any(_vin_in_bytes_reference(part, VIN) for part in parts):
            assert found, data
        # Not where the gateway wrote it: nothing is taken out.
        assert vin_in_bytes(data, VIN, written, at + 1) == _vin_in_bytes_reference(data, VIN)
    # Next to it in base64, hex and plain text (the forms a run can swallow).
    raw = VIN.encode()
    written = b"0f" * 16
    for form in (base64.b64encode(raw), raw.hex().encode(), raw):
        assert vin_in_bytes(b"\n4\n " + written + form, VIN, written, at)
    # A car that learnt its pseudonym (from its app's backend) and found that
    # it begins with the VIN's last character writes the rest of the VIN
    # before it: the whole VIN is in what leaves, and it is found.
    ref = b"1" + b"a" * 31
    assert VIN.endswith("1")
    data = b"\n4\n " + ref + b"\x12\x30" + VIN[:-1].encode() + ref
    assert vin_in_bytes(data, VIN, ref, at)


def test_a_pseudonymized_copy_holds_its_pseudonym_where_the_search_expects_it() -> None:
    # The search treats the header's pseudonym as a separator only at this
    # place (anywhere else it is searched, at four base64 decodes a copy).
    for stream in ("avn/nav", "avn/search", "avn/app/music"):
        decision = send(ctx(), stream, sample(stream))
        assert isinstance(decision, Forward)
        copies = [decision, *decision.also]
        refs = [(c.topic.split("/")[1], c.payload) for c in copies]
        pseudonymized = [(r, p) for r, p in refs if r != VIN]
        assert pseudonymized, stream
        for ref, payload in pseudonymized:
            assert payload[4:36] == ref.encode(), stream


def test_ordinary_app_payloads_pass() -> None:
    for body in (b'{"track": 7}', bytes(range(256)) * 4, base64.b64encode(bytes(range(200)))):
        msg = app_message("music", 1, TS_MS)
        msg.payload = body
        forwarded(send(ctx(), "avn/app/music", msg))


# ------------------------------------------------------------- epochs


def test_epoch_zero_keeps_todays_pseudonyms() -> None:
    """An upgrade changes no app user: the refs of earlier releases, pinned, as
    long as the policy sends apps where it did (no recipients declared: the
    implicit `backend`). A new recipient gets pseudonyms of its own."""
    document = yaml.safe_load(POLICY.text)
    del document["recipients"]
    for spec in document["streams"].values():
        spec.pop("recipients", None)
    before_recipients = DecisionContext(parse_policy(yaml.safe_dump(document)), KEY)
    expected = {
        "music": "111d238488fc5bcc47490c7bae035417",
        "weather": "8f5489de0c65f99901ec77ec74818bb5",
    }
    for app, ref in expected.items():
        msg = app_message(app, 1, TS_MS)
        fwd = forwarded(send(before_recipients, f"avn/app/{app}", msg))
        assert fwd.topic == f"tsp/{ref}/avn/app/{app}"
        moved = forwarded(send(ctx(), f"avn/app/{app}", msg))
        assert moved.topic.startswith("apps/") and ref not in moved.topic


def test_a_new_epoch_links_to_nothing_before() -> None:
    before = forwarded(send(ctx({VIN: 0}), "avn/app/music", app_message("music", 9, TS_MS)))
    after = forwarded(send(ctx({VIN: 1}), "avn/app/music", app_message("music", 9, TS_MS)))
    old = set(leaves(streams_pb2.AppTraffic.FromString(before.payload))) | {before.topic}
    new = set(leaves(streams_pb2.AppTraffic.FromString(after.payload))) | {after.topic}
    old_ref, new_ref = before.topic.split("/")[1], after.topic.split("/")[1]
    assert old_ref != new_ref
    shared = (old & new) - PUBLIC_VALUES - {"application/json", b"{}", TS_MS - TS_MS % 60_000}
    assert not shared


def test_grid_offset_does_not_change_with_the_epoch() -> None:
    def coarse(epoch: int) -> tuple[float, float]:
        st = state(location=LocationMode.APPROXIMATE)
        payload = sample("tbox/status").SerializeToString()
        d = forwarded(
            decide(ctx({VIN: epoch}), f"vehicle/{VIN}/tbox/status", payload, {VIN: st}, {}, NOW)
        )
        p = streams_pb2.VehicleStatus.FromString(d.payload).position
        return p.latitude, p.longitude

    assert coarse(0) == coarse(1) == coarse(7)


def test_bluetooth_mac_pseudonym_is_per_vehicle_and_epoch() -> None:
    def mac_of(vin: str, epoch: int = 0, mac: str = "aa-bb-cc-dd-ee-ff") -> str:
        msg = sample("tbox/digital_key", vin)
        msg.bluetooth_mac = mac  # type: ignore[attr-defined]
        return streams_pb2.DigitalKeyEvent.FromString(
            forwarded(send(ctx({vin: epoch}), "tbox/digital_key", msg, vin)).payload
        ).bluetooth_mac

    one_phone_two_cars = {mac_of(VIN), mac_of(OTHER_VIN)}
    assert len(one_phone_two_cars) == 2
    assert mac_of(VIN) == mac_of(VIN, mac="AA:BB:CC:DD:EE:FF")  # stable per car
    assert mac_of(VIN, epoch=1) != mac_of(VIN)


# ------------------------------------------------------------- erasure


def test_settings_after_erasure_respect_the_floor_and_the_restriction() -> None:
    rows = {subject(KEY, VIN): IdentityRow(epoch=1, revision_floor=5, restricted=True)}
    c = ctx(rows=rows)
    for revision in (1, 5):
        d = decide(c, f"vehicle/{VIN}/avn/privacy", settings_payload(revision), {}, {}, NOW)
        d = dropped(d, DropReason.STALE_REVISION)
        assert d.reannounce is not None
        topic, body = d.reannounce
        applied = privacy_pb2.PrivacyApplied.FromString(body)
        assert topic == f"vehicle/{VIN}/avn/privacy/applied"
        assert applied.reprompt and applied.revision == 5
    fresh = decide(c, f"vehicle/{VIN}/avn/privacy", settings_payload(6), {}, {}, NOW)
    assert isinstance(fresh, ApplySettings)
    assert fresh.state.restricted  # the restriction outlived the erasure
    assert not privacy_pb2.PrivacyApplied.FromString(fresh.applied_payload).reprompt
    # Another car is not affected by this car's row.
    other = decide(
        c, f"vehicle/{OTHER_VIN}/avn/privacy", settings_payload(1, vin=OTHER_VIN), {}, {}, NOW
    )
    assert isinstance(other, ApplySettings) and not other.state.restricted


def test_erasure_events_pair_nothing() -> None:
    """Each pseudonym's event goes to the recipient that holds it (rule 16:
    no other recipient learns it); the VIN event to every VIN-keyed one."""
    targets = [("apps", f"{app}|app_providers", f"avn/app/{app}") for app in APPS]
    events = erasure_events(KEY, ["tsp", "x"], VIN, targets, 0, NOW, [400.0, 9000.0], 60_000)
    assert [t for t, _ in events.vin_events] == [f"tsp/{VIN}/erasure", f"x/{VIN}/erasure"]
    vin_event = privacy_pb2.ErasureEvent.FromString(events.vin_events[0][1])
    assert vin_event.vin == VIN and not vin_event.refs
    assert len(events.app_events) == 2
    for (due, topic, payload), app, ref in zip(events.app_events, APPS, events.refs, strict=True):
        event = privacy_pb2.ErasureEvent.FromString(payload)
        assert topic == f"apps/{ref}/avn/app/{app}/erasure"
        assert ref == vin_ref(KEY, f"{app}|app_providers", VIN)
        assert list(event.refs) == [ref] and not event.vin
        assert VIN.encode() not in payload and due > NOW
        assert event.erased_at_ms != vin_event.erased_at_ms
        assert not (set(leaves(event)) & set(leaves(vin_event))) - PUBLIC_VALUES


# -------------------------------------------------------- IPv4 in IPv6


def _embeddings(v4: ipaddress.IPv4Address) -> dict[str, str]:
    n = int(v4)
    return {
        "mapped": f"::ffff:{v4}",
        "compatible": str(ipaddress.IPv6Address(n)),
        "nat64": str(ipaddress.IPv6Address((0x64FF9B << 96) | n)),
        "6to4": str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),
        "teredo": str(
            ipaddress.IPv6Address(
                (0x20010000 << 96)
                | (int(ipaddress.IPv4Address("192.0.2.1")) << 64)
                | (0x8000 << 48)
                | (0xFFFF << 32)
                | (n ^ 0xFFFFFFFF)
            )
        ),
        "isatap": str(ipaddress.IPv6Address((0x20010DB8 << 96) | (0x5EFE << 32) | n)),
        "nat64-local": str(ipaddress.IPv6Address((0x64FF9B0001 << 88) | (n << 24))),
    }


@pytest.mark.parametrize("form", sorted(_embeddings(ipaddress.IPv4Address("203.0.113.7"))))
def test_no_ipv4_host_survives_inside_ipv6(form: str) -> None:
    """Whatever the embedding, the output does not depend on the host octet of
    the IPv4 address (at most its /24 survives, like a plain IPv4)."""
    hosts = [ipaddress.IPv4Address(f"203.0.113.{h}") for h in (7, 8, 200)]
    outputs = {truncate_ip(_embeddings(h)[form]) for h in hosts}
    assert len(outputs) == 1, outputs
    (out,) = outputs
    assert out and "203.0.113.7" not in out and "cb00:7107" not in out


def test_nat64_and_mapped_keep_the_ipv4_slash24() -> None:
    assert truncate_ip("64:ff9b::203.0.113.7") == "203.0.113.0"
    assert truncate_ip("::ffff:203.0.113.7") == "203.0.113.0"
    assert truncate_ip("2002:cb00:7107::1") == "2002:cb00:7100::"


# ------------------------------------------------- optional rotation per app

PERIOD_S = 30 * 86400


def rotating(rotation: str) -> DecisionContext:
    text = POLICY.text.replace(
        "pseudonymized_timestamp_step_s: 60",
        f"pseudonymized_timestamp_step_s: 60\n  app_pseudonym_rotation_days: {rotation}",
    )
    return DecisionContext(parse_policy(text), KEY)


def ref_at(c: DecisionContext, app: str, now: float) -> str:
    st = state({f"third_party.{app}": True})
    payload = app_message(app, 1, TS_MS).SerializeToString()
    fwd = forwarded(decide(c, f"vehicle/{VIN}/avn/app/{app}", payload, {VIN: st}, {}, now))
    out = streams_pb2.AppTraffic.FromString(fwd.payload)
    assert out.header.vin == fwd.topic.split("/")[1]  # one message, one pseudonym
    return out.header.vin


def test_app_pseudonyms_rotate_only_when_the_operator_says_so() -> None:
    start = (NOW // PERIOD_S + 1) * PERIOD_S  # a period boundary, the same for every car
    assert ref_at(ctx(), "music", start - 1) == ref_at(ctx(), "music", start + 400 * 86400)
    c = rotating("{music: 30}")
    old, new = ref_at(c, "music", start - 1), ref_at(c, "music", start)
    assert old != new and ref_at(c, "music", start + PERIOD_S - 1) == new
    assert ref_at(c, "weather", start - 1) == ref_at(c, "weather", start)  # not rotated
    every = rotating('{"*": 30}')
    assert ref_at(every, "weather", start - 1) != ref_at(every, "weather", start)
    with pytest.raises(Exception, match="rotation period"):
        rotating("{music: 0}")


def test_erasure_finds_the_ref_of_every_rotation_period_from_its_day() -> None:
    from gateway.accounting import EgressAccounting
    from gateway.core.identity import app_scope
    from gateway.service import _day_start

    day = EgressAccounting.__new__(EgressAccounting)
    day._day_cache = (0.0, 0.0, "")
    for now in (NOW, NOW + 86399, NOW + 45 * 86400):
        assert app_scope("music", 30, _day_start(day.day(now))) == app_scope("music", 30, now)
