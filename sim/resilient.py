"""An MQTT client that survives broker restarts, for runs that restart brokers on purpose.

aiomqtt's client is one connection: when the broker goes away, publishes wait
for their timeout and the message iterator ends. A car (or a backend) that
loses its broker reconnects and sends again, so `ResilientClient` does that:

- a persistent session (MQTT 5: clean start off and a session expiry; MQTT
  3.1.1: clean session off), so what the broker queued while the client was
  away (PrivacyApplied, commands, forwarded telemetry) is delivered after the
  reconnect, and subscriptions are replayed as well;
- `publish` waits for a connection and retries on a new one when the old one
  is lost before the PUBACK (QoS 1: the broker may then see it twice, which is
  what QoS 1 allows); it gives up only after `give_up_s`;
- `messages` is one iterator across connections.

It satisfies `sim.mqtt.ClientLike`, so the fleet and the recorder use it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sim.mqtt import BrokerAddress, ClientLike

T = TypeVar("T")
_QUIET = logging.getLogger("sim.resilient.mqtt")
_QUIET.setLevel(logging.CRITICAL)
SESSION_EXPIRY_S = 3600
RECONNECT_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.0)


@dataclass
class ConnectionStats:
    """Shared by every client of one factory: how often the run had to recover."""

    reconnects: int = 0
    publish_retries: int = 0
    publish_failures: int = 0
    by_client: dict[str, int] = field(default_factory=dict)


@dataclass
class _Connection:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class ResilientClient:
    def __init__(
        self,
        url: str,
        client_id: str,
        mqtt5: bool,
        *,
        session_expiry_s: int = SESSION_EXPIRY_S,
        publish_timeout_s: float = 10.0,
        give_up_s: float = 300.0,
        max_inflight: int = 100,
        stats: ConnectionStats | None = None,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self.mqtt5 = mqtt5
        self.session_expiry_s = session_expiry_s
        self.publish_timeout_s = publish_timeout_s
        self.give_up_s = give_up_s
        self.max_inflight = max_inflight
        self.stats = stats or ConnectionStats()
        self._address = BrokerAddress.parse(url)
        self._connection: _Connection | None = None
        self._connected = asyncio.Event()
        self._subscriptions: list[tuple[Any, int]] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    # --- connection ---------------------------------------------------------------
    def _make(self) -> aiomqtt.Client:
        properties: Properties | None = None
        if self.mqtt5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
        client = aiomqtt.Client(
            self._address.host,
            self._address.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self.mqtt5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if self.mqtt5 else False,
            clean_start=False if self.mqtt5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=30,
            timeout=30,
            max_inflight_messages=self.max_inflight,
            tls_context=ssl.create_default_context() if self._address.tls else None,
            # Lost connections are expected here and counted in `stats`, not logged.
            logger=_QUIET,
        )
        client.pending_calls_threshold = 1_000_000  # a flood has many publishes in flight
        return client

    async def _connect(self) -> None:
        client = self._make()
        await client.__aenter__()
        try:
            for topic, qos in self._subscriptions:
                await client.subscribe(topic, qos=qos)
        except aiomqtt.MqttError:
            await _close(client)
            raise
        self._connection = _Connection(client)
        self._connected.set()

    async def _connect_retrying(self, deadline: float | None) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect()
                return
            except aiomqtt.MqttError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
                attempt += 1

    async def _supervise(self) -> None:
        """Move messages to our queue; on a lost connection, connect again."""
        while not self._closing:
            connection = self._connection
            assert connection is not None
            with contextlib.suppress(aiomqtt.MqttError):
                async for message in connection.client.messages:
                    self._queue.put_nowait(message)
            if self._closing:
                return
            self._connected.clear()
            connection.lost.set()
            await _close(connection.client)
            self.stats.reconnects += 1
            self.stats.by_client[self.client_id] = self.stats.by_client.get(self.client_id, 0) + 1
            await self._connect_retrying(None)

    async def __aenter__(self) -> ResilientClient:
        await self._connect_retrying(time.monotonic() + 15.0)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt-{self.client_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._supervisor
        if self._connection is not None:
            await _close(self._connection.client)

    # --- ClientLike -----------------------------------------------------------------
    async def _on_connection(
        self, operation: Callable[[aiomqtt.Client], Awaitable[T]], deadline: float
    ) -> T:
        """Run `operation` on the current connection, again on the next one if it is lost."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                raise aiomqtt.MqttError(f"{self.client_id}: no connection for {self.give_up_s}s")
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except TimeoutError:
                continue
            connection = self._connection
            assert connection is not None
            work = asyncio.ensure_future(operation(connection.client))
            lost = asyncio.ensure_future(connection.lost.wait())
            try:
                await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await work
            if work.cancelled():
                self.stats.publish_retries += 1
                continue  # the connection was lost first: once more on the next one
            try:
                return work.result()
            except aiomqtt.MqttError:
                self.stats.publish_retries += 1
                await asyncio.sleep(0.1)

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        async def send(client: aiomqtt.Client) -> None:
            await client.publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                properties=properties,
                timeout=self.publish_timeout_s,
            )

        try:
            await self._on_connection(send, time.monotonic() + self.give_up_s)
        except aiomqtt.MqttError:
            self.stats.publish_failures += 1
            raise

    async def subscribe(self, topic: Any, qos: int = 0) -> Any:
        self._subscriptions.append((topic, qos))

        async def subscribe(client: aiomqtt.Client) -> Any:
            return await client.subscribe(topic, qos=qos)

        return await self._on_connection(subscribe, time.monotonic() + self.give_up_s)

    @property
    def messages(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            yield await self._queue.get()


async def _close(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError, OSError, RuntimeError, TimeoutError):
        await asyncio.wait_for(client.__aexit__(None, None, None), 5)


def resilient_factory(
    stats: ConnectionStats | None = None, **options: Any
) -> Callable[[str, str, bool], ClientLike]:
    """A `ClientFactory` whose clients reconnect; all share `stats`."""
    shared = stats or ConnectionStats()

    def factory(url: str, client_id: str, mqtt5: bool) -> ClientLike:
        return ResilientClient(url, client_id, mqtt5, stats=shared, **options)

    return factory
