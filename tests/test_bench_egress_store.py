"""`python -m bench egress-store` measures what it says: counts written through
the store's own call, on a store holding the history it claims (a short run;
the full one is a benchmark)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import bench.egress_store as bench_egress
from bench.egress_store import (
    TODAY,
    DirectUpsert,
    EgressStoreOptions,
    SimulatedClock,
    bench_egress_store,
    count_round,
    prefill,
    sources,
)
from bench.peers import counted_streams
from bench.suite import policy_version
from bench.workload import make_fleet, populate_store
from gateway.core.identity import subject
from gateway.keys import load_or_create_key
from gateway.store import egress_journal
from gateway.store.sqlite import SqliteConsentStore


@pytest.fixture
def short_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts fold after 0.2 simulated seconds: a cycle is a few commits."""
    monkeypatch.setattr(egress_journal, "FOLD_AFTER_S", 0.2)
    monkeypatch.setattr(bench_egress, "FOLD_AFTER_S", 0.2)


@pytest.mark.parametrize("mode", ["direct", "journal"])
def test_a_round_counts_every_message_it_writes(
    tmp_path: Path, mode: str, short_journal: None
) -> None:
    keys = sources(40, 1)
    cars = [k[0] for k in keys]
    path = tmp_path / "s.sqlite3"
    prefill(path, keys, 3)
    clock = SimulatedClock()
    options = EgressStoreOptions(cycles=2.0)
    store = SqliteConsentStore(path, clock=clock)
    try:
        if mode == "direct":
            direct = DirectUpsert(path)
            try:
                figures = count_round(direct, clock, keys, 1_000.0, options, seed=1)
            finally:
                direct.close()
        else:
            figures = count_round(store.add_egress_counts, clock, keys, 1_000.0, options, seed=1)
    finally:
        store.close()
    # 1,000 msg/s: 4 counts per 4 ms commit; a car every 0.04 s; a cycle
    # 0.24 s: 61 warm-up commits, then 120 timed ones (2 cycles).
    assert len(figures.commit_ms) == 120
    assert figures.cpu_us > 0 and figures.wall_us > 0
    assert 0 < figures.commit_pct(50) <= figures.commit_pct(99) <= max(figures.commit_ms)
    reopened = SqliteConsentStore(path)
    per_day: dict[str, int] = {}
    try:
        for car in cars:
            for row in reopened.egress_counts(car):
                per_day[row.day] = per_day.get(row.day, 0) + row.count
    finally:
        reopened.close()
    assert per_day.pop(TODAY.isoformat()) == (61 + 120) * 4  # every count written
    # The history: three earlier days, five per car each.
    assert sorted(per_day) == ["2026-12-02", "2026-12-03", "2026-12-04"]
    assert set(per_day.values()) == {5 * len(cars)}


def test_the_short_run_compares_the_journal_with_direct_upserts(
    tmp_path: Path, short_journal: None
) -> None:
    lines: list[str] = []
    result = bench_egress_store(
        EgressStoreOptions(
            loads=((50, 2_000.0, 1), (20, 2_000.0, 3)), history_days=(0, 2), rounds=2, cycles=1.0
        ),
        lines.append,
        directory=tmp_path,
    )
    cases = result["cases"]
    assert [(c["fleet"], c["streams"], c["batch"], c["history_days"]) for c in cases] == [
        (20, 3, 8, 0),
        (20, 3, 8, 2),
        (50, 1, 8, 0),
        (50, 1, 8, 2),
    ]
    for c in cases:
        for mode in ("direct", "journal"):
            figures = c[mode]
            assert len(figures["cpu_us_per_count"]) == 2 and figures["median_cpu_us"] > 0
            assert 0 < figures["commit_p99_ms"] <= figures["commit_max_ms"]
        assert c["direct_vs_journal_cpu"] == (
            c["direct"]["median_cpu_us"] / c["journal"]["median_cpu_us"]
        )
    assert len(lines) == 4 and "2 days kept" in lines[1]
    # Three streams per car: each car and stream once per period.
    assert cases[0]["every_s"] == 20 * 3 / 2_000.0
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
