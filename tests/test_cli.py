"""`python -m gateway` as a user runs it (subprocess, repo root as cwd)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "config" / "policy.yaml"
VIN = "WVWZZZ1JZXW000001"
TIMEOUT = 60  # a hang is a failure, not a stuck suite


def gateway(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def broken_policy(tmp_path: Path) -> Path:
    text = POLICY.read_text().replace("cell_size_m: 2000", "cell_size_m: 50")
    assert "cell_size_m: 50" in text
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    return path


def run_config(tmp_path: Path, policy: Path, url: str = "mqtt://127.0.0.1:1") -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'policy = "{policy}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[vehicle_broker]\n"
        f'url = "{url}"\n'
        'client_id = "test-vehicle"\n'
        'topic_prefix = "vehicle"\n'
        "[backend_broker]\n"
        f'url = "{url}"\n'
        'client_id = "test-backend"\n'
        'topic_prefix = "tsp"\n'
    )
    return config


def test_help_lists_commands() -> None:
    result = gateway("--help")
    assert result.returncode == 0
    for command in ("run", "check-policy", "explain"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["run", "check-policy", "explain"])
def test_each_command_has_help(command: str) -> None:
    result = gateway(command, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout and command in result.stdout


def test_check_policy_default() -> None:
    result = gateway("check-policy", POLICY)
    assert result.returncode == 0, result.stderr
    assert "2026.12.1" in result.stdout and "valid" in result.stdout
    for stream in ("tbox/status", "tbox/ecall", "avn/nav", "avn/app/{app_id}"):
        assert stream in result.stdout


def test_check_policy_broken(broken_policy: Path) -> None:
    result = gateway("check-policy", broken_policy)
    assert result.returncode == 2
    assert str(broken_policy) in result.stderr
    assert "location.cell_size_m" in result.stderr
    assert "at least 200" in result.stderr
    assert result.stdout == ""


def test_check_policy_missing_file(tmp_path: Path) -> None:
    result = gateway("check-policy", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "cannot read" in result.stderr


def test_check_policy_json() -> None:
    result = gateway("check-policy", POLICY, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["version"] == "2026.12.1"
    assert len(summary["digest"]) == 64
    rows = {r["stream"]: r for r in summary["streams"]}
    assert len(rows) == 12
    assert rows["tbox/ecall"]["legal_basis"] == "legal_obligation"
    assert rows["tbox/ecall"]["feature_off"] == "forward untouched"
    assert rows["tbox/status"]["feature_off"] == "drop"


def explain(settings: str, stream: str, payload: dict[str, object]) -> dict[str, object]:
    result = gateway(
        "explain", "--policy", POLICY, "--settings", settings,
        "--topic", f"vehicle/{VIN}/{stream}", "--payload-json", json.dumps(payload),
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


STATUS = {
    "header": {"vin": VIN, "timestamp_ms": 1000},
    "fuel_level_pct": 40,
    "position": {"latitude": 48.137154, "longitude": 11.576124, "altitude_m": 519},
}


def test_explain_unknown_vehicle() -> None:
    report = explain("unknown", "tbox/status", STATUS)
    assert report["decision"] == "drop"
    assert report["reason"] == "unknown_vehicle"
    assert report["published"] == "nothing"


def test_explain_approximate_location() -> None:
    settings = json.dumps(
        {"revision": 3, "location": "approximate", "features": {"remote_control": True}}
    )
    report = explain(settings, "tbox/status", STATUS)
    assert report["decision"] == "forward"
    assert report["topic"] == f"tsp/{VIN}/tbox/status"
    assert report["transforms"] == ["coarsen:position"]
    props = report["user_properties"]
    assert isinstance(props, dict) and props["transforms"] == "coarsen:position"
    payload = report["payload"]
    assert isinstance(payload, dict)
    position = payload["position"]
    assert position["horizontal_accuracy_m"] == 2000.0
    assert "altitude_m" not in position
    assert (position["latitude"], position["longitude"]) != (48.137154, 11.576124)


def test_explain_settings_file_and_feature_off(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"revision": 1, "location": "precise", "features": {}}))
    report = explain(str(settings), "tbox/status", STATUS)
    assert report["decision"] == "drop" and report["reason"] == "feature_disabled"


def test_explain_unknown_topic() -> None:
    report = explain("unknown", "tbox/teleport", {})
    assert report == {
        "decision": "drop",
        "reason": "unknown_topic",
        "why": "no stream of the policy matches this topic (default deny)",
    }


def test_explain_payload_that_does_not_fit_exits_2() -> None:
    result = gateway(
        "explain", "--policy", POLICY, "--settings", "unknown",
        "--topic", f"vehicle/{VIN}/tbox/status", "--payload-json", '{"no_such_field": 1}',
    )
    assert result.returncode == 2
    assert "VehicleStatus" in result.stderr


def test_explain_settings_with_a_location_that_is_no_mode_exit_2() -> None:
    """A clear error, the same whether the core runs compiled or as Python."""
    result = gateway(
        "explain", "--policy", POLICY, "--settings", '{"location": null}',
        "--topic", f"vehicle/{VIN}/tbox/status", "--payload-json", json.dumps(STATUS),
    )
    assert result.returncode == 2, result.stdout
    assert "location must be a mode name or number, not None" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_broken_policy_exits_2(broken_policy: Path) -> None:
    result = gateway(
        "explain", "--policy", broken_policy, "--settings", "unknown",
        "--topic", f"vehicle/{VIN}/tbox/status", "--payload-json", "{}",
    )
    assert result.returncode == 2
    assert str(broken_policy) in result.stderr


def test_run_refuses_broken_policy_before_connecting(tmp_path: Path,
                                                     broken_policy: Path) -> None:
    result = gateway("run", "--config", run_config(tmp_path, broken_policy))
    assert result.returncode == 2
    assert str(broken_policy) in result.stderr
    assert "location.cell_size_m" in result.stderr


def test_run_refuses_broken_policy_flag(tmp_path: Path, broken_policy: Path) -> None:
    config = run_config(tmp_path, POLICY)
    result = gateway("run", "--config", config, "--policy", broken_policy)
    assert result.returncode == 2
    assert str(broken_policy) in result.stderr


def test_run_refuses_a_stored_policy_that_no_longer_validates(
    tmp_path: Path, broken_policy: Path
) -> None:
    """After a push the store says which policy runs; one this release refuses
    stops the start (before any broker is contacted), not a silent fallback."""
    from gateway.control.audit import AuditRecord
    from gateway.store import SqliteConsentStore, StoredPolicy

    text = broken_policy.read_text().replace('version: "2026.12.1"', 'version: "2027.1.1"')
    digest = hashlib.sha256(text.encode()).hexdigest()
    store = SqliteConsentStore.in_state_dir(tmp_path / "state")
    store.save_policy(
        StoredPolicy("2027.1.1", digest, text, "key-1", 1.0, 1.0, True),
        AuditRecord("ops", "policy_pushed", "2027.1.1", {}, 1.0),
    )
    store.close()
    result = gateway("run", "--config", run_config(tmp_path, POLICY))
    assert result.returncode == 2, result.stderr
    assert "the last accepted policy no longer validates" in result.stderr
    assert "stored policy 2027.1.1" in result.stderr and "cell_size_m" in result.stderr


@pytest.mark.parametrize("flag", ["--vehicle-broker", "--backend-broker"])
@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://host:notaport"])
def test_run_refuses_invalid_broker_flag(tmp_path: Path, flag: str, url: str) -> None:
    result = gateway("run", "--config", run_config(tmp_path, POLICY), flag, url)
    assert result.returncode == 2
    assert "broker URL" in result.stderr


def test_run_refuses_invalid_broker_in_config(tmp_path: Path) -> None:
    result = gateway("run", "--config", run_config(tmp_path, POLICY, url="http://x"))
    assert result.returncode == 2
    assert "gateway.toml" in result.stderr and "scheme" in result.stderr


def test_run_refuses_missing_config(tmp_path: Path) -> None:
    result = gateway("run", "--config", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = gateway("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_check_policy_non_utf8_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(POLICY.read_bytes().replace(b"Emergency call", b"Notruf \xfc"))
    result = gateway("check-policy", path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_missing_key_file_exits_2(tmp_path: Path) -> None:
    result = gateway(
        "explain", "--policy", POLICY, "--settings", "unknown",
        "--topic", f"vehicle/{VIN}/tbox/status", "--payload-json", "{}",
        "--key-file", tmp_path / "no.key",
    )
    assert result.returncode == 2
    assert "no.key" in result.stderr and "Traceback" not in result.stderr


def test_run_refuses_non_utf8_config(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'policy = "pol\xedcy.yaml"\n')
    result = gateway("run", "--config", config)
    assert result.returncode == 2
    assert "latin1.toml" in result.stderr and "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def control_config(tmp_path: Path, control: str) -> Path:
    path = run_config(tmp_path, POLICY)
    path.write_text(path.read_text() + "[control]\n" + control)
    return path


@pytest.mark.parametrize(
    ("control", "missing"),
    [('tls_cert = "cert.pem"\n', "tls_key"), ('tls_key = "key.pem"\n', "tls_cert")],
)
def test_run_refuses_half_tls_config(tmp_path: Path, control: str, missing: str) -> None:
    result = gateway("run", "--config", control_config(tmp_path, control))
    assert result.returncode == 2
    assert "tls_cert" in result.stderr and "tls_key" in result.stderr
    assert f"{missing} is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_plaintext_control_on_a_public_address(tmp_path: Path) -> None:
    result = gateway("run", "--config", control_config(tmp_path, 'listen = "0.0.0.0:8080"\n'))
    assert result.returncode == 2
    assert "0.0.0.0:8080" in result.stderr and "allow_plaintext" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "not-an-address"])
def test_run_refuses_bad_control_listen_flag(tmp_path: Path, listen: str) -> None:
    config = run_config(tmp_path, POLICY)
    result = gateway("run", "--config", config, "--control-listen", listen)
    assert result.returncode == 2
    assert "--control-listen" in result.stderr and listen in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--vehicle-broker", "--backend-broker"])
@pytest.mark.parametrize(
    "url", ["mqtt://u:s3cr3t@h:99999", "mqtt://u:s3cr3t@h:notaport", "mqtt://u:s3cr3t@[::1"]
)
def test_run_never_prints_a_broker_password_from_a_flag(
    tmp_path: Path, flag: str, url: str
) -> None:
    result = gateway("run", "--config", run_config(tmp_path, POLICY), flag, url)
    assert result.returncode == 2
    assert "broker URL" in result.stderr and "u:***@" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_run_never_prints_a_broker_password_from_the_config(tmp_path: Path) -> None:
    result = gateway("run", "--config", run_config(tmp_path, POLICY, "mqtt://u:s3cr3t@h:99999"))
    assert result.returncode == 2
    assert "vehicle_broker.url" in result.stderr and "u:***@h" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout


# ------------------------------------------------------------ deployment readiness


def test_version_names_the_release_and_the_commit() -> None:
    from gateway import __version__

    result = gateway("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"vehicle-privacy-gateway {__version__}")
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert f"(commit {head}" in result.stdout


def test_the_wheel_version_is_the_package_version() -> None:
    from gateway import __version__

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gateway.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["run"], ["(default: " + str(ROOT / "config" / "gateway.toml") + ")",
                   "(default: vehicle_broker.url of the config)"]),
        (["explain"], ["(default: vehicle)", "(default: tsp)", "(default: a random one"]),
        (["audit", "verify"], ["(default: state_dir of --config)"]),
        (["policy", "sign"], ["(default: POLICY.signed)"]),
    ],
)
def test_help_shows_defaults(command: list[str], shown: list[str]) -> None:
    result = gateway(*command, "--help", env={"COLUMNS": "400"})  # no wrapping inside paths
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for needle in shown:
        assert needle in text, text
    assert "(default: None)" not in text and "(default: False)" not in text


def _widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_check_policy_fits_an_80_column_terminal() -> None:
    result = gateway("check-policy", POLICY, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert _widest(result.stdout) <= 80, result.stdout
    lines = result.stdout.splitlines()
    # Readable, not just short: names are whole, every state of a stream is there.
    for name in ("tbox/connectivity", "avn/app/{app_id}", "energy_consumption"):
        assert any(name in line for line in lines), name
    assert "…" not in result.stdout.replace("…) is valid", "")
    assert any("truncate ip_address; remove" in line for line in lines)
    assert any("any state" in line and "forward untouched" in line for line in lines)


def test_check_policy_uses_a_wide_terminal() -> None:
    result = gateway("check-policy", POLICY, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "location off" in line)
    assert "approximate" in header and "precise" in header  # one table, a column per state
    assert 150 < _widest(result.stdout) <= 200


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Path:
    """A directory that is a git work tree, with a subdirectory (repository detection
    walks up)."""
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "ops").mkdir()
    return checkout


def test_keygen_refuses_to_write_a_private_key_into_a_repository(fake_checkout: Path) -> None:
    key = fake_checkout / "ops" / "ops.key"
    result = gateway("keygen", key)
    assert result.returncode == 2
    assert f"inside the repository {fake_checkout}" in result.stderr
    assert "--allow-in-repo" in result.stderr and "Traceback" not in result.stderr
    assert not key.exists() and not key.with_name("ops.key.pub").exists()


def test_keygen_refuses_this_source_tree() -> None:
    key = ROOT / "config" / "never-written.key"
    result = gateway("keygen", key)
    assert result.returncode == 2 and f"inside the repository {ROOT}" in result.stderr
    assert not key.exists()


def test_keygen_refuses_a_copy_of_the_project_without_git(tmp_path: Path) -> None:
    copy = tmp_path / "unpacked"
    copy.mkdir()
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    result = gateway("keygen", copy / "ops.key")
    assert result.returncode == 2 and "inside the repository" in result.stderr


def test_keygen_allow_in_repo(fake_checkout: Path) -> None:
    key = fake_checkout / "ops" / "ops.key"
    result = gateway("keygen", key, "--allow-in-repo")
    assert result.returncode == 0, result.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and key.with_name("ops.key.pub").exists()


def test_keygen_outside_any_repository(tmp_path: Path) -> None:
    result = gateway("keygen", tmp_path / "ops.key")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ops.key").exists()


def test_policy_sign_refuses_a_key_kept_in_a_repository(fake_checkout: Path) -> None:
    key = fake_checkout / "ops" / "ops.key"
    assert gateway("keygen", key, "--allow-in-repo").returncode == 0
    out = fake_checkout.parent / "policy.signed"
    result = gateway("policy", "sign", "--key", key, "--out", out, POLICY)
    assert result.returncode == 2
    assert "refusing to sign" in result.stderr and "inside the repository" in result.stderr
    assert not out.exists()
    result = gateway("policy", "sign", "--key", key, "--out", out, POLICY, "--allow-in-repo")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["format"].startswith("privacy-gateway-policy-bundle")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a checkout")
@pytest.mark.parametrize(
    "path", ["ops.key", "config/ops.key", "config/policy.yaml.signed", ".state/consent.sqlite3"]
)
def test_gitignore_covers_secrets_and_state(path: str) -> None:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", path], check=False
    )
    assert result.returncode == 0, f"{path} is not ignored"


def test_run_on_the_installed_default_config_needs_a_state_dir(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The packaged gateway.toml's relative state_dir would point into the installed
    package: without --state-dir the start is refused, before anything is written."""
    from gateway import cli
    from gateway.about import PACKAGED_DEFAULTS

    config = PACKAGED_DEFAULTS / "gateway.toml"
    assert cli.main(["run", "--config", str(config)]) == 2
    assert "give --state-dir DIR" in capsys.readouterr().err
    assert not (PACKAGED_DEFAULTS.parent / ".state").exists()
    assert cli.main(["audit", "verify", "--config", str(config)]) == 2
    assert "give --state-dir DIR" in capsys.readouterr().err


def test_a_token_never_starts_with_a_dash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy push --token -abc` would read the token as an option (seen
    once in 64 runs of the README workflow)."""
    import secrets

    drawn = iter(["-first", "second"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(drawn))
    from gateway.cli import main

    assert main(["token", "--name", "ops", "--role", "operator"]) == 0
    assert "shown once): second" in capsys.readouterr().out
