"""Consent at capture time (contract v2 rule 11): what a car's settings allowed
when a message was captured, from the intervals of settings the gateway applied.

Pure: no I/O, no clock. A car's history is a tuple of intervals, oldest first;
interval i was in force on the gateway's clock from its `since` until the next
interval's `since` (the last one until now). Bounded per car: beyond the limit
the two oldest intervals become one that allows only what both allowed
(`stricter`), so compaction loses precision, never protection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from gateway.core.state import LocationMode, VehicleState


@dataclass(frozen=True, slots=True)
class Interval:
    """Settings applied for one car from `since` on (gateway epoch seconds).

    `state` is what was allowed: a restriction period is an interval with
    `restricted` set. Revisions from `first_revision` to `revision` map to it
    (more than one when intervals were merged); a restriction set and lifted
    under one revision splits that revision into several intervals.
    """

    first_revision: int
    revision: int
    since: float
    state: VehicleState


# Oldest first, never empty (a car without applied settings has no history).
CaptureHistory = tuple[Interval, ...]

_STRICTNESS: Final = {LocationMode.OFF: 0, LocationMode.APPROXIMATE: 1, LocationMode.PRECISE: 2}


def stricter_mode(a: LocationMode, b: LocationMode) -> LocationMode:
    a, b = a.effective, b.effective
    return a if _STRICTNESS[a] <= _STRICTNESS[b] else b


def stricter(older: VehicleState, newer: VehicleState) -> VehicleState:
    """What both states allowed (privacy mode or restriction if either, the
    coarser location, a feature only if on in both); revision and find-my-car
    window of `newer`."""
    if older is newer:
        return newer
    return VehicleState(
        revision=newer.revision,
        privacy_mode=older.privacy_mode or newer.privacy_mode,
        location=stricter_mode(older.location, newer.location),
        enabled=older.enabled & newer.enabled,
        window_until=newer.window_until,
        restricted=older.restricted or newer.restricted,
    )


def merge(older: Interval, newer: Interval) -> Interval:
    """One interval covering both, allowing only what both allowed."""
    return Interval(
        first_revision=min(older.first_revision, newer.first_revision),
        revision=max(older.revision, newer.revision),
        since=older.since,
        state=stricter(older.state, newer.state),
    )


def append(history: CaptureHistory | None, interval: Interval, limit: int) -> CaptureHistory:
    """`history` with `interval` as the newest; beyond `limit` intervals the
    oldest are merged (never dropped: the oldest `since` stays the limit of
    what the gateway knows)."""
    if not history:
        return (interval,)
    intervals = [*history, interval]
    limit = max(2, limit)
    while len(intervals) > limit:
        intervals[0:2] = [merge(intervals[0], intervals[1])]
    return tuple(intervals)


def _strictest(intervals: list[Interval] | CaptureHistory) -> VehicleState:
    state = intervals[0].state
    for interval in intervals[1:]:
        state = stricter(state, interval.state)
    return state


def _overlapping(history: CaptureHistory, lo: float, hi: float) -> list[Interval]:
    """Intervals in force at some time of [lo, hi]."""
    # From the newest back (messages are mostly recent), stopping at the
    # interval in force at `lo`: every earlier one ended by then.
    found: list[Interval] = []
    end = float("inf")
    for interval in reversed(history):
        if interval.since <= hi and end > lo:
            found.append(interval)
        if interval.since <= lo:
            break
        end = interval.since
    found.reverse()
    return found


def capture_state(
    history: CaptureHistory,
    revision: int,
    timestamp_ms: int,
    now: float,
    skew_s: float,
) -> VehicleState | None:
    """The settings a message was captured under; None when it was captured
    before the oldest settings the gateway knows for that car.

    Revision stated (> 0; the caller holds a revision not applied yet): the
    interval(s) of that revision. Several (a restriction under one revision)
    are narrowed by the timestamp; a revision the gateway never saw (the car
    went 3 -> 4 -> 5, only 3 and 5 arrived) gets the strictest of its
    neighbours.

    Otherwise the timestamp: the strictest interval in force within `skew_s`
    of it. A future timestamp counts as now (still with the margin: the car's
    clock is ahead); a missing one as now exactly.
    """
    if revision > 0:
        state = _by_revision(history, revision, timestamp_ms, now, skew_s)
        window = _timestamp_window(timestamp_ms, now, skew_s)
        if state is None or window is None:
            return state
        # Restrictions and erasures happen on the gateway's clock, not under a
        # revision of the car's: a stated revision never outranks them (a car
        # that applied its next revision first would otherwise carry data
        # captured during a restriction, or before an erasure, past them).
        lo, hi = window
        if hi < history[0].since:
            return None
        if any(i.state.restricted for i in _overlapping(history, lo, hi)):
            return dataclasses.replace(state, restricted=True)
        return state
    if timestamp_ms <= 0:
        return history[-1].state
    window = _timestamp_window(timestamp_ms, now, skew_s)
    assert window is not None
    lo, hi = window
    if min(timestamp_ms / 1000.0, now) < history[0].since:
        return None
    return _strictest(_overlapping(history, lo, hi))


def _by_revision(
    history: CaptureHistory, revision: int, timestamp_ms: int, now: float, skew_s: float
) -> VehicleState | None:
    """The interval(s) of a stated revision (see capture_state)."""
    candidates = [i for i in history if i.first_revision <= revision <= i.revision]
    if len(candidates) == 1:
        return candidates[0].state
    if not candidates:
        if revision < history[0].first_revision:
            return None
        # Between two intervals (or after the last: the caller holds those).
        before = [i for i in history if i.revision < revision]
        after = [i for i in history if i.first_revision > revision]
        return _strictest([before[-1], *after[:1]])
    window = _timestamp_window(timestamp_ms, now, skew_s)
    if window is None:  # no timestamp: arrival time
        if candidates[-1] is history[-1]:
            return candidates[-1].state
        return _strictest(candidates)
    # Each candidate taken to last until the next one (or for ever): wider
    # than the truth when other revisions lie between them, so stricter.
    return _strictest(_overlapping(tuple(candidates), *window) or candidates)


def _timestamp_window(timestamp_ms: int, now: float, skew_s: float) -> tuple[float, float] | None:
    if timestamp_ms <= 0:
        return None
    t = min(timestamp_ms / 1000.0, now)
    return t - skew_s, min(t + skew_s, now)
