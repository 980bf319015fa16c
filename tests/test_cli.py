"""`python -m gateway` as a user runs it (subprocess, repo root as cwd)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "config" / "policy.yaml"
VIN = "WVWZZZ1JZXW000001"
TIMEOUT = 60  # a hang is a failure, not a stuck suite


def gateway(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
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
    assert "2026.11.1" in result.stdout and "valid" in result.stdout
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
    assert summary["version"] == "2026.11.1"
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

    text = broken_policy.read_text().replace('version: "2026.11.1"', 'version: "2027.1.1"')
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
