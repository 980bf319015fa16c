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
import os
import signal
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
    """What both trees must agree on: the cars, which are known, their
    settings and which have a find-my-car window open. (Also run inside the
    baseline tree, from this source.) Not the revision numbers: v1 predates
    messages that state one (contract v2, rule 11) and never reads it."""
    cars: list[list[object]] = []
    for vin in fleet.vins:
        s = fleet.settings.get(vin)
        known = [] if s is None else [s.privacy_mode, s.location, sorted(s.features.items())]
        cars.append([vin, vin in fleet.windows, *known])
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
    returncode, out, err = _run_in(tree, argv, timeout=600)
    if returncode != 0 or not out.strip():
        raise BaselineUnavailable(f"preparing the baseline failed: {err[-2000:].strip()}")
    return Path(out.strip().splitlines()[-1])


def _run_in(tree: Path, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run `argv` from the baseline's tree in its own process group; past the
    timeout the whole group is stopped (a benchmark run starts a broker)."""
    proc = subprocess.Popen(
        argv,
        cwd=tree,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise BaselineUnavailable(f"the baseline did not finish within {timeout:.0f} s") from exc
    return proc.returncode, out, err


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
    argv = [sys.executable, "-m", "bench", "core", "--rounds", str(rounds)]
    returncode, _out, err = _run_in(tree, argv, timeout=1800)
    results = sorted((tree / "bench" / "results").glob("core-*.json"))
    if returncode != 0 or not results:
        raise BaselineUnavailable(f"the baseline's core benchmark failed: {err[-2000:]}")
    rates = json.loads(results[-1].read_text())["core"]["rates_msg_s"]
    results[-1].unlink()  # the next call reads its own
    return [float(r) for r in rates]
