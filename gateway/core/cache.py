"""A memo bounded by an estimate of its bytes, for keys that cars control.

The decision core shares immutable objects between vehicles (states, sets of
enabled features); the memos that make them shared are keyed by what cars
send. Counting entries is not enough when an entry's size is also chosen by
the sender, so each entry is charged an estimate of its bytes and the memo
starts over when the budget is spent (the objects stay valid; only sharing
is lost until the memo fills again).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ENTRY_OVERHEAD = 120  # dict slot, tuple or frozenset header, the value object
PER_STRING = 72  # a short str object plus its slot in a tuple or set


def strings_size(names: Iterable[str] | Iterable[tuple[str, bool]]) -> int:
    """Estimated bytes of a collection of feature ids or (id, flag) pairs."""
    total = ENTRY_OVERHEAD
    for item in names:
        name = item[0] if isinstance(item, tuple) else item
        total += PER_STRING + len(name)
    return total


class ByteBoundedMemo(Generic[K, V]):
    def __init__(self, max_bytes: int, sizeof: Callable[[K], int]) -> None:
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._entries: dict[K, V] = {}
        self.bytes = 0

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> V:
        """Remember `value` for `key` unless one is remembered; return the remembered one."""
        found = self._entries.get(key)
        if found is not None:
            return found
        size = self._sizeof(key)
        if self.bytes + size > self.max_bytes:
            self._entries.clear()
            self.bytes = 0
        self._entries[key] = value
        self.bytes += size
        return value

    def __len__(self) -> int:
        return len(self._entries)
