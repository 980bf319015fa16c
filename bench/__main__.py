"""`python -m bench {all,core,throughput,latency,scale,bounds,peers,privacy,scale-out}`:
see docs/performance.md, docs/privacy.md and docs/scaling.md.

`all` runs core, throughput, latency and scale; `bounds` (the floods of
contract rule 20, several minutes), `peers` (the gateway against a Node-RED
flow doing the same work) and `privacy` (the attack benchmark, in process, a
few minutes; `--short` for a quick one), `scale-out` (one gateway on SQLite
against 1, 2 and 3 instances of a shared group on a private PostgreSQL) and
`egress-store` (what a forwarded message's count costs the SQLite store, fresh
and holding weeks of counts) run only when named."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from bench.bounds import BoundsOptions, bench_bounds, print_bounds_table
from bench.peers import PeerOptions, PeerUnavailable, bench_peers, peer_targets
from bench.report import machine_info, print_table, targets, write_json
from bench.scaleout import bench_scale_out, print_scale_out_table
from bench.suite import (
    Context,
    Options,
    bench_core,
    bench_latency,
    bench_scale,
    bench_throughput,
    context,
)

BENCHMARKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "core": bench_core,
    "throughput": bench_throughput,
    "latency": bench_latency,
    "scale": bench_scale,
}
# Run only when named.
ON_DEMAND: dict[str, Callable[[Context], dict[str, Any]]] = {"scale-out": bench_scale_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmark",
        choices=["all", *BENCHMARKS, "bounds", "peers", "privacy", "egress-store", *ON_DEMAND],
    )
    parser.add_argument("--rounds", type=int, default=3, help="A B A B rounds (median quoted)")
    parser.add_argument("--fleet", type=int, default=5_000, help="vehicles in the fleet")
    parser.add_argument("--messages", type=int, default=30_000, help="messages per throughput run")
    parser.add_argument("--rate", type=float, default=2_000.0, help="latency run rate (msg/s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="latency run length")
    parser.add_argument("--large", type=int, default=1_000_000, help="vehicles for scale runs")
    parser.add_argument(
        "--vins", type=int, default=None, help="bounds: made-up VINs (100,000; quick 10,000)"
    )
    parser.add_argument(
        "--revisions", type=int, default=None, help="bounds: revisions (100,000; quick 10,000)"
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=None,
        help="bounds: flood pace in msg/s (default: as fast as the generator can)",
    )
    parser.add_argument(
        "--flood-timeout",
        type=float,
        default=None,
        help="bounds: deadline per flood in s (default 180, plus publishing time when paced)",
    )
    parser.add_argument(
        "--counts-kept-days",
        type=int,
        default=0,
        help="peers: the gateway's store holds this many days of egress counts (default 0)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--short", action="store_true", help="privacy: 100 cars over 2 days (CI)")
    parser.add_argument("--cars", type=int, default=None, help="privacy: cars (1,000)")
    parser.add_argument("--days", type=int, default=None, help="privacy: simulated days (7)")
    parser.add_argument("--seed", type=int, default=None, help="privacy: fleet seed (1)")
    parser.add_argument(
        "--html-from", default=None, help="privacy: only render the HTML page of a results JSON"
    )
    parser.add_argument(
        "--wire",
        action="store_true",
        help="privacy: a small fleet through the real gateway over Mosquitto (simulated clock)",
    )
    args = parser.parse_args(argv)
    if args.benchmark == "privacy":
        return run_privacy(args, argv)
    if args.benchmark == "egress-store":
        return run_egress_store(args, argv)
    options = Options(
        rounds=args.rounds,
        fleet_size=args.fleet,
        flood_messages=args.messages,
        rate=args.rate,
        latency_seconds=args.seconds,
        scale_large=args.large,
    )
    if args.quick:
        options.flood_messages = 8_000
        options.latency_seconds = 3.0
        options.core_messages = 20_000
        options.scale_large = min(options.scale_large, 100_000)
        options.scale_messages = 6_000
    console = Console(stderr=True)
    if args.benchmark == "bounds":
        small = 10_000 if args.quick else 100_000
        bounds = BoundsOptions(
            vins=args.vins if args.vins is not None else small,
            revisions=args.revisions if args.revisions is not None else small,
            rate=args.flood_rate,
            timeout_s=args.flood_timeout,
        )
        return run_bounds(bounds, options, argv, console)
    if args.benchmark == "peers":
        peers = PeerOptions(
            messages=8_000 if args.quick else 20_000,
            rounds=args.rounds,
            fleet_size=min(args.fleet, 2_000),
            counts_kept_days=args.counts_kept_days,
        )
        return run_peers(peers, options, argv, console)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    results: dict[str, Any] = {
        **run_header(argv),
        "options": vars(options),
    }
    started = time.perf_counter()
    with context(options, lambda text: console.print(text, highlight=False)) as ctx:
        for name in names:
            t0 = time.perf_counter()
            console.print(f"[bold]{name}[/]")
            results[name] = ctx_result = {**BENCHMARKS, **ON_DEMAND}[name](ctx)
            ctx_result["seconds"] = time.perf_counter() - t0
    results["seconds"] = time.perf_counter() - started
    results["targets"] = [t.as_dict() for t in targets(results)]
    path = write_json(results, f"{args.benchmark}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    if "scale-out" in results:
        print_scale_out_table(results["scale-out"], Console(width=160))
    else:
        print_table(results, Console(width=160))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}")
    return 0


def run_header(argv: list[str] | None) -> dict[str, Any]:
    """What every results file starts with: the command, when, the machine."""
    return {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
    }


def run_egress_store(args: argparse.Namespace, argv: list[str] | None) -> int:
    from bench.egress_store import (
        EgressStoreOptions,
        bench_egress_store,
        print_egress_store_table,
    )

    options = EgressStoreOptions(rounds=args.rounds)
    if args.quick:
        options = EgressStoreOptions(loads=((2_000, 25_000.0, 1),), history_days=(0, 7), rounds=1)
    console = Console(stderr=True)
    console.print("[bold]egress-store[/]")
    results: dict[str, Any] = {
        **run_header(argv),
        "options": vars(options),
    }
    started = time.perf_counter()
    results["egress_store"] = bench_egress_store(
        options, lambda text: console.print(text, highlight=False)
    )
    results["seconds"] = time.perf_counter() - started
    path = write_json(results, f"egress-store-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print_egress_store_table(results["egress_store"], Console(width=160))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}")
    return 0


def run_privacy(args: argparse.Namespace, argv: list[str] | None) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    from bench.privacy.report import print_privacy_table, write_html
    from bench.privacy.run import SHORT, Options, run
    from bench.report import RESULTS

    if args.html_from:
        saved = json.loads(Path(args.html_from).read_text())
        print(write_html(saved, Path(args.html_from).with_suffix(".html")))
        return 0
    if args.wire:
        return run_privacy_wire(args, argv)
    options = SHORT if args.short else Options()
    changes = {
        k: v for k, v in (("cars", args.cars), ("days", args.days), ("seed", args.seed)) if v
    }
    options = replace(options, **changes)
    console = Console(stderr=True)
    console.print(f"[bold]privacy[/] {options.cars} cars, {options.days} days")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict[str, Any] = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "machine": machine_info(),
    }
    results |= run(options, lambda text: console.print(text, highlight=False))
    name = f"privacy-{time.strftime('%Y%m%d-%H%M%S')}"
    path = write_json(results, f"{name}.json")
    page = write_html(results, RESULTS / "privacy.html")
    print_privacy_table(results, Console(width=200))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}; page {page}")
    return 0


def run_privacy_wire(args: argparse.Namespace, argv: list[str] | None) -> int:
    from dataclasses import replace

    from bench.privacy.report import print_wire_table
    from bench.privacy.wire import WireOptions, run_wire

    changes = {
        k: v for k, v in (("cars", args.cars), ("days", args.days), ("seed", args.seed)) if v
    }
    options = replace(WireOptions(), **changes)
    console = Console(stderr=True)
    console.print(f"[bold]privacy through Mosquitto[/] {options.cars} cars, {options.days} days")
    results: dict[str, Any] = {
        **run_header(argv),
    }
    results |= run_wire(options, lambda text: console.print(text, highlight=False))
    path = write_json(results, f"privacy-wire-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print_wire_table(results, Console(width=160))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}")
    return 0


def run_bounds(
    bounds: BoundsOptions, options: Options, argv: list[str] | None, console: Console
) -> int:
    results: dict[str, Any] = {
        **run_header(argv),
    }
    started = time.perf_counter()
    with context(options, lambda text: console.print(text, highlight=False)) as ctx:
        console.print("[bold]bounds[/]")
        results["bounds"] = bench_bounds(ctx, bounds)
    results["seconds"] = time.perf_counter() - started
    path = write_json(results, f"bounds-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print_bounds_table(results["bounds"], Console(width=160))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}")
    return 0


def run_peers(
    peers: PeerOptions, options: Options, argv: list[str] | None, console: Console
) -> int:
    results: dict[str, Any] = {
        **run_header(argv),
        "options": vars(peers),
    }
    started = time.perf_counter()
    with context(options, lambda text: console.print(text, highlight=False)) as ctx:
        console.print("[bold]peers[/]")
        try:
            results["peers"] = bench_peers(ctx, peers)
        except PeerUnavailable as exc:
            console.print(f"[yellow]peers skipped:[/] {exc}")
            return 0
    results["seconds"] = time.perf_counter() - started
    results["targets"] = [t.as_dict() for t in peer_targets(results["peers"])]
    path = write_json(results, f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json")
    print_table(results, Console(width=160))
    console.print(f"{results['seconds']:.0f} s; raw figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
