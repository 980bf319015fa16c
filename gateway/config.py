"""Runtime configuration (config/gateway.toml), validated with pydantic."""

from __future__ import annotations

import ipaddress
import ssl
import tomllib
from pathlib import Path
from typing import Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.edges.mqtt import BrokerEndpoint, BrokerUrlError


class ConfigError(Exception):
    pass


class _Strict(BaseModel):
    # Inputs stay out of error texts: a broker URL may carry its password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class BrokerConfig(_Strict):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = Field(min_length=1, max_length=128)
    topic_prefix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    session_expiry_s: int = Field(86400, ge=0)
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA certificate(s) that sign the mqtts:// broker's certificate; "
        "unset: the system trust store",
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        try:
            BrokerEndpoint.parse(value)
        except BrokerUrlError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> BrokerConfig:
        if self.tls_ca_file is not None and not self.endpoint.tls:
            raise ValueError("tls_ca_file is set but the url is not mqtts://")
        return self

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint.parse(self.url)

    def tls_context(self) -> ssl.SSLContext | None:
        """Client TLS context for an mqtts:// url (None for mqtt://): the
        broker's certificate must chain to the CA and name the host."""
        if not self.endpoint.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.tls_ca_file)
        except (OSError, ValueError) as exc:  # missing file, not PEM, no certificate in it
            raise ConfigError(f"tls_ca_file {self.tls_ca_file}: cannot load: {exc}") from exc


class PipelineConfig(_Strict):
    inflight: int = Field(512, ge=1, le=65535)
    drain_timeout_s: float = Field(10.0, ge=0)
    max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        description="payload bytes held (undecided + awaiting the backend) before reading pauses",
    )
    ecall_lane: bool = Field(
        True,
        description="legal-obligation streams on their own connections, window and retries",
    )


class LimitsConfig(_Strict):
    """Caps on what cars (or anything speaking for them) can make the gateway hold."""

    settings_per_vehicle: int = Field(
        10,
        ge=1,
        description="settings snapshots per vehicle per window recorded as their own history"
        " row; more are still applied but merged into the latest (strictest of both)",
    )
    settings_window_s: float = Field(60.0, gt=0)
    history_per_vehicle: int = Field(
        1000, ge=2, description="history rows per vehicle before the oldest are merged"
    )
    new_vehicles_per_s: float = Field(
        50.0, gt=0, description="first settings of unknown VINs accepted per second (fleet)"
    )
    new_vehicles_burst: int = Field(500, ge=1)
    metric_series: int = Field(
        500, ge=10, description="label sets per metric; beyond, labels fold into 'other'"
    )


class DeadLetterConfig(_Strict):
    retention_days: float = Field(
        7.0, gt=0, description="kept at most this long (and never longer than the stream's)"
    )
    max_rows: int = Field(100_000, ge=1, description="beyond this the oldest are evicted")


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
    allow_plaintext: bool = Field(
        False, description="serve plain HTTP on a non-loopback listen address"
    )
    access_log_retention_days: float = Field(7.0, gt=0, le=7.0)
    probe_listen: str = Field(
        "",
        description="host:port serving only /healthz and /readyz, plain HTTP and without"
        " a token (for orchestrator probes); they reveal nothing personal",
    )

    @field_validator("listen", "probe_listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"listen must be host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _tls_or_loopback(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(f"tls_cert and tls_key must be set together ({missing} is missing)")
        if (
            self.listen
            and self.tls_cert is None
            and not self.allow_plaintext
            and not _is_loopback(self.listen.rpartition(":")[0])
        ):
            # Bearer tokens and data-subject exports must not cross a network in clear.
            raise ValueError(
                f"listen {self.listen!r} is not a loopback address: set tls_cert and tls_key,"
                " or allow_plaintext = true to serve plain HTTP there anyway"
            )
        return self


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; any other name could resolve anywhere."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# `instance_id` value meaning "no suffix": the client ids exactly as configured.
# A state directory written before instance ids existed gets it, so its
# broker sessions (and the messages queued in them) stay its own.
LEGACY_INSTANCE_ID = "legacy"
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


class GatewayConfig(_Strict):
    policy: Path = Path("policy.yaml")
    state_dir: Path = Path(".state")
    require_initialized_state: bool = Field(
        False,
        description="refuse to start (exit 2) unless the state directory holds a consent store"
        " and its key (`python -m gateway init`, or an earlier run): an unmounted state volume"
        " must not silently become a new state with a new key",
    )
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
    dead_letters: DeadLetterConfig = DeadLetterConfig()
    limits: LimitsConfig = LimitsConfig()
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


def validation_problems(exc: ValidationError, where: tuple[str, ...] = ()) -> str:
    """One line: 'path.in.config: what is wrong; ...' (never the input values).
    `where` is the path of the validated model inside the config file."""
    problems = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in (*where, *e["loc"]))
        problems.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(problems)


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
        raise ConfigError(f"{path}: {validation_problems(exc)}") from exc
    base = path.resolve().parent
    if not config.policy.is_absolute():
        config.policy = (base / config.policy).resolve()
    if not config.state_dir.is_absolute():
        config.state_dir = (base / config.state_dir).resolve()
    for broker in (config.vehicle_broker, config.backend_broker):
        if broker.tls_ca_file is not None and not broker.tls_ca_file.is_absolute():
            broker.tls_ca_file = (base / broker.tls_ca_file).resolve()
    ctl = config.control
    ctl.trusted_keys = [k if k.is_absolute() else (base / k).resolve() for k in ctl.trusted_keys]
    if ctl.tls_cert is not None and not ctl.tls_cert.is_absolute():
        ctl.tls_cert = (base / ctl.tls_cert).resolve()
    if ctl.tls_key is not None and not ctl.tls_key.is_absolute():
        ctl.tls_key = (base / ctl.tls_key).resolve()
    return config
