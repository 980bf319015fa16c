"""Bounds on what the vehicle side can make the gateway hold or do.

IngressBudget: how much vehicle traffic the gateway holds at once, in
messages and bytes.

Everything received from the vehicle side whose fate is not final counts:
undecided, decided and waiting for the backend's PUBACK, waiting behind the
publish window. Past either limit the vehicle socket is not read (TCP
back-pressure: the broker holds the rest in its own queue) until both are
back under a quarter, so an outage of the backend costs bounded memory
however long it lasts.
"""

from __future__ import annotations

from collections.abc import Callable


class IngressBudget:
    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._low_messages = max(1, max_messages // 4)
        self._low_bytes = max_bytes // 4
        self._pause = pause
        self._resume = resume
        self.messages = 0
        self.bytes = 0
        self.paused = False

    def take(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        if not self.paused and (self.messages >= self.max_messages or self.bytes >= self.max_bytes):
            self.paused = True
            self._pause()

    def give(self, size: int) -> None:
        self.messages -= 1
        self.bytes -= size
        if self.paused and self.messages <= self._low_messages and self.bytes <= self._low_bytes:
            self.paused = False
            self._resume()


class TokenBucket:
    """`rate` events per second with bursts of `burst`; the caller passes the time."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = 0.0

    def allow(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowCounter:
    """Events per key in fixed windows; forgets everything when a window ends,
    so it holds only the keys seen in the current window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._start = 0.0
        self._counts: dict[str, int] = {}

    def count(self, key: str, now: float) -> int:
        """Record one event for `key`; how many it had in this window, this one included."""
        if now - self._start >= self.window_s:
            self._start, self._counts = now, {}
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        return n

    def __len__(self) -> int:
        return len(self._counts)


class RecentDigests:
    """The last `capacity` message digests seen, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: dict[bytes, None] = {}  # insertion-ordered

    def add(self, digest: bytes) -> None:
        self._seen[digest] = None
        if len(self._seen) > self.capacity:
            del self._seen[next(iter(self._seen))]

    def __contains__(self, digest: object) -> bool:
        return digest in self._seen
