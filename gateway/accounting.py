"""Per-vehicle egress counts (the Art. 15 export), durable before their acks.

A forwarded message is counted, and its upstream acknowledgement waits until
the count is committed: a crash can then only over-count (a committed count
whose ack was lost is counted again when the broker redelivers), never
forget what was sent. Commits are grouped: whatever was counted while the
previous commit ran goes into the next one, so one fsync covers many
messages. Under load, commits start at most every COMMIT_PACE_S: back to
back, each would cover a few messages and cost an fsync (most of the store's
CPU per message at saturation). After a quiet spell the next commit starts
at once, so a lone message waits for no timer; and the pace delays only the
vehicle-side acknowledgement, never the forward (sent before it is counted).

Location anchors (contract rule 13) ride in the same commits: an anchor set
by a message is durable before that message is acknowledged, so a restart
finds the anchor still there and cannot be used to force an early refresh
(a crash before the commit leaves the message unacknowledged: redelivered,
it sets the same coarse value again). No extra fsync per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.core.state import LocationAnchor
from gateway.store import CountKey, EgressCount

log = logging.getLogger("gateway.accounting")

# At most one commit per this much time under load (see above); well inside
# the vehicle-side keepalive and Receive Maximum window.
COMMIT_PACE_S = 0.004


class EgressAccounting:
    def __init__(
        self,
        write: Callable[[list[EgressCount]], Awaitable[object]],
        write_anchors: Callable[[dict[str, LocationAnchor]], Awaitable[object]] | None = None,
        subject: Callable[[str], str] = str,
        pace_s: float = COMMIT_PACE_S,
    ) -> None:
        self._write = write
        self._pace_s = pace_s
        self._last_commit = float("-inf")  # loop time the last paced commit started
        self._subject = subject  # how the rows written name a car (the store never sees VINs)
        self._write_anchors = write_anchors
        self._anchors: dict[str, LocationAnchor] = {}  # latest per vehicle, not yet written
        self._counts: dict[CountKey, int] = {}
        self._waiting: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one commit at a time: run() and flush() share it
        self._recorded = 0  # records so far
        self._committed = 0  # records covered by a finished commit
        self._day_cache: tuple[float, float, str] = (0.0, 0.0, "")

    def day(self, now: float) -> str:
        start, end, day = self._day_cache
        if not start <= now < end:
            midnight = now - now % 86400
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self._day_cache = (midnight, midnight + 86400, day)
        return day

    def record(self, key: CountKey, then: Callable[[], None] | None = None) -> None:
        """Count one forwarded message; `then` runs once the count is durable."""
        self._counts[key] = self._counts.get(key, 0) + 1
        self._recorded += 1
        if then is not None:
            self._waiting.append(then)
        self._wake.set()

    def anchor(self, vin: str, anchor: LocationAnchor) -> None:
        """Persist `vin`'s new location anchor with the next commit: every count
        recorded after this (the message that set it included) waits for it."""
        self._anchors[vin] = anchor
        self._recorded += 1
        self._wake.set()

    def pending_keys(self) -> list[CountKey]:
        return list(self._counts)

    def forget(self, vin: str) -> None:
        """Erasure: counts not yet written for `vin` are never written."""
        for key in [k for k in self._counts if k[0] == vin]:
            del self._counts[key]
        self._anchors.pop(vin, None)

    async def flush(self) -> None:
        """Commit what is counted up to now (not what keeps arriving meanwhile,
        or an export would wait for traffic to stop)."""
        target = self._recorded
        while self._committed < target:
            await self._commit_once()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            wait = self._last_commit + self._pace_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # what arrives meanwhile joins this commit
            self._last_commit = loop.time()
            await self._commit_once()

    async def _commit_once(self) -> None:
        async with self._lock:
            self._wake.clear()
            counts, self._counts = self._counts, {}
            anchors, self._anchors = self._anchors, {}
            waiting, self._waiting = self._waiting, []
            upto = self._recorded
            if anchors and self._write_anchors is not None:
                await self._write_anchors(anchors)
            if counts:
                subject = self._subject
                await self._write(
                    [
                        EgressCount(subject(vin), day, stream, feature, version, n)
                        for (vin, day, stream, feature, version), n in counts.items()
                    ]
                )
            self._committed = max(self._committed, upto)
            for then in waiting:
                then()
