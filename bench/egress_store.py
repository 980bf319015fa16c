"""`python -m bench egress-store`: what a forwarded message's egress count costs
the SQLite store, on a fresh store and on one holding the counts a fleet
keeps for weeks; the journal against upserting every car's row at every
commit (what the store did before, and what PostgreSQL still does).

Every forwarded message is counted, and its upstream acknowledgement waits
for the count's commit (gateway/accounting.py). A store in service holds
each car's rows for every day of the streams' retention (30-365 days in the
default policy). The count table is keyed by car first, so today's rows sit
among every earlier day's, and upserting them touches about one page per car
and commit. The journal (gateway/store/egress_journal.py) appends one row per
commit and adds a car's counts to its row once they have waited
FOLD_AFTER_S.

Measured in process, on the real store (`SqliteConsentStore.add_egress_counts`,
the call the service makes from its store thread), on a simulated clock:
every car sends once per `every_s` (in a random order each period), commits
hold `batch` counts (one commit every 4 ms at 25k msg/s holds about 100).
Counting starts once the journal folds as it does in service (after
FOLD_AFTER_S and one period), and covers `counts` counts: CPU time of the
committing thread per count, and wall time.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.store import EgressCount
from gateway.store.egress_journal import FOLD_AFTER_S, UPSERT_COUNTS
from gateway.store.sqlite import SqliteConsentStore

STREAM, FEATURE, VERSION = "tbox/status", "remote_control", "2026.1"
TODAY = date(2026, 12, 5)
MODES = ("direct", "journal")


@dataclass
class EgressStoreOptions:
    fleets: tuple[int, ...] = (2_000, 50_000)
    history_days: tuple[int, ...] = (0, 30)
    every_s: float = 10.0  # each car's messages of the stream, one per this
    batch: int = 100
    counts: int = 100_000  # measured per round
    rounds: int = 3


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def subjects(fleet: int) -> list[str]:
    # The store names cars by a 32-hex-character keyed hash; any spread value will do.
    return [f"{random.Random(i).getrandbits(128):032x}" for i in range(fleet)]


def prefill(path: Path, cars: list[str], days: int) -> None:
    """A store holding `days` earlier days of counts for every car, in its rows."""
    SqliteConsentStore(path).close()  # the schema
    write = DirectUpsert(path)
    try:
        for day in range(1, days + 1):
            stamp = (TODAY - timedelta(days=day)).isoformat()
            write([EgressCount(c, stamp, STREAM, FEATURE, VERSION, 5) for c in cars])
    finally:
        write.close()


def traffic(cars: list[str], seed: int) -> Iterator[str]:
    """Each car once per period, in a new random order each period."""
    rng = random.Random(seed)
    order = list(cars)
    while True:
        rng.shuffle(order)
        yield from order


class DirectUpsert:
    """Every car's row upserted at every commit, as the store did before the
    journal: WAL, synchronous=FULL, one IMMEDIATE transaction per commit."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")

    def __call__(self, rows: list[EgressCount]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany(UPSERT_COUNTS, rows)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def count_round(
    write: Callable[[list[EgressCount]], None],
    clock: SimulatedClock,
    cars: list[str],
    options: EgressStoreOptions,
    seed: int,
) -> tuple[float, float]:
    """(CPU µs, wall µs) per count, over `options.counts` counts after the warm-up."""
    today = TODAY.isoformat()
    source = traffic(cars, seed)
    step = options.batch * options.every_s / len(cars)  # simulated seconds per commit
    warm = int((FOLD_AFTER_S + options.every_s) / step) + 1
    commits = max(1, options.counts // options.batch)
    batches = [
        [
            EgressCount(next(source), today, STREAM, FEATURE, VERSION, 1)
            for _ in range(options.batch)
        ]
        for _ in range(warm + commits)
    ]
    for rows in batches[:warm]:
        clock.now += step
        write(rows)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for rows in batches[warm:]:
        clock.now += step
        write(rows)
    done = commits * options.batch
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
                seeded = Path(tmp) / f"{fleet}-{days}.sqlite3"
                prefill(seeded, cars, days)
                figures: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
                for r in range(options.rounds):
                    for mode in MODES if r % 2 == 0 else MODES[::-1]:
                        path = Path(tmp) / f"{fleet}-{days}-{mode}-{r}.sqlite3"
                        shutil.copy(seeded, path)
                        clock = SimulatedClock()
                        if mode == "direct":
                            direct = DirectUpsert(path)
                            try:
                                figures[mode].append(count_round(direct, clock, cars, options, r))
                            finally:
                                direct.close()
                        else:
                            store = SqliteConsentStore(path, clock=clock)
                            try:
                                figures[mode].append(
                                    count_round(store.add_egress_counts, clock, cars, options, r)
                                )
                            finally:
                                store.close()
                        path.unlink()
                        for suffix in ("-wal", "-shm"):
                            path.with_name(path.name + suffix).unlink(missing_ok=True)
                case: dict[str, Any] = {"fleet": fleet, "history_days": days}
                for mode in MODES:
                    case[mode] = {
                        "cpu_us_per_count": [f[0] for f in figures[mode]],
                        "wall_us_per_count": [f[1] for f in figures[mode]],
                        "median_cpu_us": statistics.median(f[0] for f in figures[mode]),
                        "median_wall_us": statistics.median(f[1] for f in figures[mode]),
                    }
                case["direct_vs_journal_cpu"] = (
                    case["direct"]["median_cpu_us"] / case["journal"]["median_cpu_us"]
                )
                log(
                    f"  {fleet:>7,} cars, {days:>3} days kept: direct"
                    f" {case['direct']['median_cpu_us']:.1f} µs CPU"
                    f" ({case['direct']['median_wall_us']:.1f} wall), journal"
                    f" {case['journal']['median_cpu_us']:.1f} µs CPU"
                    f" ({case['journal']['median_wall_us']:.1f} wall) per count"
                )
                cases.append(case)
    return {
        "batch": options.batch,
        "every_s": options.every_s,
        "counts": options.counts,
        "fold_after_s": FOLD_AFTER_S,
        "cases": cases,
    }


def print_egress_store_table(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"egress count cost on the store: CPU (wall) µs per count, medians;"
        f" commits of {result['batch']}, each car once per {result['every_s']:g} s"
    )
    for col in ("cars", "days kept", "direct upserts", "journal", "direct / journal"):
        table.add_column(col, justify="right")
    for c in result["cases"]:
        d, j = c["direct"], c["journal"]
        table.add_row(
            f"{c['fleet']:,}",
            str(c["history_days"]),
            f"{d['median_cpu_us']:.1f} ({d['median_wall_us']:.1f})",
            f"{j['median_cpu_us']:.1f} ({j['median_wall_us']:.1f})",
            f"{c['direct_vs_journal_cpu']:.2f}x",
        )
    console.print(table)
