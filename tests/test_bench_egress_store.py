"""`python -m bench egress-store` measures what it says: counts written through
the store's own call, on a store holding the history it claims (a short run;
the full one is a benchmark)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.egress_store import (
    TODAY,
    EgressStoreOptions,
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


def test_a_round_counts_every_message_it_times(tmp_path: Path) -> None:
    cars = subjects(40)
    store = SqliteConsentStore(tmp_path / "s.sqlite3")
    try:
        prefill(store, cars, 3)
        cpu, wall = count_round(store, cars, batch=25, counts=300, seed=1)
        today = TODAY.isoformat()
        per_day: dict[str, int] = {}
        for car in cars:
            for row in store.egress_counts(car):
                per_day[row.day] = per_day.get(row.day, 0) + row.count
    finally:
        store.close()
    assert cpu > 0 and wall > 0
    assert per_day.pop(today) == 300  # every timed count is in the store
    # The history: three earlier days, five per car each.
    assert sorted(per_day) == ["2026-12-02", "2026-12-03", "2026-12-04"]
    assert set(per_day.values()) == {5 * len(cars)}


def test_the_short_run_reports_each_case_against_the_fresh_store(tmp_path: Path) -> None:
    lines: list[str] = []
    result = bench_egress_store(
        EgressStoreOptions(fleets=(50,), history_days=(0, 2), batch=20, counts=200, rounds=2),
        lines.append,
        directory=tmp_path,
    )
    cases = result["cases"]
    assert [(c["fleet"], c["history_days"], c["rows_before"]) for c in cases] == [
        (50, 0, 0),
        (50, 2, 100),
    ]
    for c in cases:
        assert len(c["cpu_us_per_count"]) == 2 and c["median_cpu_us"] > 0
    assert cases[0]["vs_fresh"] == 1.0
    assert cases[1]["vs_fresh"] == cases[1]["median_cpu_us"] / cases[0]["median_cpu_us"]
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
