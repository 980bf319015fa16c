"""Runtime configuration, validated with pydantic.

Where values come from, highest first: command-line flags, `GATEWAY_*`
environment variables (nested keys joined by `__`, e.g.
`GATEWAY_VEHICLE_BROKER__URL`), the TOML file (config/gateway.toml), the
defaults below. pydantic-settings merges the layers, section by section.
Secrets are never needed on argv or in the file: they can be read from files
(`password_file`, `tls_key_password_file`, `control.tokens_file`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import ssl
import tomllib
import types
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gateway.edges.mqtt import BrokerEndpoint, BrokerUrlError

ENV_PREFIX = "GATEWAY_"
ENV_NESTED = "__"


class ConfigError(Exception):
    pass


class _Strict(BaseModel):
    # Inputs stay out of error texts: a broker URL may carry its password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"^{_LABEL}(\.{_LABEL})*$"


class BrokerConfig(_Strict):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = Field(min_length=1, max_length=128)
    topic_prefix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    session_expiry_s: int = Field(86400, ge=0)
    keepalive_s: int = Field(30, ge=5, le=3600)
    shared_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="vehicle_broker only: run as one of several instances sharing the"
        " vehicle traffic (MQTT v5 shared subscription $share/{group}/...; commands from the"
        " backend are shared the same way). Needs [store] url: the instances share their"
        " consent state in PostgreSQL",
    )
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA certificate(s) that sign the mqtts:// broker's certificate; "
        "unset: the system trust store",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM client certificate (chain) for brokers that require one (mTLS)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_key_password_file: Path | None = Field(
        None, description="file holding the password of an encrypted tls_key_file"
    )
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    tls_server_name: str | None = Field(
        None,
        pattern=_HOSTNAME,
        max_length=253,
        description="name sent as SNI and checked in the broker's certificate"
        " (default: the url's host)",
    )
    password_file: Path | None = Field(
        None,
        description="file holding the broker password (instead of one in the url; the user"
        " name stays in the url: mqtt://user@host)",
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
    def _tls_settings_agree(self) -> BrokerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(
                f"tls_cert_file and tls_key_file must be set together ({missing} is missing)"
            )
        if self.tls_key_password_file is not None and self.tls_key_file is None:
            raise ValueError("tls_key_password_file is set but tls_key_file is not")
        if not self.endpoint.tls:
            for name in ("tls_ca_file", "tls_cert_file", "tls_server_name"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but the url is not mqtts://")
        if self.password_file is not None:
            endpoint = self.endpoint
            if endpoint.password is not None:
                raise ValueError(
                    "give the broker password in the url or in password_file, not both"
                )
            if not endpoint.username:
                raise ValueError("password_file needs a user name in the url (mqtt://user@host)")
        return self

    def access(self) -> BrokerAccess:
        """What connecting takes, every file read now: the endpoint with the
        password from password_file, the TLS context. ConfigError names the
        file and the problem."""
        endpoint = self.endpoint
        if self.password_file is not None:
            password = read_secret(self.password_file, "password_file")
            endpoint = dataclasses.replace(endpoint, password=password)
        return BrokerAccess(
            endpoint, self.tls_context(), self.tls_server_name, self.tls_cert_file is not None
        )

    @property
    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint.parse(self.url)

    @property
    def server_name(self) -> str:
        """The name the broker's certificate must carry (and the SNI sent)."""
        return self.tls_server_name or self.endpoint.host

    def tls_context(self) -> ssl.SSLContext | None:
        """Client TLS context for an mqtts:// url (None for mqtt://): the
        broker's certificate must chain to the CA and name `server_name`; the
        client certificate, if any, is presented. Reads every file now
        (ConfigError naming the file and the problem)."""
        if not self.endpoint.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
        except (OSError, ValueError) as exc:  # missing file, not PEM, no certificate in it
            raise ConfigError(f"tls_ca_file {self.tls_ca_file}: cannot load: {exc}") from exc
        context.minimum_version = TLS_VERSIONS[self.tls_min_version]
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            password = None
            if self.tls_key_password_file is not None:
                password = read_secret(self.tls_key_password_file, "tls_key_password_file")
            _check_private_key(self.tls_key_file, password)
            try:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file, password)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(
                    f"tls_cert_file {self.tls_cert_file} with tls_key_file {self.tls_key_file}:"
                    f" cannot load: {getattr(exc, 'reason', None) or exc}"
                ) from exc
            _warn_if_not_valid_now(self.tls_cert_file)
        return context


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    endpoint: BrokerEndpoint = dataclasses.field(repr=False)  # may carry the password
    tls: ssl.SSLContext | None
    server_name: str | None
    client_cert: bool


def read_secret(path: Path, what: str) -> str:
    """A secret kept in a file: its text without the trailing newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from exc
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(f"{what} {path}: is empty")
    return secret


def _check_private_key(path: Path, password: str | None) -> None:
    """Load the key once with cryptography: its errors say what is wrong
    (OpenSSL's through ssl say "PEM lib")."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls_key_file {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        load_pem_private_key(data, password.encode() if password is not None else None)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        hint = (
            "the key is encrypted: set tls_key_password_file"
            if password is None
            else "the key is not encrypted: remove tls_key_password_file"
        )
        raise ConfigError(f"tls_key_file {path}: {hint}") from exc
    except ValueError as exc:
        problem = str(exc).split(".", 1)[0]
        # A wrong password decrypts an encrypted key to garbage: the parser
        # then says "Could not deserialize" as often as "bad decrypt".
        if password is not None and ("decrypt" in str(exc).lower() or b"ENCRYPTED" in data):
            problem = "cannot decrypt it with the password of tls_key_password_file"
        raise ConfigError(f"tls_key_file {path}: {problem}") from exc


def _warn_if_not_valid_now(path: Path) -> None:
    import datetime
    import logging

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return  # ssl loaded it: a chain whose first block cryptography reads differently
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        logging.getLogger("gateway.config").warning(
            "tls_cert_file %s expired on %s: brokers will refuse it",
            path,
            cert.not_valid_after_utc.isoformat(),
        )
    elif cert.not_valid_before_utc > now:
        logging.getLogger("gateway.config").warning(
            "tls_cert_file %s is not valid before %s", path, cert.not_valid_before_utc.isoformat()
        )


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
    capture_skew_s: float = Field(
        180.0,
        ge=0,
        le=86400,
        description="clock skew allowed between a car's capture timestamp and the gateway:"
        " the strictest settings within this margin of it apply (contract rule 11)",
    )
    hold_max_s: float = Field(
        3600.0,
        ge=0,
        description="how long a message stating a settings revision not applied yet is"
        " parked before it is dropped as settings_pending (rule 12); 0: not parked",
    )
    parked_bytes_per_vehicle: int = Field(
        1024 * 1024,
        ge=1024,
        description="payload bytes parked per vehicle; beyond, its oldest are dropped",
    )
    parked_bytes: int = Field(
        256 * 1024 * 1024,
        ge=64 * 1024,
        description="payload bytes parked for all vehicles; beyond, the oldest are dropped",
    )
    parked_app_release_min_delay_s: float = Field(
        30.0,
        ge=0,
        description="a car's parked app (pseudonymized) messages are released this long at"
        " least after its VIN-keyed ones, so one burst does not pair them (rule 15)",
    )
    parked_app_release_max_delay_s: float = Field(
        600.0,
        ge=0,
        description="upper bound of that random delay (never past the messages' own maximum wait)",
    )

    @model_validator(mode="after")
    def _app_release_delays(self) -> PipelineConfig:
        if self.parked_app_release_max_delay_s < self.parked_app_release_min_delay_s:
            raise ValueError(
                "parked_app_release_max_delay_s must not be below parked_app_release_min_delay_s"
            )
        return self


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
    capture_intervals_per_vehicle: int = Field(
        32,
        ge=2,
        le=10_000,
        description="settings intervals per vehicle held in memory for the capture-time"
        " check; beyond, the oldest are merged into the strictest combination",
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


class ErasureConfig(_Strict):
    # Each app pseudonym's erasure event is published after its own random
    # delay in [min, max], never with the VIN event: timing must not pair them.
    app_event_min_delay_s: float = Field(
        300.0, gt=0, le=7 * 86400, description="earliest app erasure event after the VIN event"
    )
    app_event_max_delay_s: float = Field(
        86400.0, gt=0, le=7 * 86400, description="latest app erasure event after the VIN event"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ErasureConfig:
        if self.app_event_max_delay_s < self.app_event_min_delay_s:
            raise ValueError("app_event_max_delay_s must not be below app_event_min_delay_s")
        return self


class KeysConfig(_Strict):
    pseudonym_key_file: str = "pseudonym.key"


class StoreConfig(_Strict):
    """Where the consent store lives: the state directory's SQLite file
    (default), or a PostgreSQL database shared by several instances."""

    # postgresql://user@host:5432/db; the password from a libpq password file
    # (PGPASSFILE), never in this file.
    url: str | None = Field(None, pattern=r"^postgres(ql)?://[^:@/\s]+(@|/|$)[^\s]*$")

    @field_validator("url")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None and "password=" in value.lower():
            raise ValueError("no password in the URL: use a libpq password file (PGPASSFILE)")
        return value


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
    tokens_file: Path | None = Field(
        None,
        description="more tokens, kept out of the config: TOML ([[tokens]] entries) or JSON"
        " (a list of entries); re-read on SIGHUP",
    )
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

    def all_tokens(self) -> list[TokenConfig]:
        """`tokens` plus the entries of `tokens_file`, read now (ConfigError
        naming the file and the entry)."""
        if self.tokens_file is None:
            return list(self.tokens)
        path = self.tokens_file
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"tokens_file {path}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"tokens_file {path}: not UTF-8 text") from exc
        try:
            raw: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            kind = "JSON" if path.suffix == ".json" else "TOML"
            raise ConfigError(f"tokens_file {path}: not valid {kind}: {exc}") from exc
        entries = raw.get("tokens", []) if isinstance(raw, dict) else raw
        try:
            return [*self.tokens, *_TokenList.model_validate({"tokens": entries}).tokens]
        except ValidationError as exc:
            raise ConfigError(f"tokens_file {path}: {validation_problems(exc)}") from exc


class _TokenList(_Strict):
    tokens: list[TokenConfig]


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
    erasure: ErasureConfig = ErasureConfig()
    limits: LimitsConfig = LimitsConfig()
    keys: KeysConfig = KeysConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    control: ControlConfig = ControlConfig()

    @property
    def key_path(self) -> Path:
        path = Path(self.keys.pseudonym_key_file)
        return path if path.is_absolute() else self.state_dir / path

    def broker_access(self) -> dict[str, BrokerAccess]:
        """How to reach both brokers, every file read now (password, CA,
        client certificate and key): ConfigError names the broker's section,
        the file and the problem."""
        access = {}
        for name in ("vehicle_broker", "backend_broker"):
            try:
                access[name] = getattr(self, name).access()
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
        return access

    @model_validator(mode="after")
    def _shared_group(self) -> Self:
        if self.backend_broker.shared_group is not None:
            raise ValueError(
                "backend_broker.shared_group: set shared_group on vehicle_broker only (the"
                " backend subscriptions use the same group)"
            )
        if self.vehicle_broker.shared_group is not None and self.store.url is None:
            raise ValueError(
                "vehicle_broker.shared_group needs [store] url (postgresql://...): instances"
                " sharing the traffic must share their consent state"
            )
        return self

    def client_id(self, broker: BrokerConfig) -> str:
        """The MQTT client id on `broker`: the configured one plus this instance's id.

        Two gateways with the same client id take each other's session over
        in turn; the instance id keeps distinct state directories distinct.
        """
        if self.instance_id is None or self.instance_id == LEGACY_INSTANCE_ID:
            return broker.client_id
        return f"{broker.client_id}-{self.instance_id}"


def validation_problems(
    exc: ValidationError,
    where: tuple[str, ...] = (),
    origin: Callable[[tuple[str | int, ...]], list[str]] | None = None,
) -> str:
    """One line: 'path.in.config: what is wrong; ...' (never the input values).
    `where` is the path of the validated model inside the config file;
    `origin` names where a value at a path came from (a flag, a variable)."""
    problems = []
    for e in exc.errors():
        path = (*where, *e["loc"])
        loc = ".".join(str(p) for p in path)
        sources = origin(path) if origin is not None else []
        if sources:
            loc += f" (from {', '.join(sources)})"
        problems.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(problems)


# The file's values while GatewaySettings is built (sources are chosen per
# class; the file is per call).
_FILE_LAYER: ContextVar[dict[str, Any] | None] = ContextVar("gateway_config_file", default=None)


class _Layer(PydanticBaseSettingsSource):
    """Values already read (the file's, or the sections' defaults) as one
    layer; pydantic-settings merges the layers section by section."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _section_defaults() -> dict[str, Any]:
    """Each section's defaults as values, so that a section given only in
    part (one environment variable, one flag) keeps the rest of its defaults
    (e.g. the backend broker's client id when only its url is set)."""
    return {
        name: field.default.model_dump(by_alias=True)
        for name, field in GatewayConfig.model_fields.items()
        if isinstance(field.default, BaseModel)
    }


class GatewaySettings(GatewayConfig, BaseSettings):
    """GatewayConfig as loaded for a run: flags > GATEWAY_* environment > file
    > defaults. (GatewayConfig itself reads no environment: tests and tools
    build it from values.)"""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        case_sensitive=False,
        extra="forbid",
        hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,  # flags
            env_settings,
            _Layer(settings_cls, _FILE_LAYER.get() or {}),
            _Layer(settings_cls, _section_defaults()),
        )


def env_name(path: tuple[str | int, ...]) -> str:
    """The environment variable of a config key: GATEWAY_LIMITS__NEW_VEHICLES_PER_S."""
    return ENV_PREFIX + ENV_NESTED.join(str(p) for p in path).upper()


def _related(a: tuple[str | int, ...], b: tuple[str | int, ...]) -> bool:
    """One path contains the other (a section and a key in it)."""
    n = min(len(a), len(b))
    return tuple(map(str, a[:n])) == tuple(map(str, b[:n]))


def _env_origins(environ: Mapping[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    prefix = ENV_PREFIX.lower()
    found = []
    for name in environ:
        if name.lower().startswith(prefix):
            path = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED))
            found.append((name, path))
    return found


def _annotation_kind(annotation: Any) -> str | type[BaseModel] | None:
    if annotation is Path:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args == (Path,):
        return "paths"
    if origin in (Union, types.UnionType) and Path in args:
        return "path"
    return None


def _file_paths(data: dict[str, Any], model: type[BaseModel], base: Path) -> dict[str, Any]:
    """Relative paths in the file are relative to the file: resolved before
    the layers are merged (values from flags and the environment are relative
    to the working directory)."""
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    fields.update(model.model_fields)
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = fields.get(key)
        kind = _annotation_kind(field.annotation) if field is not None else None
        if kind == "path" and isinstance(value, str):
            value = str((base / value).resolve())
        elif kind == "paths" and isinstance(value, list):
            value = [str((base / v).resolve()) if isinstance(v, str) else v for v in value]
        elif isinstance(kind, type) and isinstance(value, dict):
            value = _file_paths(value, kind, base)
        out[key] = value
    return out


def _absolute_paths(model: BaseModel) -> None:
    """What is still relative came from a flag or the environment: relative
    to the working directory."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, value.resolve())
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(model, name, [v.resolve() for v in value])
        elif isinstance(value, BaseModel) and _annotation_kind(field.annotation) is not None:
            _absolute_paths(value)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # TOML is UTF-8 by definition; other bytes are a config error, not a crash.
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return data


def load_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    flags: Mapping[tuple[str, ...], str] | None = None,
) -> GatewayConfig:
    """The configuration of a run: `overrides` (from flags; `flags` names the
    flag of each key, for messages) over GATEWAY_* environment variables over
    the TOML file at `path` over the defaults. Relative paths in the file are
    relative to the file, as are the defaults of `policy` and `state_dir`;
    those from flags and the environment to the working directory."""
    path = Path(path)
    base = path.resolve().parent
    data = _file_paths(read_config_file(path), GatewayConfig, base)
    environ = dict(os.environ)

    def origin(loc: tuple[str | int, ...]) -> list[str]:
        named = [flag for key, flag in (flags or {}).items() if _related(loc, key)]
        named += [name for name, key in _env_origins(environ) if _related(loc, key)]
        return named

    token = _FILE_LAYER.set(data)
    try:
        config: GatewayConfig = GatewaySettings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_problems(exc, origin=origin)}") from exc
    except SettingsError as exc:  # a GATEWAY_* value that is not the JSON its key needs
        field = re.search(r'field "(\w+)"', str(exc))
        names = [
            name
            for name, key in _env_origins(environ)
            if field is not None and key[0] == field.group(1)
        ]
        raise ConfigError(
            f"{path}: {', '.join(names) or 'a GATEWAY_* variable'}: not a value for"
            f" {field.group(1) if field else 'its key'} (lists and sections are given as JSON)"
        ) from exc
    finally:
        _FILE_LAYER.reset(token)
    if "policy" not in config.model_fields_set:
        config.policy = (base / config.policy).resolve()
    if "state_dir" not in config.model_fields_set:
        config.state_dir = (base / config.state_dir).resolve()
    _absolute_paths(config)
    return config
