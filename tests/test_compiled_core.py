"""The decision core compiled with mypyc (scripts/compile_core.py) decides
exactly as the Python source does, is what the set-up loads, and is never
loaded once its sources changed (issue 13: CPU per message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every decision over the benchmark's mix (all streams, settings of every
# kind, find-my-car windows, a history per car), as text: Forward and Drop
# are named tuples, ApplySettings and Hold print every field.
DECIDE_THE_MIX = """
import hashlib, json, sys, time
from collections import Counter
import gateway.core as core
from gateway.core import DecisionContext, Forward, SettingsSnapshot, state_from_snapshot
from gateway.core.capture import Interval
from gateway.core.state import LocationMode
from gateway.policy import load_policy
from bench.procs import POLICY
from bench.workload import make_fleet, make_messages
from sim.scenario import DEFAULT_SIM_START_MS

policy = load_policy(POLICY)
fleet = make_fleet(800)
now = DEFAULT_SIM_START_MS / 1000 + 7200
states = {}
for vin, s in fleet.settings.items():
    snapshot = SettingsSnapshot(
        vin, s.revision, s.privacy_mode, LocationMode.parse(s.location), s.features, now, ""
    )
    states[vin] = state_from_snapshot(policy, snapshot, now + 3600 if vin in fleet.windows else 0.0)
since = DEFAULT_SIM_START_MS / 1000 - 3600
histories = {v: (Interval(s.revision, s.revision, since, s),) for v, s in states.items()}
dctx = DecisionContext(policy=policy, key=bytes(range(32)))
digest, kinds, fixes = hashlib.sha256(), Counter(), {}
for m in make_messages(fleet, int(sys.argv[1]), seed=4):
    d = core.decide(dctx, f"vehicle/{m.vin}/{m.stream}", m.payload, states, fixes, now, histories)
    if type(d) is Forward and d.anchor is not None:
        fixes[d.vin] = d.anchor
    digest.update(repr(d).encode() + b"\\n")
    kinds[type(d).__name__ + ":" + str(getattr(d, "reason", ""))] += 1
module = sys.modules["gateway.core.decide"].__file__
print(json.dumps({"compiled": core.COMPILED, "module": module, "digest": digest.hexdigest(),
                  "kinds": kinds}))
"""


def decide_the_mix(messages: int, core: str = "") -> dict[str, object]:
    # One hash seed: reprs of frozensets list members in hash order.
    env = {**os.environ, "GATEWAY_CORE": core, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", DECIDE_THE_MIX, str(messages)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_set_up_loads_the_compiled_core() -> None:
    """The test command's set-up compiles the core; a machine without a C
    compiler gets one installed by it (scripts/bootstrap.sh)."""
    import gateway.core

    assert gateway.core.COMPILED, "run scripts/bootstrap.sh (it compiles the core)"
    assert sys.modules["gateway.core.decide"].__file__.endswith(".so")  # type: ignore[union-attr]


def test_compiled_and_python_cores_decide_the_mix_alike() -> None:
    compiled = decide_the_mix(12_000)
    python = decide_the_mix(12_000, "python")
    assert compiled["compiled"] is True and python["compiled"] is False
    assert str(python["module"]).endswith("decide.py")
    kinds = Counter(compiled["kinds"])  # type: ignore[arg-type]
    # The mix reaches the paths that matter: forwards and several drop reasons.
    assert kinds["Forward:"] > 1000, kinds
    assert len([k for k in kinds if k.startswith("Drop:")]) >= 4, kinds
    assert compiled["kinds"] == python["kinds"]
    assert compiled["digest"] == python["digest"]


def test_an_edited_source_runs_as_python(tmp_path: Path) -> None:
    """A compiled build older than its sources is never loaded: a developer's
    edit to decide.py takes effect at once (as Python) and the start says so."""
    copy = tmp_path / "gateway"
    shutil.copytree(REPO / "gateway", copy, ignore=shutil.ignore_patterns("__pycache__"))
    probe = (
        "import sys, gateway.core as c;"
        " print(c.COMPILED, sys.modules['gateway.core.decide'].__file__)"
    )

    def load() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", probe],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "GATEWAY_CORE": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    unchanged = load()
    assert unchanged.stdout.startswith(f"True {copy}"), unchanged.stdout + unchanged.stderr
    decide_py = copy / "core" / "decide.py"
    decide_py.write_text(decide_py.read_text() + "\n# edited\n")
    edited = load()
    assert edited.stdout.startswith(f"False {copy}/core/decide.py"), edited.stdout + edited.stderr
    assert "compiled decision core was built from another decide.py" in edited.stderr
