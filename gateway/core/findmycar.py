"""Contract rule 17, "Find-my-car is not a tracker": which fixes a window
passes and how many commands a car accepts per hour.

Pure functions over a car's accepted commands (`VehicleState.find_my_car`):
time comes in as `now` (the gateway clock), results are new tuples.

- A fix passes only inside the window of an accepted command it answers
  (`Location.request_id == Command.request_id`), at most `fixes_per_command`
  per command. A fix without a request_id (a car of contract v1) answers the
  oldest open command that has had no fix yet: the first fix inside a window,
  and no more.
- At most `max_commands_per_hour` accepted commands per car in any hour
  (sliding, on the gateway clock); more are refused `rate_limited`. A refused
  command opens nothing and does not count: the cap bounds what a poller
  learns (fixes), and counting refusals would only let a misbehaving backend
  lock the owner out for longer.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

from gateway.core.state import FindMyCarCommand, VehicleState

HOUR_S = 3600.0
# Longer request ids are refused: every accepted one is held for an hour,
# in memory and in the store.
MAX_REQUEST_ID = 128


class FixRefusal(StrEnum):
    UNANSWERED = "unanswered_location"  # answers no open command
    SPENT = "find_my_car_fixes_spent"  # its command already got its fixes


def live_commands(state: VehicleState, now: float, window_s: float) -> tuple[FindMyCarCommand, ...]:
    """The car's commands that still matter at `now`: an open window or inside
    the cap's hour. A clock that went back keeps them (fail closed).

    A state that has an open `window_until` but no command record (restored
    from a store written before rule 17) is taken as one command without a
    request id: the first fix, and it counts towards the cap.
    """
    commands = state.find_my_car
    if not commands:
        if now < state.window_until:
            accepted_at = min(now, state.window_until - window_s)
            return (FindMyCarCommand("", accepted_at, state.window_until),)
        return ()
    return tuple(c for c in commands if now < c.until or now - c.accepted_at < HOUR_S)


def rate_limited(commands: tuple[FindMyCarCommand, ...], now: float, per_hour: int) -> bool:
    """Whether one more command would exceed `per_hour` accepted in the last hour."""
    return sum(1 for c in commands if now - c.accepted_at < HOUR_S) >= per_hour


def accept(
    commands: tuple[FindMyCarCommand, ...], request_id: str, now: float, window_s: float
) -> tuple[FindMyCarCommand, ...]:
    return (*commands, FindMyCarCommand(request_id, now, now + window_s))


def answer(
    commands: tuple[FindMyCarCommand, ...],
    request_id: str,
    now: float,
    fixes_per_command: int,
) -> tuple[FindMyCarCommand, ...] | FixRefusal:
    """The commands after one fix is forwarded, or why it is not."""
    open_ = [i for i, c in enumerate(commands) if now < c.until]
    if request_id:
        matching = [i for i in open_ if commands[i].request_id == request_id]
        if not matching:
            return FixRefusal.UNANSWERED
        chosen = next((i for i in matching if commands[i].fixes < fixes_per_command), None)
    else:
        # Contract v1: the first fix inside a window, and no more.
        chosen = next((i for i in open_ if commands[i].fixes == 0), None)
    if chosen is None:
        return FixRefusal.SPENT
    spent = commands[chosen]
    return (
        *commands[:chosen],
        replace(spent, fixes=spent.fixes + 1),
        *commands[chosen + 1 :],
    )
