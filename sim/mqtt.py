"""MQTT connection helpers (aiomqtt on top of paho-mqtt 2.x)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlparse

import aiomqtt
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme: {url}")
        tls = parsed.scheme in ("mqtts", "ssl")
        return cls(parsed.hostname or "127.0.0.1", parsed.port or (8883 if tls else 1883), tls)


def make_client(
    url: str,
    client_id: str,
    *,
    mqtt5: bool = True,
    max_inflight: int = 100,
) -> aiomqtt.Client:
    address = BrokerAddress.parse(url)
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if mqtt5 else True,
        keepalive=30,
        timeout=30,
        max_inflight_messages=max_inflight,
        tls_context=ssl.create_default_context() if address.tls else None,
    )


def user_properties(properties: Properties | None) -> list[tuple[str, str]]:
    """MQTT v5 user properties as (name, value) pairs, in order, repeats kept."""
    if properties is None:
        return []
    pairs = getattr(properties, "UserProperty", None) or []
    return [(str(name), str(value)) for name, value in pairs]
