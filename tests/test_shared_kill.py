"""`python -m sim group`: three real gateway processes on one shared
subscription and one PostgreSQL store, a seeded fleet changing its privacy
settings 30 times as often as usual (changes and the next messages race
across instances), the last instance killed with -9 mid-run and restarted
under its instance id, another paused (SIGSTOP) three times for 2 s (what the
broker gave it meanwhile is decided late, under the settings it finds then);
the checker judges every message (issue 12, item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_three_instances_one_killed_no_leak_no_loss(tmp_path: Path) -> None:
    out = tmp_path / "group"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "sim", "group", "--no-live", "--instances", "3"),
            *("--vehicles", "12", "--duration", "2h", "--seed", "2", "--out", str(out)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (out / "group.json").exists(), done.stderr[-4000:]
    report = json.loads((out / "group.json").read_text())
    problems = json.dumps(report)[:2000] + done.stderr[-3000:]
    assert len(report["kills"]) == 1 and report["kills"][0]["instance_exit"] == -9, problems
    assert [p["paused_s"] >= 2.0 for p in report["pauses"]] == [True] * 3, problems
    assert report["settings_sent"] > 200, problems  # a high rate of changes
    assert report["leaks"] == 0, problems
    assert report["losses"] == 0, problems
    # What the checker leaves unjudged stays the exception (2 in a typical run:
    # a message missing because the car's next settings, sent while the
    # gateway may not have got to it yet, drop it).
    assert report["missing_not_judged"] <= 8, problems
    assert done.returncode == 0, problems
    # Every instance decided part of the traffic: each applied some of the
    # fleet's settings (it logs every one it applies).
    for name in ("a", "b", "c"):
        logs = "".join(p.read_text() for p in out.glob(f"gateway-{name}-*.log"))
        assert "settings applied" in logs, f"instance {name} applied no settings"
    assert "gateway ready" in (out / "gateway-c-2.log").read_text()  # c came back
