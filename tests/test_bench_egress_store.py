"""`python -m bench egress-store` measures what it says: counts written through
the store's own call, on a store holding the history it claims (a short run;
the full one is a benchmark)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.egress_store import (
    TODAY,
    DirectUpsert,
    EgressStoreOptions,
    SimulatedClock,
    bench_egress_store,
    count_round,
    prefill,
    subjects,
)
from bench.peers import counted_streams
from bench.suite import policy_version
from bench.workload import make_fleet, populate_store
from gateway.core.identity import subject
from gateway.keys import load_or_create_key
from gateway.store.sqlite import SqliteConsentStore


@pytest.mark.parametrize("mode", ["direct", "journal"])
def test_a_round_counts_every_message_it_writes(tmp_path: Path, mode: str) -> None:
    cars = subjects(40)
    path = tmp_path / "s.sqlite3"
    prefill(path, cars, 3)
    clock = SimulatedClock()
    options = EgressStoreOptions(batch=25, counts=300, every_s=10.0)
    store = SqliteConsentStore(path, clock=clock)
    try:
        if mode == "direct":
            direct = DirectUpsert(path)
            try:
                cpu, wall = count_round(direct, clock, cars, options, seed=1)
            finally:
                direct.close()
        else:
            cpu, wall = count_round(store.add_egress_counts, clock, cars, options, seed=1)
        # The warm-up covers the journal's wait and one period of every car.
        assert clock.now >= 30.0 + options.every_s
        today = TODAY.isoformat()
        reopened = SqliteConsentStore(path)
        per_day: dict[str, int] = {}
        for car in cars:
            for row in reopened.egress_counts(car):
                per_day[row.day] = per_day.get(row.day, 0) + row.count
        reopened.close()
    finally:
        store.close()
    assert cpu > 0 and wall > 0
    # The warm-up's counts and the timed ones, all there: a commit is 6.25
    # simulated seconds (25 of 40 cars sending every 10 s), the warm-up 7
    # commits (past 30 + 10 s), then 12 timed ones.
    assert per_day.pop(today) == (7 + 12) * 25
    # The history: three earlier days, five per car each.
    assert sorted(per_day) == ["2026-12-02", "2026-12-03", "2026-12-04"]
    assert set(per_day.values()) == {5 * len(cars)}


def test_the_short_run_compares_the_journal_with_direct_upserts(tmp_path: Path) -> None:
    lines: list[str] = []
    result = bench_egress_store(
        EgressStoreOptions(
            fleets=(50,), history_days=(0, 2), batch=10, counts=200, rounds=2, every_s=5.0
        ),
        lines.append,
        directory=tmp_path,
    )
    cases = result["cases"]
    assert [(c["fleet"], c["history_days"]) for c in cases] == [(50, 0), (50, 2)]
    for c in cases:
        for mode in ("direct", "journal"):
            assert len(c[mode]["cpu_us_per_count"]) == 2 and c[mode]["median_cpu_us"] > 0
        assert c["direct_vs_journal_cpu"] == (
            c["direct"]["median_cpu_us"] / c["journal"]["median_cpu_us"]
        )
    assert len(lines) == 2 and "2 days kept" in lines[1]
    assert not list(tmp_path.iterdir())  # the stores are gone


def test_a_benchmark_store_can_hold_the_counts_of_earlier_days(tmp_path: Path) -> None:
    """`bench peers --counts-kept-days`: each car's counts, under the subject the
    gateway names it by, for each earlier day; today's left to the run."""
    fleet = make_fleet(20)
    version = policy_version()
    streams = counted_streams()
    assert ("tbox/status", "remote_control") in streams
    assert all("{" not in stream for stream, _ in streams)
    populate_store(tmp_path, fleet, version, counts_kept=(3, streams))
    key = load_or_create_key(tmp_path / "pseudonym.key")
    today = datetime.now(UTC).date()
    store = SqliteConsentStore.in_state_dir(tmp_path)
    try:
        for vin in fleet.vins:
            rows = store.egress_counts(subject(key, vin))
            assert sorted({r.day for r in rows}) == [
                (today - timedelta(days=d)).isoformat() for d in (3, 2, 1)
            ]
            assert len(rows) == 3 * len(streams)
            assert {r.policy_version for r in rows} == {version}
    finally:
        store.close()
