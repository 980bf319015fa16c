"""Targets, machine info, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.procs import REPO

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    op: str  # ">=" or "<="
    limit: float
    unit: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "detail": self.detail,
            "pass": self.passed,
        }


def targets(results: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    tp = results.get("throughput")
    if tp:
        med, ratios = tp["median_msg_s"], tp["median_ratios"]
        detail = (
            f"gateway {med['gateway']:,.0f}, no-op {med['noop']:,.0f}, naive {med['naive']:,.0f},"
            f" broker path {med['broker']:,.0f} msg/s"
        )
        out.append(
            Target(
                "throughput gateway / no-op relay",
                ratios["gateway_vs_noop"],
                ">=",
                0.9,
                "x",
                detail,
            )
        )
        out.append(
            Target("throughput gateway / naive relay", ratios["gateway_vs_naive"], ">=", 3.0, "x")
        )
        # Issue 13's mixed-fleet target, against v1 run in the same rounds
        # (bench/baseline.py): its table figure was taken in another phase of
        # a machine whose speed changes 2-3x.
        baseline = med.get("baseline")
        out.append(
            Target(
                "mixed fleet throughput gateway / v1 baseline, same run",
                ratios.get("gateway_vs_baseline", math.nan),
                ">=",
                1.5,
                "x",
                "baseline not run" if baseline is None else f"v1 {baseline:,.0f} msg/s",
            )
        )
        out.append(
            Target(
                "throughput gateway / broker path (info)",
                ratios["gateway_vs_broker"],
                ">=",
                0.0,
                "x",
            )
        )
    lat = results.get("latency")
    if lat:
        g, b = lat["median"]["gateway"], lat["median"]["broker"]
        detail = (
            f"gateway p50 {g['p50_ms']:.2f} / p99 {g['p99_ms']:.2f} ms;"
            f" broker path p50 {b['p50_ms']:.2f} / p99 {b['p99_ms']:.2f} ms"
        )
        out.append(
            Target("added latency p50 @2k msg/s", lat["added_ms"]["p50"], "<=", 1.0, "ms", detail)
        )
        out.append(Target("added latency p99 @2k msg/s", lat["added_ms"]["p99"], "<=", 5.0, "ms"))
        out.append(
            Target(
                "samples in 35-50 ms (Nagle) band",
                lat["nagle_band_share"] * 100,
                "<=",
                0.1,
                "%",
            )
        )
        out.append(
            Target(
                "settings change -> PrivacyApplied p99",
                lat["settings_p99_ms"],
                "<=",
                20.0,
                "ms",
                f"p50 {lat['settings_p50_ms']:.1f} ms, {lat['settings_per_second']:g}/s under load",
            )
        )
    core = results.get("core")
    if core:
        # Issue 13: 200k with the contract v2 rules, when v1 did 158-171k.
        out.append(Target("decision core (one core)", core["median_msg_s"], ">=", 200_000, "msg/s"))
        out.append(
            Target(
                "decision core / v1 core, same run (info)",
                core.get("median_vs_baseline", math.nan),
                ">=",
                0.0,
                "x",
                "200k was 1.17-1.27x v1's 158-171k",
            )
        )
        if core.get("python_rates_msg_s"):
            out.append(
                Target(
                    "decision core compiled / as Python, same run (info)",
                    core.get("median_vs_python", math.nan),
                    ">=",
                    0.0,
                    "x",
                    "mypyc (scripts/compile_native.py)",
                )
            )
    sc = results.get("scale")
    if sc:
        out.append(
            Target(
                f"state RSS per vehicle ({sc['large_vehicles']:,} vehicles)",
                sc["bytes_per_vehicle"],
                "<=",
                300,
                "B",
                f"after traffic {sc['bytes_per_vehicle_after_traffic']:.0f} B",
            )
        )
        out.append(
            Target(
                f"restart with {sc['large_vehicles']:,} vehicles to ready",
                sc["ready_median_s"],
                "<=",
                10.0,
                "s",
                f"state load {sc['load_median_s']:.2f} s",
            )
        )
        med = sc["median_msg_s"]
        out.append(
            Target(
                "throughput 1M / 1k known vehicles",
                sc["median_ratio"],
                ">=",
                0.9,
                "x",
                f"1k {med['small']:,.0f}, 1M {med['large']:,.0f} msg/s",
            )
        )
    return out


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "msg/s":
        return f"{value:,.0f} {unit}"
    if unit == "B":
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}"


def print_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title="vehicle privacy gateway benchmarks (medians)")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("", justify="center")
    table.add_column("detail")
    for t in results["targets"]:
        info = "(info)" in t["name"]
        verdict = "" if info else ("[green]PASS[/]" if t["pass"] else "[red]FAIL[/]")
        limit = "" if info else f"{t['op']} {_fmt(t['limit'], t['unit'])}"
        table.add_row(t["name"], _fmt(t["value"], t["unit"]), limit, verdict, t["detail"])
    console.print(table)


def machine_info() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "missing"

    def run(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return ""

    from google.protobuf.internal import api_implementation

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    except OSError:
        mem = "0"
    from sim.broker import find_mosquitto

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_kb": int(mem),
        "python": sys.version,
        "packages": {
            p: version(p) for p in ("paho-mqtt", "aiomqtt", "protobuf", "prometheus-client")
        },
        "protobuf_backend": api_implementation.Type(),
        "mosquitto": run([find_mosquitto(), "-h"]),
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(run(["git", "status", "--porcelain", "--", "gateway", "bench"])),
    }


def write_json(results: dict[str, Any], name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(results, indent=2, default=str, allow_nan=True))
    return path
