"""Bounds of the pure core (contract rules 18 and 20): payload size caps and
eCall conformance. No broker: decide() only."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.budget import IngressBudget
from gateway.core import DecisionContext, Drop, DropReason, Forward, LocationMode, VehicleState
from gateway.core import decide as decide_message
from gateway.policy import PolicyError, load_policy, parse_policy
from telematics.v1 import streams_pb2

ROOT = Path(__file__).resolve().parents[1]
POLICY = load_policy(ROOT / "config" / "policy.yaml")
CTX = DecisionContext(POLICY, bytes(range(32)))
VIN = "WVWZZZ1JZXW000001"
STATE = VehicleState(1, False, LocationMode.PRECISE, frozenset({"remote_control"}))


def decide(topic: str, payload: bytes) -> Drop | Forward:
    decision = decide_message(CTX, f"vehicle/{VIN}/{topic}", payload, {VIN: STATE}, {}, 1e9)
    assert isinstance(decision, Drop | Forward)
    return decision


def test_oversized_payload_is_dropped_before_it_is_parsed() -> None:
    msg = streams_pb2.VehicleStatus()
    msg.header.vin = VIN
    assert isinstance(decide("tbox/status", msg.SerializeToString()), Forward)
    # Garbage bytes over the cap: dropped as oversized, not as undecodable.
    decision = decide("tbox/status", b"\xff" * (POLICY.max_payload_bytes_default + 1))
    assert isinstance(decision, Drop) and decision.reason is DropReason.OVERSIZED


def test_per_stream_cap_overrides_the_policy_default() -> None:
    text = (ROOT / "config" / "policy.yaml").read_text()
    capped = "    message: VehicleStatus\n    max_payload_bytes: 100\n"
    text = text.replace("    message: VehicleStatus\n", capped)
    ctx = DecisionContext(parse_policy(text, source="test"), bytes(range(32)))
    msg = streams_pb2.VehicleStatus()
    msg.header.vin = VIN
    small = msg.SerializeToString()
    big = small + bytes([0xFA, 0x3F, 120]) + b"u" * 120  # an unknown field makes it 143 bytes
    for payload, forwarded in ((small, True), (big, False)):
        decision = decide_message(ctx, f"vehicle/{VIN}/tbox/status", payload, {VIN: STATE}, {}, 1e9)
        assert isinstance(decision, Forward) is forwarded
        if not forwarded:
            assert isinstance(decision, Drop) and decision.reason is DropReason.OVERSIZED
    with pytest.raises(PolicyError):
        parse_policy(text.replace("max_payload_bytes: 100", "max_payload_bytes: 10"), source="t")


def ecall(recent: int = 3, extra: bytes = b"") -> bytes:
    msg = streams_pb2.ECall(passengers=2, vehicle_type="M1")
    msg.header.vin = VIN
    msg.position.latitude = 48.1
    for i in range(recent):
        point = msg.recent_positions.add()
        point.latitude = 48.0 + i / 100
    return msg.SerializeToString() + extra


def test_conforming_ecall_leaves_byte_for_byte() -> None:
    payload = ecall()
    decision = decide("tbox/ecall", payload)
    assert isinstance(decision, Forward)
    assert decision.payload == payload and decision.transforms == ()


@pytest.mark.parametrize(
    "payload",
    [
        ecall(recent=10),  # a track, not three recent positions
        ecall(extra=bytes([0xFA, 0x3F, 5]) + b"extra"),  # a field outside the contract
        ecall(extra=bytes([0xFA, 0x3F]) + b"\x80\x80\x04" + b"z" * 65536),  # over the size cap
    ],
)
def test_non_conforming_ecall_is_trimmed_and_still_forwarded(payload: bytes) -> None:
    decision = decide("tbox/ecall", payload)
    assert isinstance(decision, Forward)
    assert decision.transforms == ("trim",)
    assert dict(decision.user_properties)["transforms"] == "trim"
    out = streams_pb2.ECall.FromString(decision.payload)
    assert len(out.recent_positions) <= 3
    assert (out.passengers, out.vehicle_type, out.header.vin) == (2, "M1", VIN)
    assert len(decision.payload) <= POLICY.max_payload_bytes_default
    assert out.ByteSize() == len(decision.payload)  # nothing unknown survived


def test_ingress_budget_pauses_on_either_limit_and_resumes_under_a_quarter_of_both() -> None:
    events: list[str] = []
    budget = IngressBudget(8, 1000, lambda: events.append("pause"), lambda: events.append("go"))
    for _ in range(7):
        budget.take(10)
    assert events == []
    budget.take(10)
    assert events == ["pause"]
    for _ in range(5):
        budget.give(10)
    assert events == ["pause"]  # 3 held: not yet under a quarter (2)
    budget.give(10)
    assert events == ["pause", "go"]
    budget.take(990)  # bytes alone
    assert events == ["pause", "go", "pause"]
