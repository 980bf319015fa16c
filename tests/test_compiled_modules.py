"""The decision core and the MQTT codec compiled with mypyc
(scripts/compile_native.py) give exactly what their Python sources give, are
what the set-up loads, and are never loaded once a source changed (issue 13:
CPU per message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every decision over the benchmark's mix (all streams, settings of every
# kind, find-my-car windows, a history per car), as text: Forward and Drop
# are named tuples, ApplySettings and Hold print every field.
DECIDE_THE_MIX = """
import hashlib, json, sys, time
from collections import Counter
import gateway.core as core
from gateway import compiled
from gateway.edges import mqtt_codec as codec
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
reader = codec.PacketReader()
for n, m in enumerate(make_messages(fleet, int(sys.argv[1]), seed=4)):
    d = core.decide(dctx, f"vehicle/{m.vin}/{m.stream}", m.payload, states, fixes, now, histories)
    if type(d) is Forward and d.anchor is not None:
        fixes[d.vin] = d.anchor
    digest.update(repr(d).encode() + b"\\n")
    kinds[type(d).__name__ + ":" + str(getattr(d, "reason", ""))] += 1
    if type(d) is Forward:
        # What the edge sends for it, and what reading that back gives.
        topic, props = d.topic.encode(), codec.publish_properties(d.user_properties)
        packet = codec.publish_header(topic, n % 65535 + 1, props, len(d.payload)) + d.payload
        reader.feed(packet)
        first, body = reader.next()
        decoded = codec.decode_publish(first, body)
        digest.update(packet + repr(decoded).encode())
modules = {n: sys.modules[n].__file__ for n in ("gateway.core.decide", "gateway.edges.mqtt_codec")}
print(json.dumps({"compiled": compiled.active(), "modules": modules, "digest": digest.hexdigest(),
                  "kinds": kinds}))
"""


def decide_the_mix(messages: int, native: str = "") -> dict[str, object]:
    # One hash seed: reprs of frozensets list members in hash order.
    env = {**os.environ, "GATEWAY_NATIVE": native, "PYTHONHASHSEED": "0"}
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


def test_the_set_up_loads_the_compiled_modules() -> None:
    """The test command's set-up builds them; a machine without a C compiler
    gets one installed by it (scripts/bootstrap.sh)."""
    import gateway.core
    import gateway.edges.mqtt_codec

    assert gateway.core.COMPILED and gateway.edges.COMPILED, "run scripts/bootstrap.sh"
    for name in ("gateway.core.decide", "gateway.edges.mqtt_codec"):
        assert str(sys.modules[name].__file__).endswith(".so"), name


def test_compiled_and_python_modules_decide_and_encode_the_mix_alike() -> None:
    compiled = decide_the_mix(12_000)
    python = decide_the_mix(12_000, "python")
    assert compiled["compiled"] is True and python["compiled"] is False
    assert all(str(f).endswith(".so") for f in compiled["modules"].values())  # type: ignore[attr-defined]
    assert all(str(f).endswith(".py") for f in python["modules"].values())  # type: ignore[attr-defined]
    kinds = Counter(compiled["kinds"])  # type: ignore[arg-type]
    # The mix reaches the paths that matter: forwards and several drop reasons.
    assert kinds["Forward:"] > 1000, kinds
    assert len([k for k in kinds if k.startswith("Drop:")]) >= 4, kinds
    assert compiled["kinds"] == python["kinds"]
    assert compiled["digest"] == python["digest"]


PROBE = (
    "import sys, gateway.core, gateway.edges.mqtt_codec;"
    " print(sys.modules['gateway.core.decide'].__file__,"
    " sys.modules['gateway.edges.mqtt_codec'].__file__)"
)


def copy_and_load(tmp_path: Path) -> tuple[Path, Callable[[], subprocess.CompletedProcess[str]]]:
    """A copy of the gateway package with its build, and a probe that imports
    it and prints which files the core and codec came from."""
    copy = tmp_path / "gateway"
    shutil.copytree(REPO / "gateway", copy, ignore=shutil.ignore_patterns("__pycache__"))

    def load() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "GATEWAY_NATIVE": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return copy, load


def test_a_build_that_does_not_load_runs_as_python(tmp_path: Path) -> None:
    """A truncated or missing shared library (another libc, a copy that broke)
    must not keep the gateway from starting: the sources run, and it says so."""
    copy, load = copy_and_load(tmp_path)
    (shared,) = (copy / "_compiled").glob("*__mypyc*")
    shared.write_bytes(shared.read_bytes()[:4096])
    truncated = load()
    assert truncated.returncode == 0, truncated.stderr
    assert truncated.stdout.split() == [
        f"{copy}/core/decide.py",
        f"{copy}/edges/mqtt_codec.py",
    ], truncated.stdout + truncated.stderr
    assert "the compiled build is incomplete or damaged" in truncated.stderr
    shared.unlink()
    missing = load()
    assert missing.returncode == 0 and missing.stdout.split()[0] == f"{copy}/core/decide.py"
    assert "the compiled build is incomplete or damaged" in missing.stderr


def test_an_edited_source_runs_as_python(tmp_path: Path) -> None:
    """A compiled build older than its sources is never loaded: a developer's
    edit to decide.py takes effect at once (as Python) and the log says so.
    The same for what it was type-checked against (the policy module)."""
    copy, load = copy_and_load(tmp_path)
    unchanged = load()
    files = unchanged.stdout.split()
    assert len(files) == 2 and all(f.startswith(f"{copy}/_compiled/") for f in files), (
        unchanged.stdout + unchanged.stderr
    )
    decide_py = copy / "core" / "decide.py"
    decide_py.write_text(decide_py.read_text() + "\n# edited\n")
    edited = load()
    # One group: the codec is not loaded compiled beside a Python core either.
    assert edited.stdout.split() == [
        f"{copy}/core/decide.py",
        f"{copy}/edges/mqtt_codec.py",
    ], edited.stdout + edited.stderr
    assert "built from other sources (core/decide.py)" in edited.stderr
    decide_py.write_text(decide_py.read_text().removesuffix("\n# edited\n"))
    assert load().stdout.split()[0].startswith(f"{copy}/_compiled/")  # restored: compiled
    policy_py = copy / "policy.py"
    policy_py.write_text(policy_py.read_text() + "\n# edited\n")
    assert load().stdout.split()[0] == f"{copy}/core/decide.py"
