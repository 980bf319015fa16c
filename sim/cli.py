"""Command line: python -m sim {run,record,check,demo,chaos}."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from rich.console import Console

from gateway.about import DEFAULT_CONFIG
from gateway.cli import HelpFormatter
from sim.policy import DEFAULT_POLICY_PATH
from sim.run import RunConfig, parse_duration, run_simulation


def _add_fleet_arguments(
    parser: argparse.ArgumentParser,
    *,
    vehicles: int,
    duration: str,
    speedup: float,
    out: Path | None = None,
) -> None:
    parser.add_argument("--vehicles", type=int, default=vehicles, help="fleet size")
    parser.add_argument("--duration", default=duration, help="simulated time, e.g. 10m, 6h, 1h30m")
    parser.add_argument(
        "--speedup", type=float, default=speedup, help="simulated seconds per wall-clock second"
    )
    parser.add_argument("--seed", type=int, default=1, help="scenario seed (same seed, same fleet)")
    if out is None:
        parser.add_argument("--out", type=Path, required=True, help="output directory")
    else:
        parser.add_argument("--out", type=Path, default=out, help="output directory")
    parser.add_argument(
        "--multiplex",
        type=int,
        default=0,
        metavar="N",
        help="load mode: carry all cars over N shared connections "
        "(default: two connections per car, tbox-{vin} and avn-{vin})",
    )
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY_PATH, help="policy.yaml")
    parser.add_argument("--no-live", action="store_true", help="no live progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim", description=__doc__, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run a simulated fleet (and the recorder) against brokers",
        formatter_class=HelpFormatter,
    )
    _add_fleet_arguments(run, vehicles=10, duration="10m", speedup=60)
    run.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="vehicle-side broker URL")
    run.add_argument(
        "--backend-broker",
        default=None,
        help="backend-side broker URL for tsp/ topics (default: --broker)",
    )

    record = commands.add_parser(
        "record",
        help="record everything on tsp/# and the policy's recipient prefixes (MQTT v5, QoS 1)",
        formatter_class=HelpFormatter,
    )
    record.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="backend-side broker URL")
    record.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY_PATH,
        help="policy whose recipients' egress prefixes are recorded too",
    )
    record.add_argument("--out", type=Path, required=True, help="output directory")
    record.add_argument("--duration", default=None, help="stop after this long (default: Ctrl-C)")

    check = commands.add_parser(
        "check", help="judge a recording against the ground truth", formatter_class=HelpFormatter
    )
    check.add_argument("--out", type=Path, required=True, help="directory of a run")
    check.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="gateway state directory (its pseudonym.key makes pseudonym checks exact)",
    )
    check.add_argument("--policy", type=Path, default=None, help="policy.yaml (default: the run's)")
    check.add_argument("--no-report", action="store_true", help="skip the HTML report")
    letters = check.add_mutually_exclusive_group()
    letters.add_argument(
        "--dead-letters",
        type=Path,
        default=None,
        metavar="FILE",
        help="the gateway's dead letters (JSON as `sim chaos` saves them, or a saved "
        "GET /v1/dead-letters answer): missing messages they stand for are not losses",
    )
    letters.add_argument(
        "--dead-letters-from-state",
        action="store_true",
        help="read the dead letters from --state-dir's consent store (read-only)",
    )

    demo = commands.add_parser(
        "demo",
        help="mosquitto + real gateway + fleet + checker, end to end",
        formatter_class=HelpFormatter,
    )
    _add_fleet_arguments(demo, vehicles=20, duration="6h", speedup=240, out=Path("out/demo"))
    demo.add_argument(
        "--gateway-config", type=Path, default=DEFAULT_CONFIG, help="gateway TOML config"
    )
    demo.add_argument(
        "--gateway-command",
        default=None,
        help="override the gateway command line (the broker URLs and state dir are "
        "passed as --vehicle-broker/--backend-broker/--state-dir)",
    )
    demo.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the gateway's 'gateway ready' log line",
    )
    chaos = commands.add_parser(
        "chaos",
        help="fleet + real gateway + faults (kill -9, refusals, outages, floods) + checker",
        description="A seeded fault-injection run against the real gateway and two real "
        "Mosquitto brokers; exit 1 on any leak or any loss no dead letter accounts for.",
    )
    chaos.add_argument("--seed", type=int, default=1, help="seed of the fleet and of the faults")
    chaos.add_argument(
        "--short",
        action="store_true",
        help="the short variant (CI: about a minute, every fault at least once)",
    )
    chaos.add_argument(
        "--vehicles", type=int, default=None, help="fleet size (default: 30; --short: 12)"
    )
    chaos.add_argument(
        "--duration", default=None, help="simulated time (default: 10h; --short: 3h)"
    )
    chaos.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="simulated seconds per wall-clock second (default: 100; --short: 240)",
    )
    chaos.add_argument(
        "--out", type=Path, default=Path("out/chaos"), help="output directory (out/chaos)"
    )
    chaos.add_argument("--policy", type=Path, default=DEFAULT_POLICY_PATH, help="policy.yaml")
    chaos.add_argument("--no-live", action="store_true", help="no live progress display")
    chaos.add_argument("--no-report", action="store_true", help="skip the HTML report")
    chaos.add_argument(
        "--compound",
        action="store_true",
        help="also kill and restart the gateway while the backend broker is down, with "
        "near-limit messages decided before it is back (see docs/chaos.md)",
    )
    chaos.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the gateway to be ready (at start and after each fault)",
    )
    from sim.group import add_parser as add_group_parser

    add_group_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)  # as wide as the terminal, or $COLUMNS
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=True, width=200)  # logs and CI: don't squeeze the tables
    if args.command == "run":
        config = RunConfig(
            vehicles=args.vehicles,
            duration_s=parse_duration(args.duration),
            speedup=args.speedup,
            broker=args.broker,
            backend_broker=args.backend_broker,
            out_dir=args.out,
            seed=args.seed,
            multiplex=args.multiplex,
            policy_path=args.policy,
            live=not args.no_live,
        )
        summary = asyncio.run(run_simulation(config, console))
        console.print(
            f"published {summary.published}, received at backend {summary.received}, "
            f"settings timeouts {summary.settings_timeouts}; ground truth and recording "
            f"in {args.out}"
        )
        return 0
    if args.command == "record":
        from sim.policy import load_policy
        from sim.recorder import record_until_cancelled

        duration = parse_duration(args.duration) if args.duration else None
        try:
            prefixes = tuple(load_policy(args.policy).prefixes("tsp"))
            count = asyncio.run(record_until_cancelled(args.broker, args.out, duration, prefixes))
        except KeyboardInterrupt:
            return 0
        console.print(f"recorded {count} messages into {args.out}")
        return 0
    if args.command == "check":
        from sim.checker import check_main
        from sim.deadletters import load_dead_letters, read_dead_letters_from_state

        dead_letters = None
        if args.dead_letters is not None:
            dead_letters = load_dead_letters(args.dead_letters)
        elif args.dead_letters_from_state:
            if args.state_dir is None:
                console.print("--dead-letters-from-state needs --state-dir")
                return 2
            dead_letters = read_dead_letters_from_state(args.state_dir)
        return check_main(
            args.out,
            state_dir=args.state_dir,
            policy_path=args.policy,
            report=not args.no_report,
            console=console,
            dead_letters=dead_letters,
        )
    if args.command == "demo":
        from sim.demo import demo_main

        return demo_main(args, console)
    if args.command == "chaos":
        from sim.chaos import chaos_main

        return chaos_main(args, console)
    if args.command == "group":
        from sim.group import group_main

        return group_main(args, console)
    return 2


if __name__ == "__main__":
    sys.exit(main())
