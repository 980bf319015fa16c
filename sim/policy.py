"""The parts of the gateway policy (config/policy.yaml) the simulator and checker need.

Read independently of the gateway's own loader on purpose: the checker must judge
the gateway against the policy file, not against the gateway's interpretation of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.about import DEFAULT_POLICY
from sim.model import Settings

DEFAULT_POLICY_PATH = DEFAULT_POLICY  # config/policy.yaml, or the packaged copy when installed

APP_STREAM_PREFIX = "avn/app/"
APP_STREAM_KEY = "avn/app/{app_id}"


@dataclass(frozen=True)
class StreamRule:
    key: str  # "tbox/status" or the template "avn/app/{app_id}"
    message: str
    feature: str  # may contain "{app_id}"
    retention_days: int
    location_purpose: bool
    requires_window: bool
    pseudonymize_vin: bool
    # field -> action name; parametrized actions are named "generalize" or
    # "enum" here, their parameters in `steps` and `enums`.
    fields: dict[str, str]
    steps: dict[str, float] = field(default_factory=dict)
    enums: dict[str, frozenset[str]] = field(default_factory=dict)
    # Recipient id -> what it gets beyond the rules, in the policy's order
    # (the first is the one the checker matches message by message).
    routes: dict[str, Route] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    remove: frozenset[str] = frozenset()
    pseudonymize_vin: bool = False


@dataclass(frozen=True)
class Recipient:
    prefix: str | None  # None: the gateway's backend prefix
    transfer_basis: str


@dataclass(frozen=True)
class Policy:
    version: str
    cell_size_m: float
    refresh_interval_s: float
    find_my_car_window_s: float
    legal_basis: dict[str, str]  # feature id (without ".{app_id}") -> legal basis
    streams: dict[str, StreamRule]
    commands: dict[str, str]  # command -> feature
    # Contract rule 17: fixes forwarded per find-my-car command, commands per car per hour.
    fixes_per_command: int = 1
    max_commands_per_hour: int = 4
    recipients: dict[str, Recipient] = field(
        default_factory=lambda: {"backend": Recipient(None, "none")}
    )
    messages: dict[str, str] = field(default_factory=dict)  # message-centre category -> feature
    # Features on for a known car unless its settings say off (not consent-based).
    default_on: frozenset[str] = frozenset()

    def feature_on(self, settings: Settings, feature: str) -> bool:
        return settings.features.get(feature, feature in self.default_on)

    def app_scope_suffix(self, stream: str) -> str:
        """What the gateway appends to a pseudonym scope for the stream's first
        recipient: nothing for the implicit `backend`, else `|{recipient}`."""
        rule = self.rule_for(stream)
        first = next(iter(rule.routes), "backend") if rule is not None else "backend"
        return "" if first == "backend" else f"|{first}"

    def prefixes(self, backend_prefix: str) -> dict[str, str]:
        """Topic prefix -> recipient id."""
        return {r.prefix or backend_prefix: rid for rid, r in self.recipients.items()}

    def rule_for(self, stream: str) -> StreamRule | None:
        """The rule for a concrete stream name such as "avn/app/music"."""
        if stream.startswith(APP_STREAM_PREFIX):
            return self.streams.get(APP_STREAM_KEY)
        return self.streams.get(stream)

    def feature_for(self, stream: str) -> str:
        rule = self.rule_for(stream)
        if rule is None:
            raise KeyError(stream)
        if stream.startswith(APP_STREAM_PREFIX):
            return rule.feature.replace("{app_id}", stream[len(APP_STREAM_PREFIX) :])
        return rule.feature

    def legal_basis_for(self, feature: str) -> str:
        return self.legal_basis[feature.split(".", 1)[0]]

    def is_legal_obligation(self, stream: str) -> bool:
        return self.legal_basis_for(self.feature_for(stream)) == "legal_obligation"


def _action(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    return str(value)


def _rule(key: str, body: dict[str, Any], defaults: list[str]) -> StreamRule:
    fields = dict(body.get("fields") or {})
    routes = body.get("recipients")
    return StreamRule(
        routes={
            str(rid): Route(
                frozenset(str(n) for n in (spec or {}).get("remove", [])),
                bool((spec or {}).get("pseudonymize_vin", False))
                or bool(body.get("pseudonymize_vin", False)),
            )
            for rid, spec in (
                routes.items() if routes is not None else ((d, {}) for d in defaults)
            )
        },
        key=key,
        message=str(body["message"]),
        feature=str(body["feature"]),
        retention_days=int(body["retention_days"]),
        location_purpose=bool(body.get("location_purpose", False)),
        requires_window=bool(body.get("requires_window", False)),
        pseudonymize_vin=bool(body.get("pseudonymize_vin", False)),
        fields={str(k): _action(v) for k, v in fields.items()},
        steps={
            str(k): float(v["generalize"])
            for k, v in fields.items()
            if isinstance(v, dict) and "generalize" in v
        },
        enums={
            str(k): frozenset(str(x) for x in v["enum"])
            for k, v in fields.items()
            if isinstance(v, dict) and "enum" in v
        },
    )


def load_policy(path: Path = DEFAULT_POLICY_PATH) -> Policy:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    declared = raw.get("recipients") or {"backend": {"default": True}}
    recipients = {
        str(rid): Recipient(
            None if body.get("egress_prefix") is None else str(body["egress_prefix"]),
            str(body.get("transfer_basis", "none")),
        )
        for rid, body in declared.items()
    }
    defaults = [str(rid) for rid, body in declared.items() if body.get("default")]
    streams = {key: _rule(key, body, defaults) for key, body in raw["streams"].items()}
    features = raw["features"]
    return Policy(
        recipients=recipients,
        messages={str(n): str(m["feature"]) for n, m in (raw.get("messages") or {}).items()},
        default_on=frozenset(
            str(n)
            for n, f in features.items()
            if f.get("default") and f.get("legal_basis") != "consent"
        ),
        version=str(raw["version"]),
        cell_size_m=float(raw["location"]["cell_size_m"]),
        refresh_interval_s=float(raw["location"]["refresh_interval_s"]),
        find_my_car_window_s=float(raw["find_my_car"]["window_s"]),
        legal_basis={name: str(body["legal_basis"]) for name, body in raw["features"].items()},
        streams=streams,
        commands={name: str(body["feature"]) for name, body in raw["commands"].items()},
        fixes_per_command=int(raw["find_my_car"].get("fixes_per_command", 1)),
        max_commands_per_hour=int(raw["find_my_car"].get("max_commands_per_hour", 4)),
    )
