"""MQTT connection helpers (aiomqtt on top of paho-mqtt 2.x)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
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
            # Not the URL itself: it may carry a password.
            raise ValueError(f"unsupported broker URL scheme: {parsed.scheme!r}")
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


class MessageLike(Protocol):
    """What the sim reads from a received message (aiomqtt.Message satisfies it)."""

    @property
    def topic(self) -> Any: ...  # has .value: str

    @property
    def payload(self) -> Any: ...

    @property
    def properties(self) -> Properties | None: ...

    @property
    def qos(self) -> int: ...

    @property
    def retain(self) -> bool: ...


class ClientLike(Protocol):
    """The subset of aiomqtt.Client the sim uses, so an in-memory broker can stand in."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: object) -> Any: ...

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None: ...

    async def subscribe(self, topic: Any, qos: int = 0) -> Any: ...

    @property
    def messages(self) -> AsyncIterator[Any]: ...


ClientFactory = Callable[[str, str, bool], ClientLike]


def aiomqtt_factory(url: str, client_id: str, mqtt5: bool) -> ClientLike:
    return make_client(url, client_id, mqtt5=mqtt5)  # type: ignore[return-value]
