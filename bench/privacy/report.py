"""The privacy benchmark's printed table and its HTML page for a DPO.

Both are rendered from the results JSON only, so a page can be regenerated
from any earlier run (`python -m bench privacy --html-from FILE`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sim.report import CSS

VARIANT_LABELS = {
    "real": "this gateway",
    "v1": "weakened: contract v1 design",
    "noise": "weakened: fresh random noise per report",
    "real-shift-known": "this gateway if the secret shift leaked (sensitivity)",
}


def fmt(value: float, unit: str, metres: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "cell":
        return f"{value:.2f} cell ({metres:,.0f} m)" if metres is not None else f"{value:.2f} cell"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:,.0f} {unit}"


def _figure(attack: dict[str, Any], row: dict[str, Any]) -> str:
    return fmt(row["value"], attack["unit"], row.get("metres"))


def _target(attack: dict[str, Any]) -> str:
    return f"{attack['op']} {fmt(float(attack['target']), attack['unit'])}"


def print_privacy_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title="privacy attack benchmark (what a backend recording tsp/# can infer)")
    table.add_column("attack")
    table.add_column("target", justify="right")
    table.add_column("weakened variant", justify="right")
    table.add_column("", justify="center")
    table.add_column("this gateway", justify="right")
    table.add_column("", justify="center")
    table.add_column("detail")
    for attack in results["attacks"]:
        weak, real = attack["weakened"], attack["real"]
        table.add_row(
            attack["title"],
            _target(attack),
            f"{_figure(attack, weak)} [dim]({weak['variant']})[/]",
            "[green]PASS[/]" if weak["pass"] else "[red]FAIL[/]",
            _figure(attack, real),
            "[green]PASS[/]" if real["pass"] else "[red]FAIL[/]",
            _detail(attack),
        )
    console.print(table)
    trip = next(a for a in results["attacks"] if a["id"] == "trip_ends")
    curve = Table(title="trip ends: privacy against utility by odometer / trip distance step")
    curve.add_column("step", justify="right")
    for design in trip["curve"]:
        curve.add_column(f"trip-end error, {VARIANT_LABELS.get(design, design)}", justify="right")
    curve.add_column("trip distance error", justify="right")
    designs = list(trip["curve"])
    for i, point in enumerate(trip["curve"][designs[0]]):
        curve.add_row(
            _step_label(point["step_km"], trip.get("default_step_km")),
            *(
                fmt(trip["curve"][d][i]["privacy_cells"], "cell", trip["curve"][d][i]["privacy_m"])
                for d in designs
            ),
            f"{point['utility_trip_distance_error_km']:.2f} km",
        )
    console.print(curve)


def _step_label(step: float, default: float | None) -> str:
    label = f"{step:g} km" if step else "exact"
    if (default or 0.0) == step:
        label += " (policy)"
    return label


def print_wire_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title="privacy attacks: the core in process against the gateway over Mosquitto")
    table.add_column("attack")
    table.add_column("target", justify="right")
    table.add_column("in process", justify="right")
    table.add_column("through Mosquitto", justify="right")
    for attack in results["attacks"]:
        a, b = attack["in_process"], attack["through_mosquitto"]
        table.add_row(
            attack["title"],
            _target(attack),
            f"{_figure(attack, a)} {'PASS' if a['pass'] else 'FAIL'}",
            f"{_figure(attack, b)} {'PASS' if b['pass'] else 'FAIL'}",
        )
    console.print(table)


def _detail(attack: dict[str, Any]) -> str:
    real = attack["real"]
    if attack["id"] in ("home_work", "averaging"):
        return f"best attack on this gateway: {real['best_estimator']} ({real['samples']} places)"
    if attack["id"] == "trip_ends":
        honest = real.get("honest_clock_cars", {})
        utility = attack.get("utility_trip_distance_error_km")
        return (
            f"best: {real['best_estimator']}; honest clocks {honest.get('value', float('nan')):.2f}"
            f" cell; trip distance error {utility if utility is not None else float('nan'):.3f} km"
        )
    if attack["id"] == "find_my_car":
        return f"median {real['median']:.0f} fixes/h over {real['cars']} cars"
    if attack["id"] == "late_data":
        judged = ", ".join(f"{k.split(':')[1]} {v}" for k, v in real["leaked"].items())
        return (
            f"{judged}; cars stating no revision with a wrong or silent clock (the contract"
            f" takes their timestamp or arrival as capture time): {real['undecidable_leaked']:,}"
        )
    if attack["id"] == "app_linkage":
        values, timing = real.get("by_values", {}), real.get("by_timing", {})
        return (
            f"{values.get('correct', 0):,}/{values.get('pseudonyms', 0):,} by shared values;"
            f" by arrival time (a backend reading every topic; the documented limit)"
            f" {timing.get('correct', 0):,}/{timing.get('pseudonyms', 0):,}"
            f" (chance {timing.get('chance', float('nan')):.2%})"
        )
    if attack["id"] == "utility":
        return (
            f"{real['delivered']:,}/{real['allowed']:,} allowed delivered; within the skew"
            f" margin of a settings change (clock-judged cars)"
            f" {real['within_skew_margin_delivered']:,}/{real['within_skew_margin']:,};"
            f" cars stating no revision with a wrong or silent clock"
            f" {real['wrong_clock_delivered']:,}/{real['wrong_clock']:,};"
            f" approximate position error median"
            f" {real.get('position_error_m', float('nan')):,.0f} m"
        )
    return ""


# ---------------------------------------------------------------------- HTML

_PLAIN = {
    "home_work": (
        "Where the driver lives and works",
        "A car's home and workplace identify its driver. With approximate location on, the"
        " backend should not be able to place them closer than about a grid cell.",
    ),
    "averaging": (
        "Averaging many reports of a parked car",
        "If every report were blurred differently, the average of a week of reports would land"
        " on the car. Approximate values must not converge.",
    ),
    "trip_ends": (
        "Where trips end",
        "Where the approximate value changes during a drive, a grid line was crossed; with the"
        " odometer the backend can tell how far the car drove after that line. This must not"
        " pin down where a trip ended.",
    ),
    "find_my_car": (
        "Tracking through find-my-car",
        "Find-my-car lets the owner locate the parked car. Polling it must not turn it into a"
        " tracker: only a few fixes per hour, each answering one request.",
    ),
    "late_data": (
        "Data captured while sharing was off",
        "Cars buffer data and upload it later. What was captured during privacy mode, or while a"
        " function or location was switched off, must never reach the backend.",
    ),
    "app_linkage": (
        "Who is behind an app pseudonym",
        "Third-party apps get the car's data under a pseudonym. Nothing in those messages may"
        " match the same car's VIN-keyed messages; arrival times still can, for a backend that"
        " reads every topic (app backends should see only their own).",
    ),
    "utility": (
        "What the service still gets",
        "Privacy must not cost the functions the driver allowed: every allowed message delivered.",
    ),
}


def _esc(value: object) -> str:
    return html.escape(str(value))


def privacy_section(results: dict[str, Any]) -> str:
    """The privacy benchmark as an HTML section (no page chrome), for a DPO."""
    policy, fleet, options = results["policy"], results["fleet"], results["options"]
    parts = [
        "<h2>Privacy attack benchmark</h2>",
        "<p>An adversary who receives everything the gateway sends to the backend (every topic,"
        " payload, metadata and arrival time) tried to learn what approximate location is meant"
        f" to hide. {options['cars']:,} simulated cars drove for {options['days']} days"
        f" (seed {options['seed']}); {fleet.get('approximate_cars_scored', 0):,} of them shared"
        f" approximate location (grid cell {policy['cell_size_m']:,.0f} m, refreshed at most"
        f" every {policy['refresh_interval_s']:,.0f} s). Distances are given in cells: an"
        f" error of 0.40 cell means the attacker is typically"
        f" {0.4 * policy['cell_size_m']:,.0f} m off. Each attack was run against this gateway"
        " and against a deliberately weakened design, to show the attack works: the weakened"
        " design should fail and this gateway should pass.</p>",
        "<table><tr><th>what was at stake</th><th class='text'>what the attacker tried</th>"
        "<th>target</th><th>weakened design</th><th>this gateway</th></tr>",
    ]
    for attack in results["attacks"]:
        title, why = _PLAIN.get(attack["id"], (attack["title"], ""))
        weak, real = attack["weakened"], attack["real"]
        parts.append(
            "<tr>"
            f"<td><b>{_esc(title)}</b><br><small>{_esc(why)}</small></td>"
            f"<td class='text'>{_esc(attack['attacker'])}<br><small>measured: "
            f"{_esc(attack['metric'])}</small></td>"
            f"<td>{_esc(_target(attack))}</td>"
            f"<td class='{'met' if weak['pass'] else 'missed'}'>{_esc(_figure(attack, weak))}<br>"
            f"{'PASS' if weak['pass'] else 'FAIL'}<br><small>"
            f"{_esc(VARIANT_LABELS.get(weak['variant'], weak['variant']))}</small></td>"
            f"<td class='{'met' if real['pass'] else 'missed'}'>{_esc(_figure(attack, real))}<br>"
            f"{'PASS' if real['pass'] else 'FAIL'}<br><small>{_esc(_detail(attack))}</small></td>"
            "</tr>"
        )
    parts.append("</table>")
    trip = next(a for a in results["attacks"] if a["id"] == "trip_ends")
    designs = list(trip["curve"])
    parts.append(
        "<h3>Trip ends: privacy against utility</h3><p>Rounding the odometer and trip distance"
        " down to a step makes trip ends harder to reconstruct, and makes the trip distance the"
        " service sees less exact. Trip-end error (higher is more private) against the error it"
        " introduces in trip distance:</p><table><tr><th>step</th>"
        + "".join(f"<th>trip-end error, {_esc(VARIANT_LABELS.get(d, d))}</th>" for d in designs)
        + "<th>trip distance error</th></tr>"
    )
    for i, point in enumerate(trip["curve"][designs[0]]):
        step = _step_label(point["step_km"], trip.get("default_step_km"))
        cells = "".join(
            "<td>{}</td>".format(
                _esc(
                    fmt(
                        trip["curve"][d][i]["privacy_cells"],
                        "cell",
                        trip["curve"][d][i]["privacy_m"],
                    )
                )
            )
            for d in designs
        )
        parts.append(
            f"<tr><td>{step}</td>{cells}"
            f"<td>{point['utility_trip_distance_error_km']:.2f} km</td></tr>"
        )
    parts.append("</table>")
    parts.append(
        "<h3>The designs compared</h3><ul>"
        + "".join(
            f"<li><b>{_esc(VARIANT_LABELS.get(name, name))}</b>: {_esc(text)}</li>"
            for name, text in results.get("variants", {}).items()
        )
        + "</ul><p><small>A FAIL of this gateway where a defence is still being built is"
        " expected; docs/privacy.md lists which. Raw figures: the JSON file next to this"
        " page.</small></p>"
    )
    return "\n".join(parts)


def write_html(results: dict[str, Any], path: Path) -> Path:
    page = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Privacy attack benchmark</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Privacy attack benchmark</h1>",
        f"<p><small>{_esc(results.get('command', ''))}, started"
        f" {_esc(results.get('started', ''))}, policy {_esc(results['policy']['version'])},"
        f" {results.get('seconds', float('nan')):.0f} s.</small></p>",
        privacy_section(results),
        "</body></html>",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(page), encoding="utf-8")
    return path
