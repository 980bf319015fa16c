"""Consent at capture time and the causal token in the pure core (contract v2
rules 11 and 12): `decide` with per-car settings intervals, no broker, no clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core import (
    DecisionContext,
    Drop,
    DropReason,
    Forward,
    Hold,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
    decide,
    state_from_snapshot,
)
from gateway.core.capture import CaptureHistory, Interval, append, capture_state, merge
from gateway.policy import load_policy
from telematics.v1 import common_pb2, streams_pb2

ROOT = Path(__file__).resolve().parents[1]
POLICY = load_policy(ROOT / "config" / "policy.yaml")
KEY = bytes(range(32))
SKEW = 120.0
CTX = DecisionContext(POLICY, KEY, capture_skew_s=SKEW)
VIN = "WVWZZZ1JZXW000001"
T0 = 1_800_000_000.0  # revision 1 applied
T1 = T0 + 3600  # revision 2 applied
T2 = T1 + 3600  # revision 3 applied
NOW = T2 + 3600
TOPIC = f"vehicle/{VIN}/tbox/status"


def state(revision: int, *, privacy: bool = False, status: bool = True,
          location: LocationMode = LocationMode.PRECISE) -> VehicleState:
    snapshot = SettingsSnapshot(
        VIN, revision, privacy, location, {"remote_control": status}, 0.0, POLICY.version
    )
    return state_from_snapshot(POLICY, snapshot)


def history(*intervals: tuple[int, float, VehicleState]) -> CaptureHistory:
    out: CaptureHistory | None = None
    for revision, since, st_ in intervals:
        out = append(out, Interval(revision, revision, since, st_), 32)
    assert out is not None
    return out


def status(revision: int = 0, timestamp_ms: int = 0) -> bytes:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=40.0)
    msg.header.vin = VIN
    msg.header.seq = 1
    msg.header.timestamp_ms = timestamp_ms
    msg.header.settings_revision = revision
    msg.position.CopyFrom(common_pb2.GeoPoint(latitude=52.52, longitude=13.405))
    return msg.SerializeToString()


def run(payload: bytes, hist: CaptureHistory, now: float = NOW) -> Forward | Drop | Hold:
    current = dataclasses.replace(hist[-1].state)
    decision = decide(CTX, TOPIC, payload, {VIN: current}, {}, now, histories={VIN: hist})
    assert isinstance(decision, Forward | Drop | Hold)
    return decision


# Privacy mode during revision 2: on before and after.
PRIVACY_BETWEEN = history((1, T0, state(1)), (2, T1, state(2, privacy=True)), (3, T2, state(3)))


def ms(t: float) -> int:
    return int(t * 1000)


# ------------------------------------------------------------------ revision path


def test_stated_revision_picks_its_interval() -> None:
    dropped = run(status(revision=2, timestamp_ms=ms(NOW)), PRIVACY_BETWEEN)
    assert isinstance(dropped, Drop) and dropped.reason is DropReason.PRIVACY_MODE
    assert dropped.detail == "at_capture"
    assert isinstance(run(status(revision=1), PRIVACY_BETWEEN), Forward)
    assert isinstance(run(status(revision=3, timestamp_ms=ms(T1 + 10)), PRIVACY_BETWEEN), Forward)


def test_revision_newer_than_applied_is_held() -> None:
    decision = run(status(revision=4), PRIVACY_BETWEEN)
    assert decision == Hold(VIN, "tbox/status", 4)


def test_unknown_vehicle_stating_a_revision_is_held() -> None:
    decision = decide(CTX, TOPIC, status(revision=1), {}, {}, NOW, histories={})
    assert decision == Hold(VIN, "tbox/status", 1)
    # Without histories (v1 callers) nothing is held.
    decision = decide(CTX, TOPIC, status(revision=1), {}, {}, NOW)
    assert isinstance(decision, Drop) and decision.reason is DropReason.UNKNOWN_VEHICLE


def test_revision_before_the_oldest_known_is_dropped() -> None:
    hist = history((5, T0, state(5)))
    decision = run(status(revision=3), hist)
    assert isinstance(decision, Drop)
    assert decision.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS


def test_revision_never_seen_gets_the_strictest_neighbour() -> None:
    # Revision 2 never reached the gateway; 1 allowed status, 3 did not.
    hist = history((1, T0, state(1)), (3, T1, state(3, status=False)), (4, T2, state(4)))
    decision = run(status(revision=2), hist)
    assert isinstance(decision, Drop) and decision.reason is DropReason.FEATURE_DISABLED


def test_capture_location_mode_is_the_stricter_of_capture_and_arrival() -> None:
    hist = history((1, T0, state(1, location=LocationMode.APPROXIMATE)), (2, T1, state(2)))
    decision = run(status(revision=1), hist)
    assert isinstance(decision, Forward) and "coarsen:position" in decision.transforms
    assert "coarsen:position" not in run(status(revision=2), hist).transforms  # type: ignore[union-attr]


def test_capture_under_location_off_clears_position() -> None:
    hist = history((1, T0, state(1, location=LocationMode.OFF)), (2, T1, state(2)))
    decision = run(status(revision=1), hist)
    assert isinstance(decision, Forward) and "clear:position" in decision.transforms


def test_restriction_inside_one_revision_is_narrowed_by_timestamp() -> None:
    restricted = dataclasses.replace(state(1), restricted=True)
    hist = history((1, T0, state(1)), (1, T1, restricted), (1, T2, state(1)))
    during = run(status(revision=1, timestamp_ms=ms(T1 + 600)), hist)
    assert isinstance(during, Drop) and during.reason is DropReason.RESTRICTED
    assert isinstance(run(status(revision=1, timestamp_ms=ms(T2 + 600)), hist), Forward)
    assert isinstance(run(status(revision=1, timestamp_ms=ms(T0 + 600)), hist), Forward)
    # Within the skew margin of the restriction: the stricter applies.
    near = run(status(revision=1, timestamp_ms=ms(T2 + SKEW / 2)), hist)
    assert isinstance(near, Drop)
    # No timestamp: arrival time, the settings in force now.
    assert isinstance(run(status(revision=1), hist), Forward)


# ----------------------------------------------------------------- timestamp path


def test_timestamp_inside_privacy_mode_is_dropped() -> None:
    decision = run(status(timestamp_ms=ms(T1 + 1800)), PRIVACY_BETWEEN)
    assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE


def test_timestamp_outside_privacy_mode_passes() -> None:
    assert isinstance(run(status(timestamp_ms=ms(T0 + 1800)), PRIVACY_BETWEEN), Forward)
    assert isinstance(run(status(timestamp_ms=ms(T2 + 1800)), PRIVACY_BETWEEN), Forward)


def test_skew_margin_applies_the_strictest_nearby() -> None:
    # Just after privacy mode ended, and just before it began: within the margin.
    for t in (T2 + SKEW / 2, T1 - SKEW / 2):
        decision = run(status(timestamp_ms=ms(t)), PRIVACY_BETWEEN)
        assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE, t
    for t in (T2 + SKEW * 1.5, T1 - SKEW * 1.5):
        assert isinstance(run(status(timestamp_ms=ms(t)), PRIVACY_BETWEEN), Forward), t


def test_missing_timestamp_counts_as_arrival_time() -> None:
    assert isinstance(run(status(), PRIVACY_BETWEEN), Forward)
    in_privacy = history((1, T0, state(1)), (2, T1, state(2, privacy=True)))
    decision = run(status(), in_privacy)
    assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE


def test_future_timestamp_counts_as_arrival_time() -> None:
    # A car clock far ahead cannot place its data after a consent it lacked.
    decision = run(status(timestamp_ms=ms(NOW + 86400)), PRIVACY_BETWEEN)
    assert isinstance(decision, Forward)
    # Privacy mode ended a minute ago: the margin still applies around "now".
    hist = history((1, T0, state(1, privacy=True)), (2, NOW - 60, state(2)))
    decision = run(status(timestamp_ms=ms(NOW + 86400)), hist)
    assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE


def test_timestamp_before_known_settings_is_dropped() -> None:
    decision = run(status(timestamp_ms=ms(T0 - 3600)), PRIVACY_BETWEEN)
    assert isinstance(decision, Drop)
    assert decision.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS


def test_settings_without_history_are_fail_closed() -> None:
    decision = decide(CTX, TOPIC, status(1), {VIN: state(1)}, {}, NOW, histories={})
    assert isinstance(decision, Drop)


def test_arrival_still_decides_too() -> None:
    # Allowed at capture, privacy mode at arrival: dropped.
    hist = history((1, T0, state(1)), (2, T1, state(2, privacy=True)))
    decision = run(status(revision=1), hist)
    assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE
    assert decision.detail == ""


def test_ecall_is_never_held_or_checked_at_capture() -> None:
    msg = streams_pb2.ECall()
    msg.header.vin = VIN
    msg.header.settings_revision = 9
    msg.header.timestamp_ms = ms(T0 - 86400)
    decision = decide(
        CTX, f"vehicle/{VIN}/tbox/ecall", msg.SerializeToString(), {}, {}, NOW, histories={}
    )
    assert isinstance(decision, Forward)


# -------------------------------------------------------------------- compaction


def test_merged_history_stays_conservative() -> None:
    hist = PRIVACY_BETWEEN
    merged = append(hist[:-1], hist[-1], 2)
    assert len(merged) == 2
    assert merged[0].first_revision == 1 and merged[0].revision == 2
    assert merged[0].since == T0
    # Revision 1 (status was allowed) now maps to the merged interval: refused.
    decision = run(status(revision=1), merged)
    assert isinstance(decision, Drop) and decision.reason is DropReason.PRIVACY_MODE
    # The oldest known time is kept: before it is still "before known".
    decision = run(status(timestamp_ms=ms(T0 - 3600)), merged)
    assert decision.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.sampled_from(list(LocationMode))),
        min_size=2,
        max_size=12,
    ),
    st.integers(min_value=2, max_value=6),
    st.integers(min_value=0, max_value=13),
    st.floats(min_value=-2, max_value=14),
)
def test_compaction_never_allows_more(
    spec: list[tuple[bool, bool, LocationMode]], limit: int, revision: int, at_h: float
) -> None:
    """Whatever the bound, a message the full history refuses at capture the
    compacted one refuses too, and never at a finer location mode."""
    full: CaptureHistory | None = None
    compact: CaptureHistory | None = None
    for i, (privacy, on, mode) in enumerate(spec):
        interval = Interval(i + 1, i + 1, T0 + i * 3600, state(i + 1, privacy=privacy,
                                                                 status=on, location=mode))
        full = append(full, interval, 1000)
        compact = append(compact, interval, limit)
    assert full is not None and compact is not None
    assert len(compact) <= limit
    now = T0 + len(spec) * 3600
    timestamp_ms = ms(T0 + at_h * 3600) if revision == 0 else 0
    revision = min(revision, len(spec))
    exact = capture_state(full, revision, timestamp_ms, now, SKEW)
    coarse = capture_state(compact, revision, timestamp_ms, now, SKEW)
    if exact is None:
        assert coarse is None
        return
    if coarse is None:
        return
    if exact.privacy_mode or "remote_control" not in exact.enabled:
        assert coarse.privacy_mode or "remote_control" not in coarse.enabled
    order = {LocationMode.OFF: 0, LocationMode.APPROXIMATE: 1, LocationMode.PRECISE: 2}
    assert order[coarse.location.effective] <= order[exact.location.effective]


def test_merge_is_strictest() -> None:
    a = Interval(1, 1, T0, state(1, location=LocationMode.APPROXIMATE))
    b = Interval(2, 2, T1, state(2, status=False))
    m = merge(a, b)
    assert (m.first_revision, m.revision, m.since) == (1, 2, T0)
    assert m.state.location is LocationMode.APPROXIMATE
    assert "remote_control" not in m.state.enabled


def test_a_stated_revision_does_not_outrank_a_restriction_or_an_erasure() -> None:
    """Restrictions and erasures happen on the gateway's clock: a car that
    applied its next revision before the gateway did must not carry data
    captured during a restriction (or before an erasure) past them."""
    r5, r6 = state(5), state(6)
    restricted = dataclasses.replace(r5, restricted=True)
    hist = history((5, T0, r5), (5, T1, restricted), (5, T1 + 1800, r5), (6, T2, r6))
    during = run(status(revision=6, timestamp_ms=ms(T1 + 600)), hist)
    assert isinstance(during, Drop) and during.reason is DropReason.RESTRICTED
    after_lift = run(status(revision=6, timestamp_ms=ms(T2 + 600)), hist)
    assert not isinstance(after_lift, Drop)
    # After an erasure the history starts again: a record captured before it
    # stays out, whatever revision it states.
    erased = history((6, T2, r6))
    before = run(status(revision=6, timestamp_ms=ms(T0 + 60)), erased)
    assert isinstance(before, Drop) and before.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS


def test_a_compacted_oldest_row_accepts_no_older_revision_after_a_restart(
    tmp_path: Path,
) -> None:
    """The revisions folded into a car's oldest stored row are unknown: after a
    restart, an older stated revision is captured before the known settings,
    never taken as allowed by that row (rules 9 and 11: no fail-open on restart)."""
    import types

    from gateway.core.state import SettingsSnapshot
    from gateway.service import GatewayService
    from gateway.store.sqlite import SqliteConsentStore

    store = SqliteConsentStore(tmp_path / "consent.db", history_limit=3)
    try:
        for i, revision in enumerate(range(5, 10)):  # the oldest three end up merged
            store.apply_settings(
                SettingsSnapshot(VIN, revision, False, LocationMode.PRECISE,
                                 {"remote_control": True}, T0 + i * 60, POLICY.version)
            )
        service = types.SimpleNamespace(
            store=store, ctx=CTX, states={VIN: state(9)},
            config=types.SimpleNamespace(
                limits=types.SimpleNamespace(capture_intervals_per_vehicle=32)
            ),
        )
        loaded = GatewayService._load_histories(service, service.states)  # type: ignore[arg-type]
    finally:
        store.close()
    decision = run(status(revision=2), loaded[VIN])
    assert isinstance(decision, Drop)
    assert decision.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS


@settings(max_examples=400, deadline=None)
@example(  # the fault it found: stamped ahead, a restriction ended within the margin
    specs=[
        (False, True, LocationMode.PRECISE, True),
        (False, True, LocationMode.PRECISE, False),
    ],
    stated_pick=2,
    offset_s=10_000.0,
    anchor=1,
    age_s=30.0,
)
@given(
    specs=st.lists(
        st.tuples(
            st.booleans(),
            st.booleans(),
            st.sampled_from([LocationMode.OFF, LocationMode.APPROXIMATE, LocationMode.PRECISE]),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    stated_pick=st.integers(min_value=-1, max_value=4),
    offset_s=st.sampled_from(
        [None, -7200.0, -SKEW - 1, -SKEW / 2, 0.0, SKEW / 2, SKEW + 1, 1800.0, 10_000.0]
    ),
    anchor=st.integers(min_value=0, max_value=3),
    age_s=st.sampled_from([30.0, SKEW + 30, 5000.0]),
)
def test_the_common_case_shortcut_decides_as_the_capture_history_does(
    specs: list[tuple[bool, bool, LocationMode, bool]],
    stated_pick: int,
    offset_s: float | None,
    anchor: int,
    age_s: float,
) -> None:
    """`decide` skips the history lookup when a message can only have been
    captured under the settings in force now (stated revision the applied one,
    or none stated, stamped after the last interval began). Whatever the
    history, revision, timestamp (a future one counts as now) and age of the
    last interval, the outcome equals what the capture history itself says:
    the refusal, or the stricter location mode."""
    from gateway.core.capture import stricter_mode

    intervals = []
    for i, (privacy, status_on, location, restricted) in enumerate(specs):
        st_ = state(i + 1, privacy=privacy, status=status_on, location=location)
        if restricted and i < len(specs) - 1:  # a restriction period in the past
            st_ = dataclasses.replace(st_, restricted=True)
        intervals.append((i + 1, T0 + i * 3600, st_))
    hist = history(*intervals)
    last = hist[-1]
    stated = 0 if stated_pick < 0 else min(stated_pick, last.revision)
    since = hist[min(anchor, len(hist) - 1)].since
    now = last.since + age_s  # the last interval began that long ago
    ts = 0 if offset_s is None else ms(since + offset_s)
    decision = run(status(stated, ts), hist, now=now)

    def refusal(st_: VehicleState) -> DropReason | None:
        if st_.restricted:
            return DropReason.RESTRICTED
        if st_.privacy_mode:
            return DropReason.PRIVACY_MODE
        if "remote_control" not in st_.enabled:
            return DropReason.FEATURE_DISABLED
        return None

    current = last.state
    expected: DropReason | LocationMode | None
    captured = capture_state(hist, stated, ts, now, SKEW)
    expected = refusal(current)
    if expected is None:
        if captured is None:
            expected = DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS
        else:
            expected = refusal(captured) or stricter_mode(current.location, captured.location)
    if isinstance(expected, DropReason):
        assert isinstance(decision, Drop), (decision, expected)
        assert decision.reason is expected, (decision, expected)
        return
    assert isinstance(decision, Forward), (decision, expected)
    shown = {
        LocationMode.OFF: "clear:position",
        LocationMode.APPROXIMATE: "coarsen:position",
        LocationMode.PRECISE: None,
    }[expected]
    position_transforms = [t for t in decision.transforms if t.endswith(":position")]
    assert position_transforms == ([shown] if shown else []), (decision.transforms, expected)


def test_the_shortcut_agrees_with_the_history_at_the_margin_and_after_a_clock_step() -> None:
    """Two cases found by review of the shortcut: a stamp on the margin, where
    milliseconds and seconds round differently, and a history whose last
    interval began before the first (the gateway's clock was set back)."""
    since = 1806247047.6990001
    restricted = dataclasses.replace(state(1), restricted=True)
    hist = history((1, since - 3600, restricted), (2, since, state(2)))
    stamped = -(-int((since + SKEW) * 1000 * 1000) // 1000)  # ceil of the margin in ms
    for stated in (0, 2):
        expected = capture_state(hist, stated, stamped, since + 5000, SKEW)
        decision = run(status(stated, stamped), hist, now=since + 5000)
        assert expected is not None
        assert isinstance(decision, Drop) == expected.restricted, (stated, decision)
    stepped_back = history((1, T1, state(1)), (2, T0, state(2)))
    for stated in (0, 2):
        assert capture_state(stepped_back, stated, ms(T0 + 300), T0 + 600, SKEW) is None
        decision = run(status(stated, ms(T0 + 300)), stepped_back, now=T0 + 600)
        assert isinstance(decision, Drop)
        assert decision.reason is DropReason.CAPTURED_BEFORE_KNOWN_SETTINGS
