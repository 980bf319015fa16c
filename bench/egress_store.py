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
the call the service makes from its store thread), on a simulated clock, for
a fleet forwarding a given rate: every car once per period (fleet / rate, in
a random order each period), a commit holding what arrives in one commit pace
(COMMIT_PACE_S: 100 counts at 25k msg/s). Timed after one cycle of the
journal (FOLD_AFTER_S and one period) and over `cycles` more, so folds and
checkpoints fall inside it as they do in service: CPU time of the committing
thread per count, wall time, and each commit's wall time (p99 and worst: a
stall shows there, not in the mean).
"""

from __future__ import annotations

import itertools
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

from gateway.accounting import COMMIT_PACE_S
from gateway.store import EgressCount
from gateway.store.egress_journal import FOLD_AFTER_S, UPSERT_COUNTS
from gateway.store.sqlite import SqliteConsentStore

VERSION = "2026.1"
# What counts a message: its car (a subject), stream and feature.
Source = tuple[str, str, str]
TODAY = date(2026, 12, 5)
MODES = ("direct", "journal")


@dataclass
class EgressStoreOptions:
    # (cars, forwarded msg/s, streams per car): the peers benchmark's load; a
    # larger fleet at the same rate (a car every 2 s); the same with four
    # streams per car (more keys than may wait); the larger fleet at a car
    # every 10 s.
    loads: tuple[tuple[int, float, int], ...] = (
        (2_000, 25_000.0, 1),
        (50_000, 25_000.0, 1),
        (50_000, 25_000.0, 4),
        (50_000, 5_000.0, 1),
    )
    history_days: tuple[int, ...] = (0, 30)
    rounds: int = 2
    # Timed: this many times (FOLD_AFTER_S + a car's period), after one such
    # warm-up, so folds and checkpoints fall inside it as they do in service.
    cycles: float = 2.0

    def batch(self, rate: float) -> int:
        """Counts per commit: what arrives during one commit pace."""
        return max(1, round(rate * COMMIT_PACE_S))


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def subjects(fleet: int) -> list[str]:
    # The store names cars by a 32-hex-character keyed hash; any spread value will do.
    return [f"{random.Random(i).getrandbits(128):032x}" for i in range(fleet)]


def sources(fleet: int, streams: int) -> list[Source]:
    """Every car with the first `streams` of the policy's counted streams."""
    from bench.peers import counted_streams

    kinds = counted_streams()[:streams]
    return [(car, stream, feature) for car in subjects(fleet) for stream, feature in kinds]


def prefill(path: Path, keys: list[Source], days: int) -> None:
    """A store holding `days` earlier days of counts for every car and stream, in its rows."""
    SqliteConsentStore(path).close()  # the schema
    write = DirectUpsert(path)
    try:
        for day in range(1, days + 1):
            stamp = (TODAY - timedelta(days=day)).isoformat()
            write([EgressCount(c, stamp, st, f, VERSION, 5) for c, st, f in keys])
    finally:
        write.close()


def traffic(keys: list[Source], seed: int) -> Iterator[Source]:
    """Each car and stream once per period, in a new random order each period."""
    rng = random.Random(seed)
    order = list(keys)
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


@dataclass
class RoundFigures:
    cpu_us: float  # CPU of the committing thread per count
    wall_us: float  # wall time per count
    commit_ms: list[float]  # each commit's wall time

    def commit_pct(self, q: float) -> float:
        ordered = sorted(self.commit_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def count_round(
    write: Callable[[list[EgressCount]], None],
    clock: SimulatedClock,
    keys: list[Source],
    rate: float,
    options: EgressStoreOptions,
    seed: int,
) -> RoundFigures:
    """Counts of `rate` msg/s from `keys`, each once per period, in commits of
    a pace's worth; timed after the warm-up."""
    today = TODAY.isoformat()
    source = traffic(keys, seed)
    batch = options.batch(rate)
    step = batch / rate  # simulated seconds per commit
    cycle_s = FOLD_AFTER_S + len(keys) / rate
    warm = int(cycle_s / step) + 1
    commits = max(1, int(options.cycles * cycle_s / step))
    batches = [
        [EgressCount(c, today, st, f, VERSION, 1) for c, st, f in itertools.islice(source, batch)]
        for _ in range(warm + commits)
    ]
    for rows in batches[:warm]:
        clock.now += step
        write(rows)
    times: list[float] = []
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for rows in batches[warm:]:
        clock.now += step
        started = time.perf_counter()
        write(rows)
        times.append((time.perf_counter() - started) * 1e3)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    done = commits * batch
    return RoundFigures(cpu / done * 1e6, wall / done * 1e6, times)


def bench_egress_store(
    options: EgressStoreOptions, log: Callable[[str], None], directory: Path | None = None
) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-egress-", dir=directory or Path.home()) as tmp:
        # On the real disk (not tmpfs): the fsync costs what it costs.
        for fleet, streams in sorted({(f, n) for f, _, n in options.loads}):
            keys = sources(fleet, streams)
            for days in options.history_days:
                seeded = Path(tmp) / f"{fleet}-{streams}-{days}.sqlite3"
                prefill(seeded, keys, days)
                for rate in [r for f, r, n in options.loads if (f, n) == (fleet, streams)]:
                    case = _case(options, Path(tmp), seeded, keys, rate, days, log)
                    cases.append({**case, "fleet": fleet, "streams": streams})
                seeded.unlink()
    return {"fold_after_s": FOLD_AFTER_S, "cases": cases}


def _case(
    options: EgressStoreOptions,
    tmp: Path,
    seeded: Path,
    keys: list[Source],
    rate: float,
    days: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    figures: dict[str, list[RoundFigures]] = {m: [] for m in MODES}
    for r in range(options.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            path = tmp / f"{mode}-{r}.sqlite3"
            shutil.copy(seeded, path)
            clock = SimulatedClock()
            if mode == "direct":
                direct = DirectUpsert(path)
                try:
                    figures[mode].append(count_round(direct, clock, keys, rate, options, r))
                finally:
                    direct.close()
            else:
                store = SqliteConsentStore(path, clock=clock)
                try:
                    figures[mode].append(
                        count_round(store.add_egress_counts, clock, keys, rate, options, r)
                    )
                finally:
                    store.close()
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
    case: dict[str, Any] = {
        "rate": rate,
        "batch": options.batch(rate),
        "every_s": len(keys) / rate,  # per car and stream
        "history_days": days,
    }
    for mode in MODES:
        rounds = figures[mode]
        case[mode] = {
            "cpu_us_per_count": [f.cpu_us for f in rounds],
            "wall_us_per_count": [f.wall_us for f in rounds],
            "median_cpu_us": statistics.median(f.cpu_us for f in rounds),
            "median_wall_us": statistics.median(f.wall_us for f in rounds),
            # The worst round's: a stall shows here, not in the mean.
            "commit_p99_ms": max(f.commit_pct(99) for f in rounds),
            "commit_max_ms": max(max(f.commit_ms) for f in rounds),
        }
    case["direct_vs_journal_cpu"] = (
        case["direct"]["median_cpu_us"] / case["journal"]["median_cpu_us"]
    )
    d, j = case["direct"], case["journal"]
    log(
        f"  {len(keys):>7,} cars x streams at {rate:,.0f} msg/s, {days:>2} days kept:"
        " CPU µs per count"
        f" direct {d['median_cpu_us']:.1f}, journal {j['median_cpu_us']:.1f};"
        f" commit p99/max ms direct {d['commit_p99_ms']:.1f}/{d['commit_max_ms']:.0f},"
        f" journal {j['commit_p99_ms']:.1f}/{j['commit_max_ms']:.0f}"
    )
    return case


def print_egress_store_table(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title="egress count cost on the store: CPU (wall) µs per count, medians;"
        " commit p99 / max ms, worst round"
    )
    columns = ("cars", "streams", "msg/s", "per commit", "days kept", "direct upserts", "journal")
    for col in (*columns, "direct / journal"):
        table.add_column(col, justify="right")
    for c in result["cases"]:
        d, j = c["direct"], c["journal"]
        table.add_row(
            f"{c['fleet']:,}",
            str(c["streams"]),
            f"{c['rate']:,.0f}",
            str(c["batch"]),
            str(c["history_days"]),
            f"{d['median_cpu_us']:.1f} ({d['median_wall_us']:.1f}); "
            f"{d['commit_p99_ms']:.1f} / {d['commit_max_ms']:.0f}",
            f"{j['median_cpu_us']:.1f} ({j['median_wall_us']:.1f}); "
            f"{j['commit_p99_ms']:.1f} / {j['commit_max_ms']:.0f}",
            f"{c['direct_vs_journal_cpu']:.2f}x",
        )
    console.print(table)
