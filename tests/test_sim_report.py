"""The HTML report, for a data protection officer: key figures next to their targets,
a field-by-field summary derived from the policy and the recording, a legend for every
colour, consent strips under the maps; and it renders in a real browser (headless
Chromium) without a single console error."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.checker import LEAK, LOSS, CheckResult, Issue, check_run
from sim.policy import load_policy
from sim.report import (
    CATEGORIES,
    field_rows,
    key_figures,
    parse_transform,
    write_report,
)
from sim.testing import run_in_memory

WINDOW = (1400, 1000)


@dataclass
class Report:
    out: Path
    result: CheckResult
    html: str


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("report-run")
    run_in_memory(out, vehicles=10, duration_s=6 * 3600, seed=5)
    result = check_run(out, state_dir=out / "state")
    assert result.issues == [], result.summary_json()
    path = write_report(out, result)
    return Report(out, result, path.read_text())


def _table(html: str, table_id: str) -> str:
    match = re.search(rf"<table id='{table_id}'>(.*?)</table>", html, re.S)
    assert match, f"no table {table_id}"
    return match.group(1)


def _cells(row: str) -> list[str]:
    cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in cells]


def test_the_report_is_self_contained(report: Report) -> None:
    assert "<script" not in report.html
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", report.html)
    assert "<link" not in report.html


def test_key_figures_stand_next_to_their_targets(report: Report) -> None:
    rows = _table(report.html, "key-figures").split("</tr>")[1:-1]
    figures = {cells[0].split(":")[0]: cells[1:] for cells in map(_cells, rows)}
    assert figures["Leaks"] == ["0", "0", "met"]
    assert figures["Losses"] == ["0", "0", "met"]
    assert figures["Allowed messages delivered"] == ["100.0%", "100%", "met"]
    centre = next(v for k, v in figures.items() if k.startswith("Message-centre"))
    dpo = next(v for k, v in figures.items() if k.startswith("DPO actions"))
    assert centre[2] == "met" and " delivered" in centre[0]
    assert dpo[2] == "met" and "ownership change:done" in dpo[0]
    for name, (value, target, met) in figures.items():
        assert value and target and met in ("met", "MISSED", "nothing to judge"), name


def test_a_missed_target_says_so(report: Report) -> None:
    broken = copy.copy(report.result)
    broken.issues = [
        Issue(LEAK, "forwarded_in_privacy_mode", "tbox/status", "V", "x"),
        Issue(LOSS, "allowed_message_not_delivered", "tbox/status", "V", "y"),
    ]
    broken.utility_delivered = 0.99
    policy = load_policy()
    figures = {f.name.split(":")[0]: f for f in key_figures(broken, [], policy)}
    assert (figures["Leaks"].value, figures["Leaks"].met) == ("1", False)
    assert (figures["Losses"].value, figures["Losses"].met) == ("1", False)
    assert figures["Allowed messages delivered"].met is False
    broken.messages = Counter({"delivered": 3, "leaked": 1})
    broken.operator = Counter({"objection:failed": 1})
    figures = {f.name.split(":")[0]: f for f in key_figures(broken, [], policy)}
    centre = next(f for k, f in figures.items() if k.startswith("Message-centre"))
    dpo = next(f for k, f in figures.items() if k.startswith("DPO actions"))
    assert centre.met is False and dpo.met is False


def test_field_summary_comes_from_the_policy_and_the_recording(report: Report) -> None:
    """Every personal field the policy names has a row; the counts are the `transforms`
    user properties of the recording, counted independently here."""
    policy = load_policy()
    rows, received = field_rows(report.result, policy)
    by_field = {(r.stream, r.name): r for r in rows}
    for rule in policy.streams.values():
        if policy.is_legal_obligation(rule.key):
            assert (rule.key, "all fields") in by_field  # forwarded unchanged, one row
            continue
        for name in rule.fields:
            assert (rule.key, name) in by_field, (rule.key, name)
    recording = [
        json.loads(line) for line in (report.out / "recording.jsonl").read_text().splitlines()
    ]
    forwarded: Counter[str] = Counter()
    listed: Counter[tuple[str, str]] = Counter()
    for record in recording:
        parts = record["topic"].split("/")
        if parts[2] in ("cmd", "msg"):
            continue
        stream = "/".join(parts[2:])
        key = "avn/app/{app_id}" if stream.startswith("avn/app/") else stream
        forwarded[key] += 1
        props = dict(record["props"])
        for token in filter(None, props.get("transforms", "").split(",")):
            listed[(key, token)] += 1
    assert received == forwarded
    # Both label styles (the gateway's action:field, the reference model's field:outcome).
    assert by_field[("tbox/connectivity", "ip_address")].seen["truncated"] == (
        listed[("tbox/connectivity", "ip_address:truncated")]
        + listed[("tbox/connectivity", "truncate_ip:ip_address")]
    ) > 0
    assert by_field[("tbox/connectivity", "iccid")].seen["removed"] > 0
    assert by_field[("tbox/digital_key", "bluetooth_mac")].seen["hmac"] == forwarded[
        "tbox/digital_key"
    ]
    assert by_field[("avn/app/{app_id}", "vin")].seen["hmac"] == forwarded["avn/app/{app_id}"]
    status = by_field[("tbox/status", "position")].seen
    assert status["cleared"] + status["coarsened"] > 0
    table = _table(report.html, "field-summary")
    assert "class='bad'" not in table  # nothing the policy does not call for
    heads = _cells(table.split("</tr>")[0])
    for _, title in CATEGORIES:
        assert title in heads


def test_a_treatment_the_policy_does_not_call_for_is_red(report: Report, tmp_path: Path) -> None:
    forged = copy.copy(report.result)
    forged.transforms_seen = {
        **report.result.transforms_seen,
        "tbox/status": Counter({"hmac:position": 2, "remove:engine_serial": 1}),
    }
    for name in ("ground_truth.jsonl",):
        shutil.copy(report.out / name, tmp_path / name)
    html = write_report(tmp_path, forged).read_text()
    table = _table(html, "field-summary")
    assert "<td class='bad'>2 (not in the policy)</td>" in table
    assert "engine_serial" in table and "not a field the policy names" in table


def test_parse_transform_reads_both_label_styles() -> None:
    rule = load_policy().streams["tbox/connectivity"]
    assert parse_transform("truncate_ip:ip_address", rule) == ("ip_address", "truncated")
    assert parse_transform("ip_address:truncated", rule) == ("ip_address", "truncated")
    assert parse_transform("remove:iccid", rule) == ("iccid", "removed")
    assert parse_transform("iccid:removed", rule) == ("iccid", "removed")
    battery = load_policy().streams["tbox/battery"]
    assert parse_transform("evse_id:removed", battery) == ("evse_id", "cleared")
    assert parse_transform("clear:evse_id", battery) == ("evse_id", "cleared")
    assert parse_transform("coarsen:charging_location", battery) == (
        "charging_location",
        "coarsened",
    )
    assert parse_transform("pseudonymize:vin", rule) == ("vin", "hmac")
    assert parse_transform("trim", rule) == ("(message)", "trimmed")
    assert parse_transform("mystery", rule) == ("mystery", "other")


def test_every_colour_has_a_legend(report: Report) -> None:
    marks = set(re.findall(r"<(?:rect|circle)[^>]*?\sfill='(#[0-9a-f]{6})'", report.html))
    marks |= set(re.findall(r"<polyline[^>]*?\sstroke='(#[0-9a-f]{6})'", report.html))
    legend = set(re.findall(r"data-colour='(#[0-9a-f]{6})'", report.html))
    assert len(marks) >= 6  # the run drew maps, bars and timelines
    assert marks <= legend, f"colours without a legend: {marks - legend}"


def test_map_cards_put_the_consent_strip_under_the_map(report: Report) -> None:
    cards = re.findall(r"<div class='map'>(.*?)</svg></div>", report.html, re.S)
    assert cards
    for card in cards:
        assert card.index("class='route'") < card.index("class='strip-title'")
        assert card.index("class='strip-title'") < card.index("class='consent'")
    assert ".map svg{display:block}" in report.html


# ------------------------------------------------------------------ in a browser

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs it)"
)

# Injected into a copy of the page (the report itself has no scripts): records script
# errors, failed loads and console.error, measures the layout, and writes it all into
# the DOM for --dump-dom.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  'error: ' + (e.message || (e.target && (e.target.src || e.target.href)) || 'resource')), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push('console.error: ' + args.join(' '));
  __consoleError(...args); };
window.addEventListener('load', () => {
  const box = el => { const r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; };
  const probe = document.createElement('pre');
  probe.id = 'test-probe';
  probe.textContent = JSON.stringify({
    errors: window.__errors,
    maps: [...document.querySelectorAll('.map')].map(card => ({
      route: box(card.querySelector('svg.route')), consent: box(card.querySelector('svg.consent'))
    })),
    fieldRows: document.querySelectorAll('#field-summary tr').length,
    keyFigures: document.querySelectorAll('#key-figures tr').length,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  });
  document.body.appendChild(probe);
});
</script>"""


def chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},"
         f"{WINDOW[1]}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         *flags, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def probe(page_html: str, tmp_path: Path) -> tuple[dict[str, object], list[str]]:
    """What the probe saw, and the console lines Chromium logged (SVG attribute errors and
    the like never reach a script, only this log)."""
    page = tmp_path / "probed.html"
    page.write_text(page_html.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = chromium(page, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="test-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, "the page did not finish loading:\n" + result.stdout[-2000:]
    seen: dict[str, object] = json.loads(html.unescape(found.group(1)))
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return seen, console


@needs_chromium
def test_the_probe_catches_console_errors(tmp_path: Path) -> None:
    """The check below can fail: a script error, a failed load and an invalid SVG
    attribute are all caught."""
    page = (
        "<!doctype html><html><head></head><body>"
        "<svg width='10' height='10'><rect width='-5' height='2' fill='#ff0000'/></svg>"
        "<img src='missing.png'><script>undefinedFunction()</script></body></html>"
    )
    seen, console = probe(page, tmp_path)
    errors = seen["errors"]
    assert isinstance(errors, list) and len(errors) == 2, errors
    assert any("undefinedFunction" in e for e in errors)
    assert any("A negative value is not valid" in line for line in console), console


@needs_chromium
def test_report_renders_in_chromium_without_errors(report: Report, tmp_path: Path) -> None:
    seen, console = probe(report.html, tmp_path)
    assert seen["errors"] == [] and console == [], (seen["errors"], console)
    policy = load_policy()
    # One row per field the policy names; the legal-obligation stream has one for all.
    fields = sum(
        len(r.fields) for r in policy.streams.values() if not policy.is_legal_obligation(r.key)
    )
    assert isinstance(seen["fieldRows"], int) and seen["fieldRows"] > fields
    assert seen["keyFigures"] == 1 + len(key_figures(report.result, [], load_policy()))
    assert seen["overflow"] == 0  # nothing wider than a 1400-pixel window
    maps = seen["maps"]
    assert isinstance(maps, list) and maps
    for card in maps:
        route, consent = card["route"], card["consent"]
        assert consent["top"] >= route["bottom"], card  # under the map, not beside it
        assert abs(consent["left"] - route["left"]) < 1 and consent["right"] <= route["right"] + 1


@needs_chromium
def test_report_screenshot(report: Report, tmp_path: Path) -> None:
    """A full-height screenshot (kept next to the report as report.png for a human look)."""
    shot = report.out / "report.png"
    result = chromium(
        report.out / "report.html",
        tmp_path / "profile",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},5200",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WINDOW[0], 5200)
    assert len(data) > 100_000  # tables, bars and maps, not a blank page
    assert not [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
