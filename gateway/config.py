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


class GatewayConfig(_Strict):
    policy: Path = Path("policy.yaml")
    state_dir: Path = Path(".state")
    vehicle_broker: BrokerConfig = BrokerConfig(
        client_id="privacy-gateway-vehicle", topic_prefix="vehicle"
    )
    backend_broker: BrokerConfig = BrokerConfig(
        client_id="privacy-gateway-backend", topic_prefix="tsp", session_expiry_s=0
    )
    pipeline: PipelineConfig = PipelineConfig()
    keys: KeysConfig = KeysConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def key_path(self) -> Path:
        path = Path(self.keys.pseudonym_key_file)
        return path if path.is_absolute() else self.state_dir / path


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
    return config
