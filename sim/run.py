"""`python -m sim run`: recorder + fleet against running brokers, with a live display."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sim.fleet import Fleet, FleetOptions, FleetStats
from sim.groundtruth import RUN_FILE
from sim.mqtt import ClientFactory, aiomqtt_factory
from sim.policy import DEFAULT_POLICY_PATH, load_policy
from sim.recorder import Recorder
from sim.scenario import DEFAULT_SIM_START_MS, Scenario, build_scenario

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '6h', '1h30m' -> seconds."""
    text = text.strip().lower()
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        value, unit = float(match.group(1)), match.group(2)
        total += value * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 6h, 1h30m)")
    return total


@dataclass
class RunConfig:
    vehicles: int
    duration_s: float
    speedup: float
    broker: str
    out_dir: Path
    seed: int = 1
    backend_broker: str | None = None
    multiplex: int = 0
    policy_path: Path = DEFAULT_POLICY_PATH
    sim_start_ms: int = DEFAULT_SIM_START_MS
    quiet_s: float = 3.0
    max_drain_s: float = 60.0
    live: bool = True
    applied_timeout_s: float = 5.0
    result_timeout_s: float = 5.0
    settings_resend_s: float | None = None
    clock_file: Path | None = None  # the gateway runs on this simulated clock
    # The gateway's control API and a DPO token: the scenario's ownership
    # changes and objections go through it (skipped without).
    control_url: str | None = None
    control_token: str | None = None

    @property
    def backend_url(self) -> str:
        return self.backend_broker or self.broker


@dataclass
class RunSummary:
    published: int
    received: int
    expected_pass: int
    expected_drops: dict[str, int]
    settings_sent: int
    settings_timeouts: int
    commands_sent: int
    command_results_missing: int
    wall_s: float
    max_lag_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def progress_view(fleet: Fleet, recorder: Recorder, started: float) -> Group:
    stats: FleetStats = fleet.stats
    sim_elapsed_s = (stats.sim_now_ms - fleet.scenario.sim_start_ms) / 1000
    total_s = fleet.scenario.duration_ms / 1000
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"sim {sim_elapsed_s / 3600:5.2f}h / {total_s / 3600:.2f}h", style="bold"),
        f"wall {time.monotonic() - started:6.1f}s",
        f"vehicles connected {stats.vehicles_connected}/{len(fleet.vehicles)}",
        f"done {stats.vehicles_done}",
        f"lag {stats.lag_s:4.1f}s",
    )
    head.add_row(
        f"sent {stats.published}",
        f"received at backend {recorder.received_telemetry} "
        f"(+{recorder.received - recorder.received_telemetry} command msgs)",
        f"expected to pass {stats.expected_pass} "
        f"(missing so far {max(0, stats.expected_pass - recorder.received_telemetry)})",
        f"settings {stats.settings_sent} (timeouts {stats.settings_timeouts})",
        f"commands {stats.commands_sent} (ok {stats.commands_accepted}, "
        f"refused {stats.commands_refused}, no result {stats.command_results_missing})",
    )
    streams = Table(title="per stream", expand=False)
    streams.add_column("stream")
    streams.add_column("sent", justify="right")
    streams.add_column("received", justify="right")
    for stream in sorted(stats.published_by_stream):
        streams.add_row(
            stream,
            str(stats.published_by_stream[stream]),
            str(recorder.received_by_stream.get(stream, 0)),
        )
    drops = Table(title="expected drops (by reason)", expand=False)
    drops.add_column("reason")
    drops.add_column("count", justify="right")
    for reason, count in stats.expected_drops.most_common():
        drops.add_row(reason, str(count))
    return Group(head, _side_by_side(streams, drops))


def _side_by_side(left: Table, right: Table) -> Table:
    grid = Table.grid(padding=(0, 4))
    grid.add_row(left, right)
    return grid


async def run_simulation(
    config: RunConfig,
    console: Console | None = None,
    client_factory: ClientFactory = aiomqtt_factory,
    *,
    scenario: Scenario | None = None,
    on_connected: Callable[[], Awaitable[None]] | None = None,
    before_drain: Callable[[], Awaitable[None]] | None = None,
    operator: Callable[[str, str, str], Awaitable[tuple[int, str]]] | None = None,
) -> RunSummary:
    """`scenario` replaces the one built from the config's seed; `on_connected` runs
    when every car is connected, just before the scenario clock starts; `before_drain`
    runs after the last car is done, before waiting for the backend to go quiet;
    `operator` does the scenario's DPO actions in process (instead of the control API)."""
    console = console or Console(stderr=True)
    policy = load_policy(config.policy_path)
    if scenario is None:
        scenario = build_scenario(
            config.seed, config.vehicles, config.duration_s, config.sim_start_ms
        )
    config.out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(
        config.backend_url,
        config.out_dir,
        topic_prefixes=tuple(policy.prefixes("tsp")),
        client_factory=client_factory,
    )
    await recorder.start()
    options = FleetOptions(
        vehicle_broker=config.broker,
        backend_broker=config.backend_url,
        speedup=config.speedup,
        multiplex=config.multiplex,
        applied_timeout_s=config.applied_timeout_s,
        result_timeout_s=config.result_timeout_s,
        settings_resend_s=config.settings_resend_s,
        clock_file=config.clock_file,
        control_url=config.control_url,
        control_token=config.control_token,
        operator=operator,
    )
    fleet = Fleet(scenario, policy, options, config.out_dir, client_factory)
    started = time.monotonic()
    meta = {
        "policy_path": str(config.policy_path),
        "vehicle_broker": config.broker,
        "backend_broker": config.backend_url,
        "multiplex": config.multiplex,
    }
    live = (
        Live(
            console=console,
            refresh_per_second=4,
            transient=False,
            get_renderable=lambda: progress_view(fleet, recorder, started),
        )
        if config.live
        else None
    )
    try:
        with live if live is not None else contextlib.nullcontext():
            await fleet.play(meta, on_connected)
            if before_drain is not None:
                await before_drain()
            # Let the gateway drain: stop when the backend has been quiet for a while.
            await recorder.wait_quiet(config.quiet_s, config.max_drain_s)
    finally:
        await recorder.stop()
    stats = fleet.stats
    summary = RunSummary(
        published=stats.published,
        received=recorder.received,
        expected_pass=stats.expected_pass,
        expected_drops=dict(stats.expected_drops),
        settings_sent=stats.settings_sent,
        settings_timeouts=stats.settings_timeouts,
        commands_sent=stats.commands_sent,
        command_results_missing=stats.command_results_missing,
        wall_s=round(time.monotonic() - started, 2),
        max_lag_s=round(stats.lag_s, 2),
    )
    run_record = {
        "config": {
            k: "(set)" if k == "control_token" and v else str(v) if isinstance(v, Path) else v
            for k, v in asdict(config).items()
        },
        "summary": asdict(summary),
    }
    (config.out_dir / RUN_FILE).write_text(json.dumps(run_record, indent=2))
    return summary


def run_blocking(config: RunConfig) -> RunSummary:
    return asyncio.run(run_simulation(config))
