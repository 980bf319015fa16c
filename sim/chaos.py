"""`python -m sim chaos`: the fleet against the real gateway while things break.

Two private Mosquitto brokers (vehicle side and backend side, both with
persistence; the backend one with a packet-size limit and an ACL), the real
gateway as a subprocess, the seeded fleet and the backend recorder (both on
reconnecting clients with persistent sessions), and a fault injector that
follows the seeded plan of `sim.chaos_plan`: kill -9 of the gateway and a
restart on the same state directory, ACL refusals of one stream on the
backend, a backend outage, a vehicle-side broker restart, settings floods
and fake-VIN floods. Then the conformance checker, with the gateway's dead
letters (fetched over its control API) accounting for messages a broker
refused. See docs/chaos.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.clock import TimeMapping
from sim.broker import MosquittoBroker, free_port
from sim.chaos_plan import (
    ACL_DENY,
    BACKEND_OUTAGE,
    FAKE_VIN_FLOOD,
    FAKE_VIN_SERIAL_BASE,
    INFRA_FAULTS,
    KILL,
    KILL_IN_OUTAGE,
    LONG,
    SHORT,
    VEHICLE_RESTART,
    ChaosPlan,
    ChaosProfile,
    Fault,
    augment,
    make_plan,
)
from sim.checker import CHECK_FILE, Arrival, CheckResult, check_run, print_summary
from sim.deadletters import (
    DEAD_LETTERS_FILE,
    DeadLetterRecord,
    fetch_dead_letters,
    read_dead_letters_from_state,
    save_dead_letters,
)
from sim.demo import READY_MARKER, GatewayProcess
from sim.policy import DEFAULT_POLICY_PATH, load_policy
from sim.resilient import ConnectionStats, ResilientClient, resilient_factory
from sim.run import RunConfig, RunSummary, parse_duration, run_simulation
from sim.scenario import DEFAULT_SIM_START_MS, build_scenario
from sim.vin import make_vin
from telematics.v1 import common_pb2, privacy_pb2

CHAOS_FILE = "chaos.json"
# `pattern` lines, not `topic` lines: mosquitto 2.0 gives a session restored from its
# persistence file no ACL list until its client reconnects, and with only `topic`
# lines it then drops every message for that session (the recorder's, after a
# backend restart) instead of queueing it. Patterns apply without the list.
# The vehicle side, the backend prefix and the default policy's recipients'
# egress prefixes (policy `recipients`).
OPEN_ACL = "".join(
    f"pattern readwrite {prefix}/#\n"
    for prefix in ("vehicle", *load_policy(DEFAULT_POLICY_PATH).prefixes("tsp"))
)
# Counters read from the gateway's /metrics before each kill and at the end; a
# restarted gateway counts from zero, so the totals are sums over its lives.
METRICS = {
    "new_vehicle_refusals": ("gateway_messages_dropped_total", {"reason": "new_vehicle_rate"}),
    "settings_merged": ("gateway_settings_merged_total", {}),
    "settings_applied": ("gateway_settings_applied_total", {}),
    "dead_letters_filed": ("gateway_dead_letters_total", {}),
    "publish_retries": ("gateway_publish_retries_total", {}),
}


@dataclass
class ChaosConfig:
    out_dir: Path
    seed: int = 1
    short: bool = False
    vehicles: int | None = None  # None: the profile's
    duration_s: float | None = None
    speedup: float | None = None
    policy_path: Path = DEFAULT_POLICY_PATH
    ready_timeout_s: float = 60.0
    live: bool = True
    report: bool = True
    compound: bool = False  # also KILL_IN_OUTAGE

    def profile(self) -> ChaosProfile:
        base = SHORT if self.short else LONG
        return ChaosProfile(
            **{
                **base.__dict__,
                "vehicles": self.vehicles or base.vehicles,
                "duration_s": self.duration_s or base.duration_s,
                "speedup": self.speedup or base.speedup,
                "kills_in_outage": 1 if self.compound else base.kills_in_outage,
            }
        )


@dataclass
class FaultRecord:
    """What the injector did: wall times (seconds since the epoch)."""

    kind: str
    planned_at_s: float
    started: float
    restored: float  # the broken thing is back (broker up, ACL open, process started)
    recovered: float  # the gateway is ready again (every broker connection up, eCall lane's too)
    detail: dict[str, Any] = field(default_factory=dict)
    ok: bool = True  # the gateway was ready again within the ready timeout

    def to_json(self, t0: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "recovered": self.ok,
            "planned_at_s": self.planned_at_s,
            "started_at_s": round(self.started - t0, 2),
            "restored_after_s": round(self.restored - self.started, 2),
            "recovered_after_s": round(self.recovered - self.started, 2),
            **self.detail,
        }


class ControlApi:
    """The gateway's control plane over HTTP, with the operator token of the run."""

    def __init__(self, port: int, token: str) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.token = token

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.base_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), b""
        except (urllib.error.URLError, OSError):
            return 0, b""

    def ready(self) -> bool:
        """/readyz says ready, and every broker connection is up: /readyz looks at the
        ordinary lane only, the eCall lane's connections reconnect on their own."""
        if self.get("/readyz", 2.0)[0] != 200:
            return False
        connected = [
            line.rsplit(" ", 1)[-1]
            for line in self.metrics_text().splitlines()
            if line.startswith("gateway_broker_connected{")
        ]
        return bool(connected) and all(float(value) == 1.0 for value in connected)

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        return body.decode() if status == 200 else ""

    def dead_letters(self) -> list[DeadLetterRecord]:
        return fetch_dead_letters(self.base_url, self.token)


def parse_metrics(text: str) -> dict[str, float]:
    """The counters of METRICS, summed over their label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        labels: dict[str, str] = {}
        if rest:
            inside, _, value_text = rest.rpartition("}")
            for part in inside.split('",'):
                key, _, value = part.partition("=")
                labels[key.strip(" ,")] = value.strip('"')
        else:
            name, _, value_text = line.partition(" ")
        for metric, (wanted, selector) in METRICS.items():
            if name.strip() == wanted and all(labels.get(k) == v for k, v in selector.items()):
                with contextlib.suppress(ValueError):
                    totals[metric] = totals.get(metric, 0.0) + float(value_text.split()[0])
    return totals


def gateway_config_text(
    *,
    policy: Path,
    state_dir: Path,
    vehicle_url: str,
    backend_url: str,
    control_port: int,
    token_sha256: str,
) -> str:
    def q(value: object) -> str:
        return json.dumps(str(value))  # a TOML basic string

    return f"""# Written by `python -m sim chaos` for one run.
policy = {q(policy)}
state_dir = {q(state_dir)}

[vehicle_broker]
url = {q(vehicle_url)}
client_id = "privacy-gateway-vehicle"
topic_prefix = "vehicle"
session_expiry_s = 86400

[backend_broker]
url = {q(backend_url)}
client_id = "privacy-gateway-backend"
topic_prefix = "tsp"
# Persistent: commands the backend sends while the gateway is down wait for it.
session_expiry_s = 3600

[pipeline]
inflight = 512

[limits]
settings_per_vehicle = 10
settings_window_s = 60
new_vehicles_per_s = 20
new_vehicles_burst = 100

[logging]
level = "INFO"

[control]
listen = "127.0.0.1:{control_port}"

[[control.tokens]]
name = "chaos"
role = "operator"
sha256 = {q(token_sha256)}
"""


class Injector:
    """Carries out the plan's faults on the fleet's wall clock, and records them."""

    def __init__(
        self,
        plan: ChaosPlan,
        *,
        vehicle: MosquittoBroker,
        backend: MosquittoBroker,
        gateway: GatewayProcess,
        gateway_command: list[str],
        out_dir: Path,
        api: ControlApi,
        console: Console,
        ready_timeout_s: float,
        stats: ConnectionStats,
    ) -> None:
        self.plan = plan
        self.vehicle = vehicle
        self.backend = backend
        self.gateway = gateway
        self.gateway_command = gateway_command
        self.out_dir = out_dir
        self.api = api
        self.console = console
        self.ready_timeout_s = ready_timeout_s
        self.stats = stats
        self.t0 = time.time()
        self.records: list[FaultRecord] = []
        self.incarnations = 1
        self.not_recovered = 0
        self.metric_lives: list[dict[str, float]] = []
        self.flood_stats: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._fake_serial = FAKE_VIN_SERIAL_BASE

    def start(self) -> None:
        self.t0 = time.time()
        infra = [f for f in self.plan.faults if f.kind in INFRA_FAULTS]
        self._tasks.append(asyncio.create_task(self._run_infra(infra), name="chaos-infra"))
        for n, fault in enumerate(f for f in self.plan.faults if f.kind == FAKE_VIN_FLOOD):
            self._tasks.append(
                asyncio.create_task(self._fake_vin_flood(fault, n), name=f"chaos-flood-{n}")
            )

    async def finish(self) -> None:
        """Wait for every fault to be over and the gateway to be ready again."""
        await asyncio.gather(*self._tasks)
        if not self.not_recovered:
            await self._wait_gateway_ready()

    def log(self, text: str) -> None:
        self.console.log(f"[bold magenta]chaos[/] +{time.time() - self.t0:6.1f}s {text}")

    async def _at(self, fault: Fault) -> None:
        delay = self.t0 + fault.at_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _run_infra(self, faults: list[Fault]) -> None:
        for n, fault in enumerate(faults):
            if self.not_recovered:
                skipped = len(faults) - n
                self.log(f"[bold red]the gateway did not recover: {skipped} faults skipped[/]")
                return
            await self._at(fault)
            if fault.kind == KILL:
                await self._kill(fault)
            elif fault.kind == ACL_DENY:
                await self._acl_deny(fault)
            elif fault.kind == BACKEND_OUTAGE:
                await self._broker_outage(fault, self.backend, "backend")
            elif fault.kind == VEHICLE_RESTART:
                await self._broker_outage(fault, self.vehicle, "vehicle-side")
            elif fault.kind == KILL_IN_OUTAGE:
                await self._kill_in_outage(fault)

    async def _wait_gateway_ready(self) -> tuple[float, bool]:
        """When the gateway is ready again, and whether it was within the timeout. One
        that does not recover is recorded and the run goes on: the checker shows what
        it cost."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.api.ready):
                return time.time(), True
            await asyncio.sleep(0.1)
        self.not_recovered += 1
        self.log(f"[bold red]gateway not ready {self.ready_timeout_s:.0f}s after a fault[/]")
        return time.time(), False

    async def scrape_metrics(self) -> None:
        """The counters of the running gateway (kept as metrics-N.txt, N its life)."""
        text = await asyncio.to_thread(self.api.metrics_text)
        if text:
            (self.out_dir / f"metrics-{self.incarnations}.txt").write_text(text)
            self.metric_lives.append(parse_metrics(text))

    async def _kill(self, fault: Fault) -> None:
        await self.scrape_metrics()
        started = time.time()
        code = await asyncio.to_thread(self.gateway.kill)  # SIGKILL, then reaped
        log_path = self._restart_gateway()
        restored = time.time()
        try:
            await asyncio.to_thread(self.gateway.wait_ready, self.ready_timeout_s)
        except (TimeoutError, RuntimeError) as exc:
            self.not_recovered += 1
            self.log(f"[bold red]gateway did not come back after kill -9:[/] {exc}")
            recovered, ok = time.time(), False
        else:
            recovered, ok = await self._wait_gateway_ready()
        self.records.append(
            FaultRecord(
                KILL,
                fault.at_s,
                started,
                restored,
                recovered,
                {"exit_code": code, "log": log_path.name},
                ok,
            )
        )
        self.log(
            f"gateway killed (exit {code}), restarted on the same state directory, "
            f"ready after {recovered - started:.2f}s"
        )

    def _restart_gateway(self) -> Path:
        self.incarnations += 1
        log_path = self.out_dir / f"gateway-{self.incarnations}.log"
        self.gateway = GatewayProcess(self.gateway_command, log_path)
        self.gateway.start()
        return log_path

    async def _kill_in_outage(self, fault: Fault) -> None:
        started = time.time()
        await asyncio.to_thread(self.backend.stop_keep_state)
        await self.scrape_metrics()
        code = await asyncio.to_thread(self.gateway.kill)
        log_path = self._restart_gateway()
        self.log(
            f"backend broker stopped, gateway killed (exit {code}) and restarted while it "
            f"is down, for {fault.duration_s:.1f}s"
        )
        await asyncio.sleep(fault.duration_s)
        await asyncio.to_thread(self.backend.start)
        restored = time.time()
        recovered, ok = await self._wait_gateway_ready()
        self.records.append(
            FaultRecord(
                KILL_IN_OUTAGE,
                fault.at_s,
                started,
                restored,
                recovered,
                {"exit_code": code, "log": log_path.name},
                ok,
            )
        )
        self.log(f"backend broker back; gateway ready after {recovered - started:.2f}s")

    async def _acl_deny(self, fault: Fault) -> None:
        topic = f"tsp/+/{fault.stream}"
        started = time.time()
        await asyncio.to_thread(self.backend.reload, OPEN_ACL + f"pattern deny {topic}\n")
        self.log(f"backend ACL denies {topic} for {fault.duration_s:.1f}s")
        await asyncio.sleep(fault.duration_s)
        await asyncio.to_thread(self.backend.reload, OPEN_ACL)
        restored = time.time()
        self.records.append(
            FaultRecord(ACL_DENY, fault.at_s, started, restored, restored, {"topic": topic})
        )
        self.log(f"backend ACL allows {topic} again")

    async def _broker_outage(self, fault: Fault, broker: MosquittoBroker, side: str) -> None:
        started = time.time()
        await asyncio.to_thread(broker.stop_keep_state)
        self.log(f"{side} broker stopped for {fault.duration_s:.1f}s (state kept)")
        await asyncio.sleep(fault.duration_s)
        await asyncio.to_thread(broker.start)
        restored = time.time()
        recovered, ok = await self._wait_gateway_ready()
        self.records.append(
            FaultRecord(fault.kind, fault.at_s, started, restored, recovered, ok=ok)
        )
        self.log(
            f"{side} broker back after {restored - started:.2f}s; gateway connected "
            f"again after {recovered - started:.2f}s"
        )

    async def _fake_vin_flood(self, fault: Fault, n: int) -> None:
        await self._at(fault)
        rng = random.Random(f"fake-vins:{self.plan.seed}:{n}")
        vins = [make_vin(rng, self._fake_serial + i) for i in range(fault.count)]
        self._fake_serial += fault.count
        started = time.time()
        self.log(f"fake-VIN flood: settings from {fault.count} made-up VINs")
        client = ResilientClient(self.vehicle.url, f"fake-vin-flood-{n}", True, stats=self.stats)
        async with client:
            for first in range(0, len(vins), 200):
                await asyncio.gather(
                    *(
                        client.publish(f"vehicle/{vin}/avn/privacy", _fake_settings(vin, i), qos=1)
                        for i, vin in enumerate(vins[first : first + 200], start=first)
                    )
                )
        ended = time.time()
        self.flood_stats.append(
            {"kind": FAKE_VIN_FLOOD, "vins": fault.count, "seconds": round(ended - started, 2)}
        )
        self.records.append(
            FaultRecord(FAKE_VIN_FLOOD, fault.at_s, started, ended, ended, {"vins": fault.count})
        )
        self.log(f"fake-VIN flood sent in {ended - started:.2f}s")

    def metric_totals(self) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for life in self.metric_lives:
            totals.update(life)
        return dict(totals)


def _fake_settings(vin: str, n: int) -> bytes:
    message = privacy_pb2.PrivacySettings(revision=1, location=common_pb2.LOCATION_APPROXIMATE)
    message.features["remote_control"] = True
    message.header.vin = vin
    message.header.seq = n + 1
    message.header.timestamp_ms = int(time.time() * 1000)
    return message.SerializeToString()


# --- latency ---------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a measured value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_stats(arrivals: list[Arrival]) -> dict[str, Any]:
    values = [a.latency_s * 1000 for a in arrivals]
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p99_ms": round(percentile(values, 99), 1),
        "max_ms": round(max(values), 1),
    }


def _overlaps(arrival: Arrival, windows: list[tuple[float, float]]) -> bool:
    return any(
        arrival.wall_start <= end and arrival.first_arrival >= start for start, end in windows
    )


def ecall_latency(result: CheckResult, records: list[FaultRecord]) -> dict[str, Any]:
    """eCall end to end (car starts publishing -> first copy at the backend), split by
    what was going on meanwhile. A fault's window runs from when it started to when
    the gateway was ready again (connected to both brokers)."""
    arrivals = result.legal_arrivals

    def windows(*kinds: str) -> list[tuple[float, float]]:
        return [(r.started, r.recovered) for r in records if r.kind in kinds]

    backend_down = windows(BACKEND_OUTAGE, KILL_IN_OUTAGE)
    outages = windows(BACKEND_OUTAGE, VEHICLE_RESTART, KILL, KILL_IN_OUTAGE)
    ordinary_faults = windows(ACL_DENY, FAKE_VIN_FLOOD)
    backend_up = [a for a in arrivals if not _overlaps(a, backend_down)]
    no_outage = [a for a in arrivals if not _overlaps(a, outages)]
    return {
        "all": latency_stats(arrivals),
        "backend_up": latency_stats(backend_up),
        "no_outage": latency_stats(no_outage),
        "during_ordinary_lane_faults": latency_stats(
            [a for a in no_outage if _overlaps(a, ordinary_faults)]
        ),
        "during_backend_outage": latency_stats([a for a in arrivals if _overlaps(a, backend_down)]),
        "during_gateway_kill": latency_stats(
            [a for a in arrivals if _overlaps(a, windows(KILL, KILL_IN_OUTAGE))]
        ),
        "during_vehicle_broker_restart": latency_stats(
            [a for a in arrivals if _overlaps(a, windows(VEHICLE_RESTART))]
        ),
    }


# --- the run ---------------------------------------------------------------------------
@dataclass
class ChaosOutcome:
    result: CheckResult
    run: RunSummary
    report: dict[str, Any]
    exit_code: int
    report_path: Path | None = None


def run_chaos(config: ChaosConfig, console: Console | None = None) -> ChaosOutcome:
    console = console or Console(stderr=True)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("gateway-*.log"), *out.glob("metrics-*.txt")]:
        stale.unlink()
    state_dir = out / "gateway-state"
    shutil.rmtree(state_dir, ignore_errors=True)  # same seed, same VINs: start from nothing
    profile = config.profile()
    policy = load_policy(config.policy_path)
    scenario = build_scenario(config.seed, profile.vehicles, profile.duration_s)
    plan = make_plan(config.seed, profile, scenario, policy)
    augment(plan, scenario, policy)
    token = secrets.token_urlsafe(32)
    api = ControlApi(free_port(), token)
    stats = ConnectionStats()
    started = time.monotonic()
    faults = ", ".join(f"{k} x{n}" for k, n in Counter(f.kind for f in plan.faults).items())
    console.print(
        f"chaos run, seed {config.seed}: {profile.vehicles} cars, "
        f"{profile.duration_s / 3600:.1f} h simulated at x{profile.speedup:g} "
        f"({profile.wall_s:.0f} s); faults: {faults}; {len(plan.oversized)} near-limit app "
        f"messages, {len(plan.settings_floods)} settings floods, {plan.ecalls} extra eCalls"
    )
    vehicle = MosquittoBroker(persistence=True)
    backend = MosquittoBroker(persistence=True, acl=OPEN_ACL, max_packet_size=plan.packet_limit)
    injector: Injector | None = None
    gateway: GatewayProcess | None = None
    try:
        vehicle.start()
        backend.start()
        config_path = out / "gateway.toml"
        config_path.write_text(
            gateway_config_text(
                policy=config.policy_path.resolve(),
                state_dir=state_dir.resolve(),
                vehicle_url=vehicle.url,
                backend_url=backend.url,
                control_port=int(api.base_url.rsplit(":", 1)[1]),
                token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            )
        )
        # The gateway runs on the fleet's compressed time, as in the demo (every
        # interval of the contract on one clock); the fleet rewrites the mapping
        # when its clock starts, and a restarted gateway reads the same file.
        clock_file = out / "sim-clock.json"
        TimeMapping.frozen(DEFAULT_SIM_START_MS).write(clock_file)
        command = [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(config_path),
            "--simulated-clock",
            str(clock_file),
        ]
        gateway = GatewayProcess(command, out / "gateway-1.log")
        gateway.start()
        gateway.wait_ready(config.ready_timeout_s)
        console.print(f"gateway ready ({READY_MARKER!r}); starting recorder and fleet")
        injector = Injector(
            plan,
            vehicle=vehicle,
            backend=backend,
            gateway=gateway,
            gateway_command=command,
            out_dir=out,
            api=api,
            console=console,
            ready_timeout_s=config.ready_timeout_s,
            stats=stats,
        )
        run_config = RunConfig(
            vehicles=profile.vehicles,
            duration_s=profile.duration_s,
            speedup=profile.speedup,
            broker=vehicle.url,
            backend_broker=backend.url,
            out_dir=out,
            seed=config.seed,
            policy_path=config.policy_path,
            live=config.live,
            quiet_s=5.0,
            max_drain_s=180.0,
            # Outages and restarts delay answers by seconds; a car retries its settings.
            applied_timeout_s=90.0,
            result_timeout_s=90.0,
            settings_resend_s=3.0,
            clock_file=clock_file,
        )
        active = injector

        async def on_connected() -> None:
            active.start()

        async def before_drain() -> None:
            await active.finish()

        run_summary = asyncio.run(
            run_simulation(
                run_config,
                console,
                resilient_factory(stats),
                scenario=scenario,
                on_connected=on_connected,
                before_drain=before_drain,
            )
        )
        gateway = injector.gateway
        letters_source = "control API"
        try:
            letters: list[DeadLetterRecord] | None = api.dead_letters()
        except (OSError, ValueError, KeyError) as exc:
            console.print(f"[bold red]dead letters not available over the control API:[/] {exc}")
            letters = None
        asyncio.run(injector.scrape_metrics())
        exit_code = gateway.stop()
    finally:
        if injector is not None:
            gateway = injector.gateway
        if gateway is not None:
            gateway.stop()
        for name, broker in (("vehicle", vehicle), ("backend", backend)):
            with contextlib.suppress(OSError):
                shutil.copyfile(broker.log_path, out / f"mosquitto-{name}.log")
            broker.stop()
    stored = read_dead_letters_from_state(state_dir)
    if letters is None:
        letters, letters_source = stored, "state directory (read-only)"
    save_dead_letters(out / DEAD_LETTERS_FILE, letters)
    console.print(
        f"gateway stopped (exit code {exit_code}); {len(letters)} dead letters from the "
        f"{letters_source}, {len(stored)} in the store"
    )
    result = check_run(
        out, state_dir=state_dir, policy_path=config.policy_path, dead_letters=letters
    )
    summary_json = result.summary_json()
    summary_json["issues"] = [issue.to_json() for issue in result.issues[:5000]]
    (out / CHECK_FILE).write_text(json.dumps(summary_json, indent=2))
    report_path: Path | None = None
    if config.report:
        from sim.report import write_report

        report_path = write_report(out, result)
    report = chaos_report(
        config,
        profile,
        plan,
        injector,
        result,
        run_summary,
        letters,
        letters_source,
        stored,
        stats,
        exit_code,
        time.monotonic() - started,
    )
    (out / CHAOS_FILE).write_text(json.dumps(report, indent=2))
    return ChaosOutcome(result, run_summary, report, report["exit_code"], report_path)


def chaos_report(
    config: ChaosConfig,
    profile: ChaosProfile,
    plan: ChaosPlan,
    injector: Injector,
    result: CheckResult,
    run: RunSummary,
    letters: list[DeadLetterRecord],
    letters_source: str,
    stored: list[DeadLetterRecord],
    stats: ConnectionStats,
    gateway_exit_code: int | None,
    wall_s: float,
) -> dict[str, Any]:
    t0 = injector.t0
    records = sorted(injector.records, key=lambda r: r.started)
    kills = [r for r in records if r.kind in (KILL, KILL_IN_OUTAGE)]
    summary = result.summary_json()
    letters_summary = result.dead_letters
    unaccounted = result.losses
    leaks = result.leaks
    ambiguous = sum(t.ambiguous for t in result.tallies.values())
    failed_publishes = sum(1 for _, _, outcome in result.outcomes if outcome == "publish_failed")
    other = len(result.issues) - leaks - unaccounted
    exit_code = 1 if leaks or unaccounted else (3 if other else 0)
    return {
        "verdict": "FAIL" if exit_code == 1 else ("CONTRACT VIOLATIONS" if other else "PASS"),
        "exit_code": exit_code,
        "seed": config.seed,
        "short": config.short,
        "vehicles": profile.vehicles,
        "duration_s": profile.duration_s,
        "speedup": profile.speedup,
        "wall_s": round(wall_s, 1),
        "leaks": leaks,
        "losses_unaccounted": unaccounted,
        "losses_dead_lettered": result.dead_lettered,
        "other_issues": other,
        "issues_by_rule": summary["issues_by_rule"],
        "published": result.published,
        "recorded": result.recorded,
        "must_pass": sum(t.must_pass for t in result.tallies.values()),
        "delivered": sum(t.delivered for t in result.tallies.values()),
        "duplicates": sum(t.duplicates for t in result.tallies.values()),
        "ambiguous": ambiguous,
        "publish_failed": failed_publishes,
        "utility_delivered_share": summary["utility_delivered_share"],
        "faults": [r.to_json(t0) for r in records],
        "fault_counts": dict(Counter(r.kind for r in records)),
        "kill_recoveries": {
            "count": sum(1 for r in kills if r.ok),
            "ready_after_s": [round(r.recovered - r.started, 2) for r in kills],
            "exit_codes": [r.detail.get("exit_code") for r in kills],
        },
        "gateway_incarnations": injector.incarnations,
        "gateway_not_recovered": injector.not_recovered,
        "gateway_exit_code": gateway_exit_code,
        "dead_letters": {
            "source": letters_source,
            "total": len(letters),
            "api": len(letters) if letters_source == "control API" else None,
            "store": len(stored),
            "by_reason": dict(Counter(d.reason for d in letters).most_common()),
            "by_stream": dict(Counter(d.stream for d in letters).most_common()),
            "by_kind": dict(Counter(d.kind for d in letters).most_common()),
            "accounting": None if letters_summary is None else letters_summary.to_json(),
        },
        "ecall_latency_ms": ecall_latency(result, records),
        "floods": {
            "settings": plan.settings_floods,
            "fake_vins": injector.flood_stats,
        },
        "oversized_app_messages": plan.oversized,
        "injected_ecalls": plan.ecalls,
        "gateway_counters": injector.metric_totals(),
        "fleet": {
            "settings_sent": run.settings_sent,
            "settings_timeouts": run.settings_timeouts,
            "commands_sent": run.commands_sent,
            "command_results_missing": run.command_results_missing,
            "max_lag_s": run.max_lag_s,
            "reconnects": stats.reconnects,
            "publish_retries": stats.publish_retries,
            "publish_failures": stats.publish_failures,
        },
        "plan": plan.to_json(),
    }


# --- output ----------------------------------------------------------------------------
def print_chaos_summary(outcome: ChaosOutcome, console: Console) -> None:
    report = outcome.report
    print_summary(outcome.result, console)
    faults = Table(title="faults injected")
    for column in ("kind", "at", "restored after", "gateway ready after", "detail"):
        faults.add_column(column, justify="left" if column in ("kind", "detail") else "right")
    for fault in report["faults"]:
        detail = ", ".join(
            f"{k} {v}"
            for k, v in fault.items()
            if k
            not in (
                "kind",
                "recovered",
                "planned_at_s",
                "started_at_s",
                "restored_after_s",
                "recovered_after_s",
            )
        )
        faults.add_row(
            fault["kind"],
            f"{fault['started_at_s']:.1f}s",
            f"{fault['restored_after_s']:.2f}s",
            f"{fault['recovered_after_s']:.2f}s" if fault["recovered"] else "[red]never[/]",
            detail,
        )
    console.print(faults)
    letters = report["dead_letters"]
    accounting = letters["accounting"] or {}
    dead = Table(title="dead letters (control API) and the losses they account for")
    for column in ("reason", "count"):
        dead.add_column(column, justify="left" if column == "reason" else "right")
    for reason, count in letters["by_reason"].items():
        dead.add_row(reason, str(count))
    console.print(dead)
    console.print(
        f"dead letters: {letters['total']} from the {letters['source']}, "
        f"{letters['store']} in the store; "
        f"missing messages accounted for by a dead letter: "
        f"{accounting.get('accounted_losses', 0)} (matched by "
        f"{accounting.get('matched_by', '-')}), unaccounted: "
        f"{accounting.get('unaccounted_losses', 0)}, letters standing for no missing "
        f"message: {accounting.get('letters_without_a_missing_message', 0)}"
    )
    latency = Table(title="eCall end-to-end latency (car publish -> backend)")
    for column in ("eCalls", "n", "p50", "p99", "max"):
        latency.add_column(column, justify="left" if column == "eCalls" else "right")
    for name, stats in report["ecall_latency_ms"].items():
        latency.add_row(
            name.replace("_", " "),
            str(stats["n"]),
            *(
                "-" if stats[k] is None else f"{stats[k]:.0f} ms"
                for k in ("p50_ms", "p99_ms", "max_ms")
            ),
        )
    console.print(latency)
    kills = report["kill_recoveries"]
    fleet = report["fleet"]
    console.print(
        f"kill -9 recoveries {kills['count']} (ready after "
        f"{', '.join(f'{s:.1f}s' for s in kills['ready_after_s']) or '-'}); "
        f"gateway counters over its {report['gateway_incarnations']} lives: "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(report["gateway_counters"].items()))
        + f"; fleet reconnects {fleet['reconnects']}, publish retries "
        f"{fleet['publish_retries']}, settings timeouts {fleet['settings_timeouts']}; "
        f"ambiguous {report['ambiguous']}, duplicates {report['duplicates']}"
    )
    colour = {"PASS": "green", "FAIL": "red"}.get(report["verdict"], "yellow")
    console.print(
        f"[bold {colour}]{report['verdict']}[/]  leaks {report['leaks']}  "
        f"unaccounted losses {report['losses_unaccounted']}  dead-lettered "
        f"{report['losses_dead_lettered']}  other issues {report['other_issues']}  |  "
        f"wall {report['wall_s']:.0f}s"
    )


def chaos_main(args: argparse.Namespace, console: Console) -> int:
    config = ChaosConfig(
        out_dir=args.out,
        seed=args.seed,
        short=args.short,
        vehicles=args.vehicles,
        duration_s=parse_duration(args.duration) if args.duration else None,
        speedup=args.speedup,
        policy_path=args.policy,
        ready_timeout_s=args.ready_timeout,
        live=not args.no_live,
        report=not args.no_report,
        compound=args.compound,
    )
    try:
        outcome = run_chaos(config, console)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[bold red]chaos run failed:[/] {exc}")
        return 2
    print_chaos_summary(outcome, console)
    if outcome.report_path is not None:
        console.print(f"HTML report: {outcome.report_path}")
    console.print(f"chaos.json: {config.out_dir / CHAOS_FILE}")
    return outcome.exit_code
