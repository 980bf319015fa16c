"""The v1 baseline that `bench throughput` runs beside the gateway comes out of
this repository's history, writes its store with its own code, and decides the
same fleet: a baseline that generated other cars or settings is refused, not
compared."""

from __future__ import annotations

import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bench.baseline import BASELINE_COMMIT, BaselineUnavailable, checkout, prepare
from bench.procs import REPO
from bench.workload import Fleet, make_fleet

pytestmark = pytest.mark.integration


def _in_history() -> bool:
    found = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{BASELINE_COMMIT}^{{commit}}"],
        capture_output=True,
    )
    return found.returncode == 0


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _in_history():
        pytest.skip("this checkout has no history (a shallow clone): the baseline cannot exist")
    return checkout(tmp_path_factory.mktemp("baseline") / "tree")


def test_the_baseline_store_is_written_by_the_baseline_for_the_same_fleet(
    tree: Path, tmp_path: Path
) -> None:
    fleet = make_fleet(60)
    config = prepare(tree, fleet, tmp_path / "state", tmp_path / "configs", "b", "bv", "bb")
    assert config.is_file()
    assert 'topic_prefix = "bv"' in config.read_text()
    db = sqlite3.connect(tmp_path / "state" / "consent.sqlite3")
    try:
        (version,) = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        (cars,) = db.execute("SELECT count(*) FROM vehicle_settings").fetchone()
    finally:
        db.close()
    # v1's own schema (this tree's is newer), and every known car of the fleet.
    assert int(version) < 12
    assert cars == len(fleet.settings)


def test_a_baseline_that_generates_other_settings_is_refused(tree: Path, tmp_path: Path) -> None:
    fleet = make_fleet(60)
    vin, settings = next(iter(fleet.settings.items()))
    changed = Fleet(
        fleet.vins,
        {**fleet.settings, vin: replace(settings, privacy_mode=not settings.privacy_mode)},
        fleet.windows,
    )
    with pytest.raises(BaselineUnavailable, match="another fleet"):
        prepare(tree, changed, tmp_path / "state", tmp_path / "configs", "b", "bv", "bb")


def test_a_commit_not_in_the_history_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(BaselineUnavailable, match="not in this checkout's history"):
        checkout(tmp_path / "tree", "0" * 40)
