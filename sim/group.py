"""`python -m sim group`: several real gateway processes on one shared
subscription and one PostgreSQL consent store, the seeded fleet, kill -9 of
one instance mid-run and its restart under the same instance id, then the
conformance checker (contract rules 12 and 21 across instances; issue 12).
Another instance is paused (SIGSTOP) a few times for seconds, as a long
garbage-collection pause, a starved CPU or a stopped VM would: whatever the
broker handed it meanwhile is decided late, under the settings it finds then.

A private Mosquitto and a private PostgreSQL cluster (initdb on a free port
under the output directory's temp space; never the machine's own servers).
Every instance has its own state directory (instance id, control port) and
the same pseudonymization key. The scenario's DPO (ownership changes,
objections) talks to the first instance only; the others learn of its
actions from the store's change log, which is what the run checks. The
instance that is killed is the last one; the one paused is the second (the
first of two). Each stall (wall times) goes to STALLS_FILE for the checker:
what an instance held then may have been decided late.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from gateway.about import DEFAULT_CONFIG
from gateway.clock import TimeMapping
from gateway.keys import create_key
from sim.broker import MosquittoBroker, free_port
from sim.checker import CHECK_FILE, STALLS_FILE, CheckResult, check_run, print_summary
from sim.demo import GatewayProcess, write_dpo_token
from sim.policy import DEFAULT_POLICY_PATH
from sim.postgres import PrivatePostgres
from sim.run import RunConfig, RunSummary, parse_duration, run_simulation
from sim.scenario import DEFAULT_SIM_START_MS, build_scenario

GROUP_FILE = "group.json"
SHARED_GROUP = "gateways"


@dataclass
class GroupConfig:
    out_dir: Path
    instances: int = 3
    vehicles: int = 20
    duration_s: float = 4 * 3600
    speedup: float = 240
    seed: int = 1
    kill_at: float | None = 0.4  # share of the run's wall time; None: no kill
    # When the second instance is paused (shares of the run's wall time), and for how long.
    pause_at: tuple[float, ...] = (0.55, 0.7, 0.85)
    pause_s: float = 2.0
    # Privacy-screen changes per car per simulated hour: 30 times the fleet's
    # default, so that changes and the next messages race across instances.
    settings_per_hour: float = 24.0
    policy_path: Path = DEFAULT_POLICY_PATH
    ready_timeout_s: float = 60.0
    live: bool = True


@dataclass
class GroupOutcome:
    result: CheckResult
    run: RunSummary
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class Instance:
    name: str
    state_dir: Path
    control_port: int
    command: list[str]
    env: dict[str, str]
    log_dir: Path
    lives: int = 0
    process: GatewayProcess | None = None

    def start(self, timeout_s: float) -> None:
        self.lives += 1
        self.process = GatewayProcess(
            self.command, self.log_dir / f"gateway-{self.name}-{self.lives}.log", self.env
        )
        self.process.start()
        self.process.wait_ready(timeout_s)


def _instance(
    config: GroupConfig,
    name: str,
    broker: str,
    store_url: str,
    key: bytes,
    clock: Path,
    token: Path,
) -> Instance:
    state_dir = config.out_dir / f"state-{name}"
    state_dir.mkdir(mode=0o700, parents=True)
    key_path = state_dir / "pseudonym.key"
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    port = free_port()
    command = [
        *(sys.executable, "-m", "gateway", "run", "--config", str(DEFAULT_CONFIG)),
        *("--control-listen", f"127.0.0.1:{port}"),
        *("--vehicle-broker", broker, "--backend-broker", broker),
        *("--state-dir", str(state_dir), "--simulated-clock", str(clock)),
    ]
    env = {
        "GATEWAY_VEHICLE_BROKER__SHARED_GROUP": SHARED_GROUP,
        "GATEWAY_STORE__URL": store_url,
        "GATEWAY_INSTANCE_ID": name,
        "GATEWAY_CONTROL__TOKENS_FILE": str(token),
        # A persistent backend session: a command or message-centre message in
        # flight to an instance killed mid-way stays in its session and comes
        # back when it restarts under the same id (with a clean session the
        # broker drops it with the session; mosquitto does not hand a shared
        # subscriber's unacknowledged messages to the other members).
        "GATEWAY_BACKEND_BROKER__SESSION_EXPIRY_S": "3600",
    }
    return Instance(name, state_dir, port, command, env, config.out_dir)


def run_group(config: GroupConfig, console: Console | None = None) -> GroupOutcome:
    console = console or Console(stderr=True)
    out = config.out_dir
    if out.exists():
        shutil.rmtree(out)  # same seed, same VINs: start from nothing
    out.mkdir(parents=True)
    clock_file = out / "sim-clock.json"
    TimeMapping.frozen(DEFAULT_SIM_START_MS).write(clock_file)
    token, tokens_file = write_dpo_token(out)
    key = create_key(out / "pseudonym.key")
    postgres = PrivatePostgres()
    postgres.start()
    instances: list[Instance] = []
    kills: list[dict[str, float]] = []
    stalls: list[dict[str, str | float]] = []
    try:
        store_url = postgres.new_database()
        with MosquittoBroker() as broker:
            names = [chr(ord("a") + i) for i in range(config.instances)]
            instances = [
                _instance(config, n, broker.url, store_url, key, clock_file, tokens_file)
                for n in names
            ]
            for instance in instances:
                instance.start(config.ready_timeout_s)
            console.print(
                f"{config.instances} gateway instances ready on group {SHARED_GROUP!r}"
                f" (PostgreSQL on port {postgres.port}); starting recorder and fleet"
            )
            wall_s = config.duration_s / config.speedup
            victim = instances[-1]

            async def kill_one() -> None:
                assert config.kill_at is not None
                await asyncio.sleep(wall_s * config.kill_at)
                assert victim.process is not None
                killed = time.time()
                code = await asyncio.to_thread(victim.process.kill)
                await asyncio.to_thread(victim.start, config.ready_timeout_s)
                back = time.time()
                kills.append({"instance_exit": float(code or 0), "down_s": back - killed})
                stalls.append(
                    {
                        "instance": victim.name,
                        "kind": "kill",
                        "wall_start": killed,
                        "wall_end": back,
                    }
                )
                console.print(
                    f"instance {victim.name} killed (exit {code}) and back under the same"
                    f" id after {time.time() - killed:.2f}s"
                )

            paused = instances[1] if len(instances) > 2 else instances[0]

            async def pause_one() -> None:
                started = time.monotonic()
                for share in config.pause_at:
                    await asyncio.sleep(max(0.0, started + wall_s * share - time.monotonic()))
                    assert paused.process is not None and paused.process.process is not None
                    pid = paused.process.process.pid
                    at = time.time()
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(config.pause_s)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    stalls.append(
                        {
                            "instance": paused.name,
                            "kind": "pause",
                            "wall_start": at,
                            "wall_end": time.time(),
                        }
                    )
                console.print(f"instance {paused.name} paused {len(config.pause_at)}x")

            tasks: list[asyncio.Task[None]] = []

            async def on_connected() -> None:
                if config.kill_at is not None and config.instances > 1:
                    tasks.append(asyncio.create_task(kill_one()))
                if config.pause_at and config.pause_s > 0 and config.instances > 1:
                    tasks.append(asyncio.create_task(pause_one()))

            async def before_drain() -> None:
                await asyncio.gather(*tasks)

            run_config = RunConfig(
                vehicles=config.vehicles,
                duration_s=config.duration_s,
                speedup=config.speedup,
                broker=broker.url,
                out_dir=out,
                seed=config.seed,
                policy_path=config.policy_path,
                live=config.live,
                clock_file=clock_file,
                control_url=f"http://127.0.0.1:{instances[0].control_port}",
                control_token=token,
                # A killed instance's share waits in its session until it is back.
                applied_timeout_s=30.0,
                result_timeout_s=30.0,
                settings_resend_s=3.0,
                quiet_s=5.0,
            )
            scenario = build_scenario(
                config.seed,
                config.vehicles,
                config.duration_s,
                settings_per_hour=config.settings_per_hour,
            )
            summary = asyncio.run(
                run_simulation(
                    run_config,
                    console,
                    scenario=scenario,
                    on_connected=on_connected,
                    before_drain=before_drain,
                )
            )
            exit_codes = {}
            for instance in instances:
                assert instance.process is not None
                exit_codes[instance.name] = instance.process.stop()
    finally:
        for instance in instances:
            if instance.process is not None:
                instance.process.stop()
        postgres.stop()
    (out / STALLS_FILE).write_text(json.dumps(stalls, indent=2))
    result = check_run(out, state_dir=instances[0].state_dir, policy_path=config.policy_path)
    summary_json = result.summary_json()
    summary_json["issues"] = [issue.to_json() for issue in result.issues[:5000]]
    (out / CHECK_FILE).write_text(json.dumps(summary_json, indent=2))
    report = {
        "instances": config.instances,
        "vehicles": config.vehicles,
        "duration_s": config.duration_s,
        "speedup": config.speedup,
        "seed": config.seed,
        "kills": kills,
        "pauses": [
            {"paused_s": float(s["wall_end"]) - float(s["wall_start"])}
            for s in stalls
            if s["kind"] == "pause"
        ],
        "exit_codes": exit_codes,
        "settings_per_car_hour": config.settings_per_hour,
        "settings_sent": summary.settings_sent,
        "settings_per_wall_s": round(summary.settings_sent / max(summary.wall_s, 1e-9), 2),
        "published": summary.published,
        "received": summary.received,
        "leaks": result.leaks,
        "losses": result.losses,
        # Missing, but a revision its car sent while the gateway may not yet
        # have got to it drops it (not judged: see Checker._decision_lag).
        "missing_not_judged": sum(1 for o in result.outcomes if o[2] == "ambiguous_dropped"),
        "other_issues": len(result.issues) - result.leaks - result.losses,
        "exit_code": result.exit_code(),
    }
    (out / GROUP_FILE).write_text(json.dumps(report, indent=2))
    return GroupOutcome(result, summary, report)


def add_parser(commands: Any) -> None:
    group = commands.add_parser(
        "group",
        help="N gateway instances, one shared group and PostgreSQL, kill -9, pauses, checker",
        description="Several real gateway processes share the vehicle traffic (MQTT v5 shared"
        " subscription) and the consent state (a private PostgreSQL); one is killed with -9"
        " mid-run and restarted under its instance id, another is paused (SIGSTOP) three times;"
        " exit 1 on any leak or loss.",
    )
    group.add_argument("--instances", type=int, default=3, help="gateway processes (3)")
    group.add_argument("--vehicles", type=int, default=20, help="fleet size (20)")
    group.add_argument("--duration", default="4h", help="simulated time (4h)")
    group.add_argument("--speedup", type=float, default=240, help="simulated s per wall s (240)")
    group.add_argument("--seed", type=int, default=1)
    group.add_argument(
        "--settings-per-hour",
        type=float,
        default=24.0,
        help="privacy-screen changes per car per simulated hour (24; the fleet's default: 0.8)",
    )
    group.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="when the last instance is killed, as a share of the run (0.4); negative: never",
    )
    group.add_argument(
        "--pause",
        type=float,
        default=2.0,
        help="seconds the second instance is paused (SIGSTOP), three times (2.0; 0: never)",
    )
    group.add_argument("--out", type=Path, default=Path("out/group"), help="output directory")
    group.add_argument("--policy", type=Path, default=DEFAULT_POLICY_PATH, help="policy.yaml")
    group.add_argument("--no-live", action="store_true", help="no live progress display")


def group_main(args: argparse.Namespace, console: Console) -> int:
    config = GroupConfig(
        out_dir=args.out,
        instances=args.instances,
        vehicles=args.vehicles,
        duration_s=parse_duration(args.duration),
        speedup=args.speedup,
        seed=args.seed,
        settings_per_hour=args.settings_per_hour,
        kill_at=None if args.kill_at < 0 else args.kill_at,
        pause_s=max(0.0, args.pause),
        policy_path=args.policy,
        live=not args.no_live,
    )
    try:
        outcome = run_group(config, console)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[bold red]group run failed:[/] {exc}")
        return 2
    print_summary(outcome.result, console)
    console.print(json.dumps(outcome.report, indent=2))
    return outcome.result.exit_code()
