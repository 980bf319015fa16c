"""`python -m gateway init` and `require_initialized_state`: a state directory
is set up on purpose, and where that is required a missing or empty one (an
unmounted state volume) is refused instead of silently becoming a new state."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig, load_config
from gateway.keys import key_fingerprint
from gateway.statedir import StateDir, StateDirError, open_state
from gateway.store import SqliteConsentStore
from sim.broker import MosquittoBroker

from .conftest import GatewayProcess

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "mqtt://127.0.0.1:1"


def init(state: Path, *extra: str) -> tuple[int, str]:
    """`python -m gateway init` in a subprocess: exit code, stdout + stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "init", "--state-dir", str(state), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def stored_fingerprint(state: Path) -> str | None:
    store = SqliteConsentStore(state / SqliteConsentStore.FILENAME)
    try:
        return store.meta("key_fingerprint")
    finally:
        store.close()


def required_config(tmp_path: Path, **keys: str) -> Path:
    """config/gateway.toml with require_initialized_state = true (and `keys`)."""
    text = (REPO / "config" / "gateway.toml").read_text()
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    text = text.replace("policy = ", f"require_initialized_state = true\n{extra}policy = ", 1)
    text = text.replace('policy = "policy.yaml"', f'policy = "{REPO / "config" / "policy.yaml"}"')
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def run_refused(config: Path, state: Path) -> str:
    """`python -m gateway run` expected to refuse before connecting anywhere
    (a gateway that starts anyway keeps retrying and hits the timeout)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "gateway", "run", "--config", str(config),
            "--vehicle-broker", UNREACHABLE, "--backend-broker", UNREACHABLE,
            "--state-dir", str(state), "--control-listen", "",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_init_creates_key_instance_id_and_an_empty_store_bound_to_the_key(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    code, out = init(state)
    assert code == 0, out
    key = (state / "pseudonym.key").read_bytes()
    instance_id = (state / "instance.id").read_text().strip()
    assert len(key) == 32 and re.fullmatch(r"[0-9a-f]{8}", instance_id)
    assert stored_fingerprint(state) == key_fingerprint(key)
    for path in (state, state / "pseudonym.key", state / "instance.id"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert instance_id in out and key_fingerprint(key) in out and "back it up" in out
    store = SqliteConsentStore(state / SqliteConsentStore.FILENAME)
    try:  # empty: no vehicle, no policy yet (the first run records it)
        assert not store.holds_vehicle_data() and store.policies() == []
    finally:
        store.close()
    lock = StateDir(state)
    lock.lock()  # given back
    lock.unlock()


def test_init_again_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert init(state)[0] == 0
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    code, out = init(state)
    assert code == 0, out
    assert "already initialised" in out
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert after["pseudonym.key"] == before["pseudonym.key"]
    assert after["instance.id"] == before["instance.id"]
    assert stored_fingerprint(state) == key_fingerprint(before["pseudonym.key"])


def test_init_uses_the_configured_key_and_instance_id(tmp_path: Path) -> None:
    """A key provisioned elsewhere (a mounted secret) is used, never replaced."""
    key = os.urandom(32)
    secret = tmp_path / "secrets" / "pseudonym.key"
    secret.parent.mkdir()
    secret.write_bytes(key)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[keys]\npseudonym_key_file = "{secret}"\n')
    state = tmp_path / "state"
    code, out = init(state, "--config", str(config), "--instance-id", "edge-7")
    assert code == 0, out
    assert secret.read_bytes() == key and not (state / "pseudonym.key").exists()
    assert stored_fingerprint(state) == key_fingerprint(key)
    assert (state / "instance.id").read_text().strip() == "edge-7"


def test_init_refuses_a_state_dir_in_use_or_bound_to_another_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert init(state)[0] == 0
    holder = StateDir(state)
    holder.lock()
    try:
        code, out = init(state)
    finally:
        holder.unlock()
    assert code == 2 and "in use by pid" in out, out
    original = (state / "pseudonym.key").read_bytes()
    (state / "pseudonym.key").write_bytes(os.urandom(32))
    code, out = init(state)
    assert code == 2 and "does not match" in out, out
    (state / "pseudonym.key").write_bytes(original)
    assert init(state)[0] == 0


def test_required_state_is_off_by_default_so_the_demo_initialises_itself() -> None:
    assert GatewayConfig().require_initialized_state is False
    assert load_config(REPO / "config" / "gateway.toml").require_initialized_state is False


def test_required_state_refuses_a_missing_or_empty_state_dir_writing_nothing(
    tmp_path: Path,
) -> None:
    config = required_config(tmp_path)
    missing = tmp_path / "not-mounted"
    err = run_refused(config, missing)
    assert "not initialised" in err and f"gateway init --state-dir {missing}" in err, err
    assert not missing.exists()
    empty = tmp_path / "empty-volume"
    empty.mkdir()
    err = run_refused(config, empty)
    assert "not initialised" in err and "mounted" in err, err
    assert list(empty.iterdir()) == []
    (empty / SqliteConsentStore.FILENAME).write_bytes(b"")  # died before writing it
    assert "not initialised" in run_refused(config, empty)
    assert [p.name for p in empty.iterdir()] == [SqliteConsentStore.FILENAME]


def test_required_state_never_creates_a_key(tmp_path: Path) -> None:
    """A store without its key: restored without the key, or the key's mount
    is missing. Making a new one would change every pseudonym."""
    state = tmp_path / "state"
    assert init(state)[0] == 0
    (state / "pseudonym.key").unlink()
    err = run_refused(required_config(tmp_path), state)
    assert "pseudonym.key is missing" in err, err
    assert not (state / "pseudonym.key").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    config = GatewayConfig(state_dir=fresh, require_initialized_state=True)
    (fresh / SqliteConsentStore.FILENAME).write_bytes(b"")
    with pytest.raises(StateDirError, match="not initialised"):
        open_state(config)
    SqliteConsentStore(fresh / SqliteConsentStore.FILENAME).close()  # a store, never a key
    with pytest.raises(StateDirError, match="missing"):
        open_state(config)
    assert not (fresh / "pseudonym.key").exists()


@pytest.mark.integration
def test_initialised_state_runs_under_the_instance_id_init_recorded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, out = init(state)
    assert code == 0, out
    instance_id = (state / "instance.id").read_text().strip()
    with MosquittoBroker() as broker:
        proc = GatewayProcess(
            broker.url, broker.url, state, "--config", str(required_config(tmp_path))
        )
        assert proc.terminate() == 0
    assert f"privacy-gateway-vehicle-{instance_id}" in "".join(proc.lines)


def test_init_in_process_reports_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--state-dir", str(tmp_path / "s"), "--instance-id", "no spaces"]) == 2
    assert "--instance-id" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("[keys]\nnope = 1\n")
    assert main(["init", "--config", str(bad), "--state-dir", str(tmp_path / "s")]) == 2
    assert "keys.nope" in capsys.readouterr().err
