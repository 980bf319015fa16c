"""Where configuration comes from: flags > GATEWAY_* environment > file >
defaults, and secrets read from files rather than given on argv."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, resolve_run_config
from gateway.config import BrokerConfig, ConfigError, ControlConfig, load_config
from sim.broker import MosquittoBroker

from .conftest import DEFAULT_POLICY, REPO, GatewayProcess, gateway_config
from .test_cli import gateway
from .test_tls import running_gateway


@pytest.fixture(autouse=True)
def _no_gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here set exactly the GATEWAY_* variables they are about."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def config_file(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'policy = "{DEFAULT_POLICY}"\n'
        'state_dir = "state"\n'
        "[limits]\n"
        "new_vehicles_per_s = 50\n"
        "[vehicle_broker]\n"
        'url = "mqtt://file.example:1883"\n'
        'client_id = "file-vehicle"\n'
        'topic_prefix = "vehicle"\n' + text
    )
    return path


def run_args(config: Path, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--config", str(config), *flags])


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv("GATEWAY_LIMITS__NEW_VEHICLES_PER_S", "7.5")
    monkeypatch.setenv("GATEWAY_VEHICLE_BROKER__URL", "mqtt://env.example:1884")
    monkeypatch.setenv("GATEWAY_LOGGING__JSON", "true")
    monkeypatch.setenv("GATEWAY_CONTROL__LISTEN", "")
    config = load_config(path)
    assert config.limits.new_vehicles_per_s == 7.5
    assert config.limits.new_vehicles_burst == 500  # the rest of the section: default
    assert config.vehicle_broker.url == "mqtt://env.example:1884"
    assert config.vehicle_broker.client_id == "file-vehicle"  # the rest of it: the file
    assert config.logging.json_lines is True
    assert config.control.listen == ""
    assert config.state_dir == tmp_path / "state"  # relative in the file: to the file


def test_environment_fills_sections_the_file_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial section from the environment keeps the defaults of the rest
    (here the backend broker's client id and topic prefix)."""
    path = config_file(tmp_path)
    monkeypatch.setenv("GATEWAY_BACKEND_BROKER__URL", "mqtt://tsp.example:1883")
    monkeypatch.setenv("GATEWAY_INSTANCE_ID", "edge-7")
    monkeypatch.setenv("GATEWAY_STATE_DIR", "relative-state")
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.backend_broker.url == "mqtt://tsp.example:1883"
    assert config.backend_broker.client_id == "privacy-gateway-backend"
    assert config.backend_broker.topic_prefix == "tsp"
    assert config.instance_id == "edge-7"
    assert config.state_dir == tmp_path / "relative-state"  # from the environment: to the cwd


def test_flags_override_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv("GATEWAY_VEHICLE_BROKER__URL", "mqtt://env.example:1884")
    monkeypatch.setenv("GATEWAY_LOGGING__LEVEL", "ERROR")
    monkeypatch.setenv("GATEWAY_CONTROL__LISTEN", "127.0.0.1:9999")
    config = resolve_run_config(
        run_args(
            path,
            "--vehicle-broker", "mqtt://flag.example:1885",
            "--log-level", "DEBUG",
            "--control-listen", "",
        )
    )
    assert config.vehicle_broker.url == "mqtt://flag.example:1885"
    assert config.logging.level == "DEBUG"
    assert config.control.listen == ""
    assert config.limits.new_vehicles_per_s == 50  # neither flag nor env: the file


def test_errors_name_where_the_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv("GATEWAY_LIMITS__NEW_VEHICLES_PER_S", "-1")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "limits.new_vehicles_per_s" in message
    assert "GATEWAY_LIMITS__NEW_VEHICLES_PER_S" in message
    monkeypatch.delenv("GATEWAY_LIMITS__NEW_VEHICLES_PER_S")
    monkeypatch.setenv("GATEWAY_VEHICLE_BROKER__URL", "mqtt://u:s3cr3t@h:99999")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "GATEWAY_VEHICLE_BROKER__URL" in str(info.value) and "s3cr3t" not in str(info.value)
    monkeypatch.setenv("GATEWAY_NO_SUCH__KEY", "1")  # not a config key: ignored
    monkeypatch.delenv("GATEWAY_VEHICLE_BROKER__URL")
    assert load_config(path).limits.new_vehicles_per_s == 50


def test_broker_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "broker.pass"
    secret.write_text("pa:ss@word/\n")
    config = BrokerConfig(
        url="mqtt://gateway@broker.example",
        client_id="gw",
        topic_prefix="tsp",
        password_file=secret,
    )
    access = config.access()
    assert access.endpoint.username == "gateway"
    assert access.endpoint.password == "pa:ss@word/"  # the trailing newline is not part of it
    assert "pa:ss" not in repr(config) + config.endpoint.redacted()
    with pytest.raises(ValueError, match="in the url or in password_file, not both"):
        BrokerConfig(
            url="mqtt://gateway:other@broker.example",
            client_id="gw",
            topic_prefix="tsp",
            password_file=secret,
        )
    with pytest.raises(ValueError, match="password_file needs a user name in the url"):
        BrokerConfig(
            url="mqtt://broker.example", client_id="gw", topic_prefix="tsp", password_file=secret
        )
    missing = config.model_copy(update={"password_file": tmp_path / "nope"})
    with pytest.raises(ConfigError, match=r"password_file .*nope: cannot read"):
        missing.access()


async def test_gateway_logs_in_with_the_password_file(tmp_path: Path) -> None:
    """A broker that refuses anonymous clients: the password comes from the
    file named by the environment, never from argv or the URL."""
    secret = tmp_path / "broker.pass"
    secret.write_text("right-password\n")
    with (
        MosquittoBroker() as vehicle,
        MosquittoBroker(users={"gateway": "right-password"}) as backend,
    ):
        config = gateway_config(
            vehicle.url, f"mqtt://gateway@127.0.0.1:{backend.port}", tmp_path / "state"
        )
        config.backend_broker = BrokerConfig.model_validate(
            {**config.backend_broker.model_dump(), "password_file": secret}
        )
        async with running_gateway(config, wait_ready=True) as service:
            assert service.backend_edge.ready.is_set()
        secret.write_text("wrong-password\n")
        config.pipeline.drain_timeout_s = 0.5
        async with running_gateway(config, wait_ready=False) as service:
            await asyncio.sleep(1.0)
            assert not service.backend_edge.ready.is_set()


def test_control_tokens_from_a_file(tmp_path: Path) -> None:
    digest = "ab" * 32
    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[[tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{digest}"\n')
    as_json = tmp_path / "tokens.json"
    as_json.write_text(json.dumps([{"name": "dpo", "role": "dpo", "sha256": digest}]))
    inline = {"name": "viewer", "role": "viewer", "sha256": digest}
    for path, names in ((toml, ["viewer", "ops"]), (as_json, ["viewer", "dpo"])):
        config = ControlConfig.model_validate({"tokens": [inline], "tokens_file": path})
        assert [t.name for t in config.all_tokens()] == names
    broken = tmp_path / "broken.toml"
    broken.write_text('[[tokens]]\nname = "ops"\nrole = "root"\nsha256 = "nothex"\n')
    config = ControlConfig(tokens_file=broken)
    with pytest.raises(ConfigError) as info:
        config.all_tokens()
    assert str(broken) in str(info.value) and "tokens.0.role" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        ControlConfig(tokens_file=tmp_path / "none.toml").all_tokens()


def test_json_logs_cover_startup_errors(tmp_path: Path) -> None:
    """A refused configuration is a JSON line too when JSON logs are asked
    for, by flag, environment or the (readable part of the) file."""
    missing = tmp_path / "nope.toml"
    result = gateway("run", "--config", missing, "--json-logs")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and "nope.toml" in entry["msg"]

    path = config_file(tmp_path, "[logging]\njson = true\n[pipeline]\ninflight = 0\n")
    result = gateway("run", "--config", path)
    assert result.returncode == 2
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("pipeline.inflight" in e["msg"] for e in entries), entries

    env = {**os.environ, "GATEWAY_LOGGING__JSON": "true", "GATEWAY_PIPELINE__INFLIGHT": "x"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(config_file(tmp_path))],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert result.returncode == 2
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("GATEWAY_PIPELINE__INFLIGHT" in e["msg"] for e in entries), entries


def test_policy_push_takes_the_token_from_a_file_or_the_environment(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    from gateway.control.api import hash_token

    from .test_control import _control_url, policy_text

    token = "file-token-value"
    (tmp_path / "tokens.toml").write_text(
        f'[[tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{hash_token(token)}"\n'
    )
    assert gateway("keygen", tmp_path / "op.key").returncode == 0
    config = tmp_path / "gateway.toml"
    config.write_text(
        (REPO / "config" / "gateway.toml")
        .read_text()
        .replace('policy = "policy.yaml"', f'policy = "{DEFAULT_POLICY}"')
        .replace("trusted_keys = []", 'trusted_keys = ["op.key.pub"]')
        + 'tokens_file = "tokens.toml"\n'
    )
    bundles = []
    for version in ("2027.5.1", "2027.5.2", "2027.5.3"):
        text = tmp_path / f"{version}.yaml"
        text.write_text(policy_text(version))
        signed = gateway("policy", "sign", "--key", tmp_path / "op.key", text)
        assert signed.returncode == 0, signed.stderr
        bundles.append(tmp_path / f"{version}.yaml.signed")
    token_file = tmp_path / "push.token"
    token_file.write_text(token + "\n")
    proc = GatewayProcess(broker.url, broker.url, tmp_path / "state", "--config", str(config))
    try:
        url = _control_url(proc)
        pushed = gateway("policy", "push", "--url", url, "--token-file", token_file, bundles[0])
        assert pushed.returncode == 0, pushed.stderr
        env = {**os.environ, "GATEWAY_CONTROL_TOKEN": token}
        pushed = subprocess.run(
            [sys.executable, "-m", "gateway", "policy", "push", "--url", url, str(bundles[1])],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env,
        )
        assert pushed.returncode == 0, pushed.stderr
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-token\n")
        refused = gateway("policy", "push", "--url", url, "--token-file", wrong, bundles[2])
        assert refused.returncode == 1 and "401" in refused.stderr
        nothing = gateway("policy", "push", "--url", url, bundles[2])
        assert nothing.returncode == 2 and "--token-file" in nothing.stderr
        unreadable = gateway(
            "policy", "push", "--url", url, "--token-file", tmp_path / "none", bundles[2]
        )
        assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr
    finally:
        assert proc.terminate() == 0
