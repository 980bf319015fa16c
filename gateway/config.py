"""Runtime configuration (config/gateway.toml), validated with pydantic."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.edges.mqtt import BrokerEndpoint, BrokerUrlError


class ConfigError(Exception):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = Field(min_length=1, max_length=128)
    topic_prefix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    session_expiry_s: int = Field(86400, ge=0)
    keepalive_s: int = Field(30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            BrokerEndpoint.parse(value)
        except BrokerUrlError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint.parse(self.url)


class PipelineConfig(_Strict):
    inflight: int = Field(512, ge=1, le=65535)
    drain_timeout_s: float = Field(10.0, ge=0)


class KeysConfig(_Strict):
    pseudonym_key_file: str = "pseudonym.key"


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = Field(False, alias="json")


Role = Literal["operator", "dpo", "viewer"]


class TokenConfig(_Strict):
    name: str = Field(min_length=1, max_length=64)
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the bearer token")


class ControlConfig(_Strict):
    listen: str = Field("127.0.0.1:8080", description='host:port of the HTTP API; "" disables it')
    trusted_keys: list[Path] = Field(
        default_factory=list, description="operator Ed25519 public keys (PEM)"
    )
    tokens: list[TokenConfig] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access_log_retention_days: float = Field(7.0, gt=0, le=7.0)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"listen must be host:port, got {value!r}")
        return value


# `instance_id` value meaning "no suffix": the client ids exactly as configured.
# A state directory written before instance ids existed gets it, so its
# broker sessions (and the messages queued in them) stay its own.
LEGACY_INSTANCE_ID = "legacy"
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


class GatewayConfig(_Strict):
    policy: Path = Path("policy.yaml")
    state_dir: Path = Path(".state")
    instance_id: str | None = Field(
        None,
        pattern=INSTANCE_ID_PATTERN,
        description="suffix of both MQTT client ids; default: generated once per state directory",
    )
    vehicle_broker: BrokerConfig = BrokerConfig(
        client_id="privacy-gateway-vehicle", topic_prefix="vehicle"
    )
    backend_broker: BrokerConfig = BrokerConfig(
        client_id="privacy-gateway-backend", topic_prefix="tsp", session_expiry_s=0
    )
    pipeline: PipelineConfig = PipelineConfig()
    keys: KeysConfig = KeysConfig()
    logging: LoggingConfig = LoggingConfig()
    control: ControlConfig = ControlConfig()

    @property
    def key_path(self) -> Path:
        path = Path(self.keys.pseudonym_key_file)
        return path if path.is_absolute() else self.state_dir / path

    def client_id(self, broker: BrokerConfig) -> str:
        """The MQTT client id on `broker`: the configured one plus this instance's id.

        Two gateways with the same client id take each other's session over
        in turn; the instance id keeps distinct state directories distinct.
        """
        if self.instance_id is None or self.instance_id == LEGACY_INSTANCE_ID:
            return broker.client_id
        return f"{broker.client_id}-{self.instance_id}"


def load_config(path: str | Path) -> GatewayConfig:
    """Read the TOML file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # TOML is UTF-8 by definition; other bytes are a config error, not a crash.
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
    base = path.resolve().parent
    if not config.policy.is_absolute():
        config.policy = (base / config.policy).resolve()
    if not config.state_dir.is_absolute():
        config.state_dir = (base / config.state_dir).resolve()
    ctl = config.control
    ctl.trusted_keys = [k if k.is_absolute() else (base / k).resolve() for k in ctl.trusted_keys]
    if ctl.tls_cert is not None and not ctl.tls_cert.is_absolute():
        ctl.tls_cert = (base / ctl.tls_cert).resolve()
    if ctl.tls_key is not None and not ctl.tls_key.is_absolute():
        ctl.tls_key = (base / ctl.tls_key).resolve()
    return config
