"""An in-process stand-in for an MQTT broker, for fast deterministic tests.

Routing is synchronous, so per-publisher order is preserved exactly like a real
broker does for QoS 1. Only what the sim uses is implemented.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class MemoryTopic:
    value: str


@dataclass(frozen=True)
class MemoryMessage:
    topic: MemoryTopic
    payload: bytes
    properties: Properties | None = None
    qos: int = 1
    retain: bool = False


@dataclass
class MemoryBroker:
    clients: dict[str, MemoryClient] = field(default_factory=dict)
    published: int = 0

    def client(self, url: str, client_id: str, mqtt5: bool = True) -> MemoryClient:
        return MemoryClient(self, client_id)

    def route(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        self.published += 1
        for client in list(self.clients.values()):
            if any(topic_matches_sub(sub, topic) for sub in client.subscriptions):
                client.queue.put_nowait(MemoryMessage(MemoryTopic(topic), payload, properties))


class MemoryClient:
    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.subscriptions: list[str] = []
        self.queue: asyncio.Queue[MemoryMessage | None] = asyncio.Queue()

    async def __aenter__(self) -> MemoryClient:
        self.broker.clients[self.client_id] = self
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.broker.clients.pop(self.client_id, None)
        self.queue.put_nowait(None)

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        self.broker.route(topic, data, properties)
        await asyncio.sleep(0)  # a real publish yields while waiting for PUBACK

    async def subscribe(self, topic: Any, qos: int = 0) -> None:
        if isinstance(topic, str):
            self.subscriptions.append(topic)
        else:
            self.subscriptions.extend(str(t[0]) for t in topic)

    @property
    def messages(self) -> AsyncIterator[MemoryMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[MemoryMessage]:
        while True:
            message = await self.queue.get()
            if message is None:
                return
            yield message
