"""The baseline gateway, run beside this one in the same benchmark run.

The CPU-per-message issue states its mixed-fleet target against v1 (commit
`BASELINE_COMMIT`, whose `bench/results` gave 14,489 msg/s). That figure was
taken on another day: this machine's speed changes by 2-3x between phases of
the same day, so a table figure is no baseline. `bench throughput` therefore
runs the v1 gateway itself as one more variant, in the same alternating
rounds on the same broker with the same packets, and quotes the ratio.

The v1 tree comes out of this repository's history (`git archive`: no work
tree or worktree metadata is touched) into the run's temporary directory. Its
store and runtime config are written by its own bench code (its schema is
its own), from the same fleet: both trees generate the fleet from the same
seed, and a digest of the cars and their settings is compared before the
run, so both gateways decide the same cars under the same settings. It runs
on this virtual environment (its dependencies are a subset of these).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.procs import REPO, Proc, start_gateway
from bench.workload import Fleet

# v1: the last commit before the v2 issues (its bench/results are the table
# the 1.5x target refers to).
BASELINE_COMMIT = "e39e9cbf0b51d68bd805120f257d52adf665ce64"


class BaselineUnavailable(RuntimeError):
    """The baseline tree could not be checked out or prepared (said plainly)."""


def fleet_cars(fleet: Fleet) -> list[list[object]]:
    """What both trees must agree on: the cars, which are known, and their
    settings. (Also run inside the baseline tree, from this source.)"""
    cars: list[list[object]] = []
    for vin in fleet.vins:
        s = fleet.settings.get(vin)
        known = [] if s is None else [s.privacy_mode, s.location, sorted(s.features.items())]
        cars.append([vin, *known])
    return cars


def fleet_digest(cars: list[list[object]]) -> str:
    return hashlib.sha256(json.dumps(cars).encode()).hexdigest()


def checkout(destination: Path, commit: str = BASELINE_COMMIT) -> Path:
    """The baseline's tree at `destination` (created), from this repository's history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise BaselineUnavailable(
            f"baseline {commit[:12]} is not in this checkout's history (a clone with its"
            f" history has it): {exc} {detail.decode(errors='replace').strip()}"
        ) from exc
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return destination


# Run inside the baseline tree (its modules first), with its own bench code;
# `fleet_cars` and `fleet_digest` are prepended from this module's source.
_PREPARE = """
import sys
from pathlib import Path
from bench.procs import write_gateway_config
from bench.suite import policy_version
from bench.workload import make_fleet, populate_store
size, expected, state, configs, name, vehicle_prefix, backend_prefix = sys.argv[1:8]
fleet = make_fleet(int(size))
if fleet_digest(fleet_cars(fleet)) != expected:
    sys.exit("the baseline generates another fleet from the same seed")
populate_store(Path(state), fleet, policy_version())
print(write_gateway_config(Path(configs), name, vehicle_prefix, backend_prefix))
"""


def prepare(
    tree: Path,
    fleet: Fleet,
    state: Path,
    configs: Path,
    name: str,
    vehicle_prefix: str,
    backend_prefix: str,
) -> Path:
    """Write the baseline's store and config with its own code; the config's path.
    Refuses when the baseline's fleet is not `fleet` (different cars or settings)."""
    source = "\n".join(
        [
            "from __future__ import annotations",
            "import hashlib, json",
            inspect.getsource(fleet_cars),
            inspect.getsource(fleet_digest),
            _PREPARE,
        ]
    )
    expected = fleet_digest(fleet_cars(fleet))
    argv = [sys.executable, "-c", source, str(len(fleet.vins)), expected, str(state)]
    argv += [str(configs), name, vehicle_prefix, backend_prefix]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise BaselineUnavailable(f"preparing the baseline failed: {done.stderr[-2000:].strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def start_baseline(tree: Path, name: str, config: Path, broker_url: str, state_dir: Path) -> Proc:
    """`python -m gateway run` of the baseline tree (its own modules: run from it)."""
    return start_gateway(name, config, broker_url, state_dir, cwd=tree)


def tree_in(directory: Path) -> Path:
    """The baseline's tree under a run's directory, checked out on first use."""
    tree = directory / "baseline-tree"
    if not tree.exists():
        checkout(tree)
    return tree


def core_rates(tree: Path, rounds: int) -> list[float]:
    """The baseline's own `bench core` (its rules, its mix of messages): its
    per-round decisions per second."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "core", "--rounds", str(rounds)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    results = sorted((tree / "bench" / "results").glob("core-*.json"))
    if done.returncode != 0 or not results:
        raise BaselineUnavailable(f"the baseline's core benchmark failed: {done.stderr[-2000:]}")
    rates = json.loads(results[-1].read_text())["core"]["rates_msg_s"]
    results[-1].unlink()  # the next call reads its own
    return [float(r) for r in rates]
