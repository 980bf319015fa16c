"""The privacy notice mapped onto the default policy (issue 14, item 6)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from gateway.control.api import ROUTES
from gateway.notice import DEFAULT_NOTICE_MAP, check, load_notice_map
from gateway.policy import load_policy
from tests.conftest import DEFAULT_POLICY, REPO

API = {route.path for route in ROUTES}
# Every function of the notice's section B.I (L76-85), its sections B.II-IV,
# recipients, protocol data and each data-subject right of section C.
REQUIRED = {
    "B.I.control", "B.I.find_my_car", "B.I.charging", "B.I.ecall", "B.I.message_centre",
    "B.I.feedback", "B.I.calendar", "B.I.energy", "B.I.digital_key", "B.I.account",
    "B.I.recipients", "B.II.navigation", "B.II.search", "B.III.voice", "B.IV.third_party_apps",
    "B.protocol_data", "C.I.access", "C.II.rectification", "C.III.erasure", "C.IV.restriction",
    "C.V.portability", "C.VI.objection", "C.VII.withdraw_consent", "C.VIII.complaint",
}  # fmt: skip


def test_every_section_is_mapped_onto_entries_that_exist() -> None:
    sections = load_notice_map()
    assert {s.id for s in sections} >= REQUIRED
    assert check(sections, load_policy(DEFAULT_POLICY), API) == []
    for section in sections:
        first, _, last = section.lines.partition("-")
        assert 1 <= int(first) <= int(last or first) <= 1078, section.id
    # Where the default policy differs from what the notice says, it says why.
    differs = {s.id for s in sections if s.differs}
    assert {"B.II.navigation", "B.II.search", "B.III.voice", "B.I.energy"} <= differs


def test_a_map_that_drifts_from_the_policy_is_refused() -> None:
    sections = load_notice_map()
    policy = load_policy(DEFAULT_POLICY)
    drifted = [
        dataclasses.replace(sections[2], policy=(*sections[2].policy, "streams.tbox/gone")),
        dataclasses.replace(sections[3], policy=(), outside=""),
        sections[4],
        sections[4],
    ]
    problems = check(drifted, policy, API)
    assert any("streams.tbox/gone does not exist" in p for p in problems)
    assert any("says not why" in p for p in problems)
    assert any("listed twice" in p for p in problems)
    assert any(
        "api./v1/nothing" in p
        for p in check([dataclasses.replace(sections[2], policy=("api./v1/nothing",))], policy, API)
    )


def test_check_policy_prints_the_map_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check-policy", str(DEFAULT_POLICY), *extra],
            capture_output=True, text=True, cwd=REPO, timeout=60,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    shipped = run("--notice-map")
    assert shipped.returncode == 0, shipped.stderr
    assert "B.I.energy" in shipped.stdout and "streams.tbox/trip" in shipped.stdout
    broken = tmp_path / "map.yaml"
    broken.write_text(
        DEFAULT_NOTICE_MAP.read_text().replace("streams.tbox/trip", "streams.tbox/journey")
    )
    result = run("--notice-map", str(broken))
    assert result.returncode == 1 and "streams.tbox/journey does not exist" in result.stderr
