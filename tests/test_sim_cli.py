"""The README's main-job command runs `python -m sim demo` with no arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.cli import build_parser


def test_demo_needs_no_arguments() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.out == Path("out/demo")
    assert (args.vehicles, args.duration) == (20, "6h")


def test_run_still_requires_an_output_directory() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run"])
