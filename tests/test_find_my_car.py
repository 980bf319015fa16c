"""Contract rule 17, "Find-my-car is not a tracker", in the pure decision core.

A find-my-car window passes only the fixes that answer its command, at most
`fixes_per_command` of them (a car of contract v1, which does not fill
`Location.request_id`, gets the first fix and no more), and a car accepts at
most `max_commands_per_hour` commands: the rest are refused `rate_limited`.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from gateway.core import (
    CommandDecision,
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    LocationMode,
    VehicleState,
    decide,
    decide_command,
    expire_find_my_car,
)
from gateway.policy import PolicyError, parse_policy
from telematics.v1 import command_pb2, streams_pb2

from .test_decide import CTX, KEY, NOW, POLICY, ROOT, TS_MS, VIN, apply, settings_payload, state

HOUR = 3600.0


def fmc_state(location: LocationMode = LocationMode.PRECISE) -> VehicleState:
    return state({"find_my_car": True, "remote_control": True}, location=location)


def find(
    st: VehicleState,
    request_id: str,
    now: float = NOW,
    ctx: DecisionContext = CTX,
) -> CommandDecision:
    payload = command_pb2.Command(
        request_id=request_id, command="find_my_car", issued_at_ms=TS_MS
    ).SerializeToString()
    decision = decide_command(ctx, f"tsp/{VIN}/cmd/find_my_car", payload, {VIN: st}, now)
    assert decision is not None
    return decision


def accepted(decision: CommandDecision) -> VehicleState:
    assert decision.accepted, decision.reason
    assert decision.state is not None
    return decision.state


def fix(
    st: VehicleState,
    request_id: str = "",
    now: float = NOW + 1,
    ctx: DecisionContext = CTX,
) -> Forward | Drop:
    msg = streams_pb2.Location(request_id=request_id)
    msg.header.vin = VIN
    msg.header.seq = 7
    msg.header.timestamp_ms = int(now * 1000)
    msg.position.latitude, msg.position.longitude = 48.137154, 11.576124
    decision = decide(
        ctx, f"vehicle/{VIN}/tbox/location", msg.SerializeToString(), {VIN: st}, {}, now
    )
    assert isinstance(decision, Forward | Drop)
    return decision


def passed(decision: Forward | Drop) -> VehicleState:
    """The fix was forwarded; returns the state after it (its budget spent)."""
    assert isinstance(decision, Forward), decision
    assert decision.state is not None, "a forwarded fix must spend its command's budget"
    return decision.state


def refused(decision: Forward | Drop, reason: DropReason) -> None:
    assert isinstance(decision, Drop), decision
    assert decision.reason is reason, decision


def ctx_with(**find_my_car: object) -> DecisionContext:
    doc = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    doc.setdefault("find_my_car", {}).update(find_my_car)
    return DecisionContext(parse_policy(yaml.safe_dump(doc)), KEY)


# ------------------------------------------------------------------ policy


def test_default_policy_keys() -> None:
    assert POLICY.fixes_per_command == 1
    assert POLICY.max_commands_per_hour == 4


@pytest.mark.parametrize(
    "key, value",
    [
        ("fixes_per_command", 0),
        ("fixes_per_command", 11),
        ("max_commands_per_hour", 0),
        ("max_commands_per_hour", 13),
        ("max_commands_per_hour", 60),
    ],
)
def test_policy_bounds_are_validated(key: str, value: int) -> None:
    with pytest.raises(PolicyError):
        ctx_with(**{key: value})


@pytest.mark.parametrize("fixes, commands", [(1, 1), (10, 12), (2, 6)])
def test_policy_accepts_values_within_bounds(fixes: int, commands: int) -> None:
    ctx = ctx_with(fixes_per_command=fixes, max_commands_per_hour=commands)
    assert (ctx.policy.fixes_per_command, ctx.policy.max_commands_per_hour) == (fixes, commands)


# ---------------------------------------------------- fixes answer commands


def test_fix_answering_the_command_passes_once() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    after = passed(fix(st, "req-1"))
    # The second fix for the same command is dropped (one fix per command).
    refused(fix(after, "req-1", now=NOW + 2), DropReason.FIXES_SPENT)
    # The input state is untouched: the core is pure.
    passed(fix(st, "req-1", now=NOW + 2))


def test_fix_with_another_request_id_is_unanswered() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    refused(fix(st, "req-2"), DropReason.UNANSWERED_LOCATION)


def test_fix_without_a_window_is_dropped() -> None:
    refused(fix(fmc_state(), "req-1"), DropReason.NO_WINDOW)
    refused(fix(fmc_state(), ""), DropReason.NO_WINDOW)


def test_v1_car_without_request_id_gets_exactly_the_first_fix() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    after = passed(fix(st, ""))
    refused(fix(after, "", now=NOW + 2), DropReason.FIXES_SPENT)
    # Its budget is the command's: an answer naming it gets nothing more either.
    refused(fix(after, "req-1", now=NOW + 2), DropReason.FIXES_SPENT)


def test_v1_car_gets_only_the_first_fix_even_with_a_larger_budget() -> None:
    ctx = ctx_with(fixes_per_command=3)
    st = accepted(find(fmc_state(), "req-1", ctx=ctx))
    after = passed(fix(st, "", ctx=ctx))
    refused(fix(after, "", now=NOW + 2, ctx=ctx), DropReason.FIXES_SPENT)


def test_fixes_per_command_budget() -> None:
    ctx = ctx_with(fixes_per_command=3)
    st = accepted(find(fmc_state(), "req-1", ctx=ctx))
    for i in range(3):
        st = passed(fix(st, "req-1", now=NOW + 1 + i, ctx=ctx))
    refused(fix(st, "req-1", now=NOW + 10, ctx=ctx), DropReason.FIXES_SPENT)


def test_window_expiry() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    end = NOW + POLICY.window_s
    passed(fix(st, "req-1", now=end - 0.001))
    refused(fix(st, "req-1", now=end), DropReason.NO_WINDOW)
    refused(fix(st, "", now=end + HOUR), DropReason.NO_WINDOW)


def test_answer_to_an_expired_command_is_unanswered_in_a_later_window() -> None:
    first = accepted(find(fmc_state(), "req-1"))
    later = NOW + POLICY.window_s + 60
    st = accepted(find(first, "req-2", now=later))
    refused(fix(st, "req-1", now=later + 1), DropReason.UNANSWERED_LOCATION)
    passed(fix(st, "req-2", now=later + 1))


def test_several_open_commands_each_have_their_own_budget() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    st = accepted(find(st, "req-2", now=NOW + 10))
    st = passed(fix(st, "req-2", now=NOW + 11))
    st = passed(fix(st, "req-1", now=NOW + 12))
    refused(fix(st, "req-1", now=NOW + 13), DropReason.FIXES_SPENT)
    refused(fix(st, "req-2", now=NOW + 13), DropReason.FIXES_SPENT)


def test_v1_fix_answers_the_oldest_open_command_first() -> None:
    st = accepted(find(fmc_state(), "req-1"))
    st = accepted(find(st, "req-2", now=NOW + 10))
    st = passed(fix(st, "", now=NOW + 11))
    st = passed(fix(st, "", now=NOW + 12))
    refused(fix(st, "", now=NOW + 13), DropReason.FIXES_SPENT)


def test_location_off_drops_without_spending_the_budget() -> None:
    st = accepted(find(fmc_state(LocationMode.OFF), "req-1"))
    refused(fix(st, "req-1"), DropReason.LOCATION_OFF)


# ------------------------------------------------------------ commands/hour


def test_commands_per_hour_are_capped_rate_limited() -> None:
    st = fmc_state()
    for i in range(POLICY.max_commands_per_hour):
        st = accepted(find(st, f"req-{i}", now=NOW + 600 * i))
    over = find(st, "req-over", now=NOW + 2400)
    assert (over.accepted, over.reason) == (False, "rate_limited")
    assert over.state is None  # no window opened
    assert over.forward_topic is None  # nothing reaches the car
    result = command_pb2.CommandResult.FromString(over.result_payload)
    assert (result.request_id, result.accepted) == ("req-over", False)
    assert result.reason == "rate_limited"
    # Refusals do not count: an hour after the first accepted command, one more.
    again = find(st, "req-again", now=NOW + HOUR)
    assert again.accepted
    still = find(st, "req-early", now=NOW + HOUR - 1)
    assert still.reason == "rate_limited"


def test_polling_every_window_for_an_hour_yields_at_most_the_cap() -> None:
    st = fmc_state()
    fixes = 0
    t = NOW
    while t < NOW + HOUR:
        decision = find(st, f"poll-{t}", now=t)
        if decision.accepted:
            assert decision.state is not None
            st = decision.state
        out = fix(st, f"poll-{t}", now=t + 5)
        if isinstance(out, Forward):
            fixes += 1
            assert out.state is not None
            st = out.state
        t += 60
    assert fixes == POLICY.max_commands_per_hour


def test_rate_limit_applies_only_to_window_commands() -> None:
    st = fmc_state()
    for i in range(POLICY.max_commands_per_hour):
        st = accepted(find(st, f"req-{i}", now=NOW + i))
    lock = decide_command(
        CTX,
        f"tsp/{VIN}/cmd/lock",
        command_pb2.Command(request_id="l", command="lock").SerializeToString(),
        {VIN: st},
        NOW + 10,
    )
    assert lock is not None and lock.accepted


def test_overlong_request_id_is_refused() -> None:
    decision = find(fmc_state(), "x" * 200)
    assert (decision.accepted, decision.reason) == (False, "invalid_request_id")


# ------------------------------------------------------------- state shape


def test_new_settings_do_not_reset_the_cap_or_spent_fixes() -> None:
    st = fmc_state()
    for i in range(POLICY.max_commands_per_hour):
        st = accepted(find(st, f"req-{i}", now=NOW + i))
    st = passed(fix(st, "req-0", now=NOW + 5))
    applied = apply(settings_payload(2, features={"find_my_car": True}), st)
    assert not isinstance(applied, Forward | Drop)
    new = applied.state
    assert find(new, "req-x", now=NOW + 6).reason == "rate_limited"
    refused(fix(new, "req-0", now=NOW + 7), DropReason.FIXES_SPENT)
    passed(fix(new, "req-1", now=NOW + 7))


def test_cars_without_find_my_car_activity_share_one_state() -> None:
    a, b = fmc_state(), fmc_state()
    assert a is b
    opened = accepted(find(a, "req-1"))
    assert opened is not a
    # Once the window is closed and the hour is over, the car shares again.
    assert expire_find_my_car(opened, NOW + POLICY.window_s) is not a  # cap still counts
    assert expire_find_my_car(opened, NOW + HOUR) is a
    assert expire_find_my_car(a, NOW) is a


def test_restricted_state_stays_restricted_when_expired() -> None:
    st = dataclasses.replace(accepted(find(fmc_state(), "req-1")), restricted=True)
    assert expire_find_my_car(st, NOW + HOUR).restricted


def test_legacy_open_window_without_command_record_passes_first_fix_only() -> None:
    # A state restored from a store that only knew window_until (older gateway).
    st = state({"find_my_car": True}, window_until=NOW + 60)
    after = passed(fix(st, ""))
    refused(fix(after, "", now=NOW + 2), DropReason.FIXES_SPENT)
    refused(fix(st, "req-1"), DropReason.UNANSWERED_LOCATION)
    # ... and it counts towards the cap.
    for i in range(POLICY.max_commands_per_hour - 1):
        after = accepted(find(after, f"req-{i}", now=NOW + 3 + i))
    assert find(after, "req-x", now=NOW + 10).reason == "rate_limited"
