"""`python -m bench egress-store`: what a forwarded message's egress count costs
the SQLite store, on a fresh store and on one holding the counts a fleet
keeps for weeks.

Every forwarded message is counted, and its upstream acknowledgement waits
for the count's commit (gateway/accounting.py). The all-forward benchmarks
run on a store that holds no counts yet; a store in service holds each car's
rows for every day of the streams' retention (30-365 days in the default
policy). The count table is keyed by car first, so today's rows sit among
every earlier day's, and each commit touches about one page per car.

Measured in process, on the real store (`SqliteConsentStore.add_egress_counts`,
the same call the service makes from its store thread): commits of
`batch` counts for cars drawn at random from the fleet (one commit every 4 ms
at 25k msg/s holds about 100), CPU time of the committing thread per count.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.store import EgressCount
from gateway.store.sqlite import SqliteConsentStore

STREAM, FEATURE, VERSION = "tbox/status", "vehicle_status", "2026.1"
TODAY = date(2026, 12, 5)


@dataclass
class EgressStoreOptions:
    fleets: tuple[int, ...] = (2_000, 50_000)
    history_days: tuple[int, ...] = (0, 30)
    batch: int = 100
    counts: int = 40_000  # counted per round
    rounds: int = 3


def subjects(fleet: int) -> list[str]:
    # The store names cars by a 32-hex-character keyed hash; any spread value will do.
    return [f"{random.Random(i).getrandbits(128):032x}" for i in range(fleet)]


def prefill(store: SqliteConsentStore, cars: list[str], days: int) -> None:
    """`days` earlier days of counts for every car, as the store holds them."""
    for day in range(1, days + 1):
        stamp = (TODAY - timedelta(days=day)).isoformat()
        store.add_egress_counts([EgressCount(c, stamp, STREAM, FEATURE, VERSION, 5) for c in cars])


def count_round(
    store: SqliteConsentStore, cars: list[str], batch: int, counts: int, seed: int
) -> tuple[float, float]:
    """(CPU µs, wall µs) per count, over `counts` counts in commits of `batch`."""
    rng, today = random.Random(seed), TODAY.isoformat()
    commits = [
        [EgressCount(rng.choice(cars), today, STREAM, FEATURE, VERSION, 1) for _ in range(batch)]
        for _ in range(max(1, counts // batch))
    ]
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for rows in commits:
        store.add_egress_counts(rows)
    done = len(commits) * batch
    return (time.thread_time() - cpu0) / done * 1e6, (time.perf_counter() - wall0) / done * 1e6


def bench_egress_store(
    options: EgressStoreOptions, log: Callable[[str], None], directory: Path | None = None
) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-egress-", dir=directory or Path.home()) as tmp:
        # On the real disk (not tmpfs): the fsync costs what it costs.
        for fleet in options.fleets:
            cars = subjects(fleet)
            for days in options.history_days:
                path = Path(tmp) / f"{fleet}-{days}.sqlite3"
                store = SqliteConsentStore(path)
                try:
                    started = time.perf_counter()
                    prefill(store, cars, days)
                    rows = fleet * days
                    figures = [
                        count_round(store, cars, options.batch, options.counts, seed=r)
                        for r in range(options.rounds)
                    ]
                finally:
                    store.close()
                case = {
                    "fleet": fleet,
                    "history_days": days,
                    "rows_before": rows,
                    "prefill_s": time.perf_counter() - started,
                    "cpu_us_per_count": [f[0] for f in figures],
                    "wall_us_per_count": [f[1] for f in figures],
                    "median_cpu_us": statistics.median(f[0] for f in figures),
                    "median_wall_us": statistics.median(f[1] for f in figures),
                    "db_mb": path.stat().st_size / 1e6,
                }
                log(
                    f"  {fleet:>9,} cars, {days:>3} days kept: {case['median_cpu_us']:.1f} µs CPU"
                    f" ({case['median_wall_us']:.1f} wall) per count;"
                    f" rounds {', '.join(f'{f[0]:.1f}' for f in figures)}"
                )
                cases.append(case)
    fresh = {c["fleet"]: c["median_cpu_us"] for c in cases if c["history_days"] == 0}
    for c in cases:
        c["vs_fresh"] = c["median_cpu_us"] / fresh[c["fleet"]] if c["fleet"] in fresh else None
    return {"batch": options.batch, "counts": options.counts, "cases": cases}


def print_egress_store_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"egress count cost on the store (commits of {result['batch']}, medians)")
    for col in ("cars", "days kept", "rows before", "CPU µs/count", "wall µs/count", "vs fresh"):
        table.add_column(col, justify="right")
    for c in result["cases"]:
        ratio = c["vs_fresh"]
        table.add_row(
            f"{c['fleet']:,}",
            str(c["history_days"]),
            f"{c['rows_before']:,}",
            f"{c['median_cpu_us']:.1f}",
            f"{c['median_wall_us']:.1f}",
            "" if ratio is None else f"{ratio:.2f}x",
        )
    console.print(table)
