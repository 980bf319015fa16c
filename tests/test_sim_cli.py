"""The README's main-job command runs `python -m sim demo` with no arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import build_parser
from sim.testing import run_in_memory


def test_demo_needs_no_arguments() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.out == Path("out/demo")
    assert (args.vehicles, args.duration) == (20, "6h")


def test_run_still_requires_an_output_directory() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run"])


def test_check_summary_fits_an_80_column_terminal(tmp_path: Path) -> None:
    """What `sim check` and `sim demo` print at the end, in an 80-column terminal."""
    run_in_memory(tmp_path, vehicles=4, duration_s=3 * 3600, seed=3)
    result = subprocess.run(
        [sys.executable, "-m", "sim", "check", "--out", str(tmp_path), "--no-report",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "80"}, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stderr
    assert "…" not in result.stderr  # no name or heading cut short
    assert any(line.lstrip().startswith("tbox/connectivity") for line in lines)
    assert any("dropped as required, by reason" in line for line in lines)
    assert any(line.startswith("PASS  leaks 0 (target 0), losses 0 (target 0)") for line in lines)
    assert "(target 100%)" in result.stderr


def test_demo_help_shows_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sim", "demo", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"}, cwd=Path(__file__).resolve().parents[1],
    )
    for shown in ("fleet size (default: 20)", "(default: 6h)", "(default: out/demo)",
                  "config/gateway.toml)"):
        assert shown in result.stdout, result.stdout
    assert "(default: None)" not in result.stdout
