"""Runtime configuration validation (gateway/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, ControlConfig, load_config

CERT, KEY = Path("/etc/gw/cert.pem"), Path("/etc/gw/key.pem")


def test_default_control_config_is_valid() -> None:
    config = ControlConfig()
    assert config.listen == "127.0.0.1:8080" and not config.allow_plaintext


@pytest.mark.parametrize(
    "listen",
    ["", "127.0.0.1:8080", "127.5.6.7:0", "[::1]:8080", "::1:8080", "localhost:8080",
     "LocalHost:80", "[::ffff:127.0.0.1]:80"],
)
def test_loopback_listen_needs_no_tls(listen: str) -> None:
    assert ControlConfig(listen=listen).listen == listen


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080", "[2001:db8::1]:443", "gw.example:8080",
     "128.0.0.1:80", "localhost.example:80", "[::ffff:10.0.0.1]:80"],
)
def test_non_loopback_listen_without_tls_is_refused(listen: str) -> None:
    with pytest.raises(ValidationError, match="allow_plaintext") as info:
        ControlConfig(listen=listen)
    assert listen in str(info.value) and "tls_cert" in str(info.value)
    # Either TLS or the explicit opt-in makes it acceptable.
    assert ControlConfig(listen=listen, tls_cert=CERT, tls_key=KEY).listen == listen
    assert ControlConfig(listen=listen, allow_plaintext=True).listen == listen


@pytest.mark.parametrize(
    ("given", "missing"), [({"tls_cert": CERT}, "tls_key"), ({"tls_key": KEY}, "tls_cert")]
)
def test_tls_cert_and_key_come_together(given: dict[str, Path], missing: str) -> None:
    with pytest.raises(ValidationError) as info:
        ControlConfig.model_validate(given)
    message = str(info.value)
    assert "tls_cert" in message and "tls_key" in message and f"{missing} is missing" in message


def test_load_config_reports_half_tls_with_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[control]\ntls_cert = "cert.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "control" in message
    assert "tls_cert" in message and "tls_key" in message


def test_load_config_accepts_explicit_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[control]\nlisten = "0.0.0.0:8080"\nallow_plaintext = true\n')
    assert load_config(path).control.listen == "0.0.0.0:8080"


@pytest.mark.parametrize(
    "url", ["mqtt://u:s3cr3t@h:99999", "http://u:s3cr3t@h", "mqtt://u:s3cr3t@[::1"]
)
def test_load_config_never_shows_a_broker_password(tmp_path: Path, url: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[vehicle_broker]\nurl = "{url}"\nclient_id = "v"\ntopic_prefix = "vehicle"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "vehicle_broker.url" in message
    assert "s3cr3t" not in message and "s3cr3t" not in repr(info.value.__cause__)
