"""The gateway's clock.

Production runs on wall time (`time.time`). Every time-based rule (refresh
interval, find-my-car windows, capture-time consent, command expiry) reads
this one clock, so a simulator that compresses time can drive all of them at
once through `SimulatedClock`. That clock is selectable only with the
`run --simulated-clock FILE` flag, never from a configuration file or the
environment: a production config cannot turn it on by accident.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Clock = Callable[[], float]

# How often (wall seconds) the mapping file is checked for a newer mapping: a
# simulator restarts its clock when its fleet is connected, and the gateway
# must follow within a few simulated seconds, at a negligible cost per call.
RECHECK_S = 0.02


class ClockFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TimeMapping:
    """Simulated time = sim_start_ms/1000 + (wall - wall_start) * speedup."""

    sim_start_ms: int
    wall_start: float
    speedup: float

    def at(self, wall: float) -> float:
        return self.sim_start_ms / 1000.0 + (wall - self.wall_start) * self.speedup

    def to_json(self) -> str:
        return json.dumps(
            {
                "sim_start_ms": self.sim_start_ms,
                "wall_start": self.wall_start,
                "speedup": self.speedup,
            }
        )

    @classmethod
    def parse(cls, text: str, source: str = "<clock>") -> TimeMapping:
        try:
            raw = json.loads(text)
            mapping = cls(
                sim_start_ms=int(raw["sim_start_ms"]),
                wall_start=float(raw["wall_start"]),
                speedup=float(raw["speedup"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ClockFileError(f"{source}: not a clock mapping: {exc}") from exc
        if not (math.isfinite(mapping.wall_start) and math.isfinite(mapping.speedup)):
            raise ClockFileError(f"{source}: wall_start and speedup must be finite")
        if not 0 < mapping.speedup <= 100_000:  # (0: a clock that never moves)
            raise ClockFileError(f"{source}: speedup must be in (0, 100000]")
        return mapping

    @classmethod
    def frozen(cls, sim_start_ms: int) -> TimeMapping:
        """Simulated time standing (practically) still at the simulation's start:
        what a gateway reads before the fleet's clock starts. Time then only
        moves forward when the fleet writes its mapping; a provisional mapping
        that ran ahead would step back, and settings applied meanwhile would
        seem to start after the records captured under them."""
        return cls(sim_start_ms, 0.0, 1e-9)

    def write(self, path: Path) -> None:
        """Atomically (a reader never sees half a file)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


class SimulatedClock:
    """Simulated time from a mapping file the simulator writes (and rewrites
    when it restarts its clock). A file that later turns unreadable keeps the
    last good mapping: time never falls back to the wall clock mid-run."""

    def __init__(self, path: Path, wall: Clock = time.time) -> None:
        self.path = path
        self._wall = wall
        self._mtime_ns = 0
        self._checked = 0.0
        self.mapping = self._load()  # must be readable at start

    def _load(self) -> TimeMapping:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise ClockFileError(f"{self.path}: {exc.strerror or exc}") from exc
        mapping = TimeMapping.parse(text, str(self.path))
        self._mtime_ns = stat.st_mtime_ns
        return mapping

    def __call__(self) -> float:
        wall = self._wall()
        if wall - self._checked >= RECHECK_S:
            self._checked = wall
            try:
                if self.path.stat().st_mtime_ns != self._mtime_ns:
                    self.mapping = self._load()
            except (OSError, ClockFileError):
                pass  # keep the last good mapping
        return self.mapping.at(wall)
