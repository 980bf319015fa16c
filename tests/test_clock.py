"""The gateway clock the simulator drives (`run --simulated-clock`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.clock import ClockFileError, SimulatedClock, TimeMapping

ROOT = Path(__file__).resolve().parent.parent


class FakeWall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_simulated_time_runs_speedup_times_faster(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    TimeMapping(sim_start_ms=1_000_000, wall_start=500.0, speedup=240).write(path)
    wall = FakeWall(500.0)
    clock = SimulatedClock(path, wall)
    assert clock() == pytest.approx(1000.0)
    wall.t = 501.5
    assert clock() == pytest.approx(1000.0 + 1.5 * 240)


def test_a_rewritten_mapping_is_followed_and_a_broken_one_ignored(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    TimeMapping(0, 100.0, 10).write(path)
    wall = FakeWall(100.0)
    clock = SimulatedClock(path, wall)
    # The simulator restarts its clock (the fleet connected): the gateway follows.
    TimeMapping(50_000, 105.0, 10).write(path)
    os.utime(path, ns=(1, 1))  # a distinct mtime whatever the filesystem's resolution
    wall.t = 106.0
    assert clock() == pytest.approx(50.0 + 10.0)
    # A file that turns unreadable keeps the last good mapping, never wall time.
    path.write_text("{not json")
    os.utime(path, ns=(2, 2))
    wall.t = 107.0
    assert clock() == pytest.approx(50.0 + 20.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        '{"sim_start_ms": 0, "wall_start": 1, "speedup": 0}',
        '{"sim_start_ms": 0, "wall_start": "nan", "speedup": 2}',
    ],
)
def test_an_unusable_mapping_is_refused_at_start(tmp_path: Path, text: str) -> None:
    path = tmp_path / "clock.json"
    path.write_text(text)
    with pytest.raises(ClockFileError):
        SimulatedClock(path)
    with pytest.raises(ClockFileError):
        SimulatedClock(tmp_path / "missing.json")


def test_run_refuses_a_missing_clock_file_and_it_is_not_a_config_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--state-dir",
            str(tmp_path / "state"),
            "--simulated-clock",
            str(tmp_path / "missing.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "simulated-clock" in result.stderr
    # Only a command-line flag: no configuration section or key selects it.
    for shipped in (ROOT / "config").glob("*.toml"):
        assert "simulated" not in shipped.read_text().lower()


def test_before_the_fleet_starts_time_stands_at_the_start_and_never_steps_back(
    tmp_path: Path,
) -> None:
    """A provisional mapping that ran ahead would step back when the fleet's
    clock starts: settings applied meanwhile would seem to begin after the
    records captured under them (and those would count as captured before)."""
    path = tmp_path / "clock.json"
    TimeMapping.frozen(1_000_000).write(path)
    wall = FakeWall(1_800_000_000.0)
    clock = SimulatedClock(path, wall)
    before = clock()
    wall.t += 30  # the gateway waits for the fleet
    assert clock() == pytest.approx(before, abs=1e-3) == pytest.approx(1000.0, abs=2)
    TimeMapping(1_000_000, wall.t, 240).write(path)  # the fleet starts its clock
    os.utime(path, ns=(5, 5))
    wall.t += 1
    assert clock() >= before and clock() == pytest.approx(1000.0 + 240, abs=2)
