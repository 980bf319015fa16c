"""One MQTT v5 connection, driven by the asyncio event loop (no threads).

paho-mqtt does the protocol; this module owns sockets, reconnects, publish
confirmations and manual acknowledgements. It knows nothing about privacy.

Why paho and not aiomqtt: aiomqtt acknowledges a QoS 1 message to the broker
before the application sees it, so a crash loses messages the broker believes
delivered. paho's manual acknowledgement lets the gateway ack only once the
message's outcome is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("gateway.mqtt")


class BrokerUrlError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise BrokerUrlError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise BrokerUrlError(f"broker URL {url!r}: missing host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise BrokerUrlError(f"broker URL {url!r}: {exc}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def redacted(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


@dataclass(slots=True)
class InboundMessage:
    source: str  # which edge received it
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # connection generation: acks never cross a reconnect


class PublishRefused(Exception):
    """The broker answered a QoS 1 publish with a failure reason code."""


class _Client(mqtt.Client):
    """paho client that accepts a socket connected by asyncio.

    paho connects with a blocking call; connecting on the event loop
    ourselves keeps an unreachable broker from freezing the other side.
    """

    preconnected: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.preconnected = self.preconnected, None
        if sock is None:
            return super()._create_socket_connection()
        sock.setblocking(True)
        sock.settimeout(self._connect_timeout)
        return sock


class MqttEdge:
    """An MQTT v5 client connection with reconnect, publish futures and manual acks."""

    def __init__(
        self,
        *,
        name: str,
        endpoint: BrokerEndpoint,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Callable[[InboundMessage], None],
        clean_start: bool,
        session_expiry_s: int = 0,
        receive_maximum: int = 512,
        max_inflight_publishes: int = 1024,
        keepalive_s: int = 30,
        connect_timeout_s: float = 5.0,
        tls_context: ssl.SSLContext | None = None,
        on_state_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._max_inflight_publishes = max_inflight_publishes
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._on_state_change = on_state_change
        self.generation = 0
        self.ready = asyncio.Event()  # connected and subscribed
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_task: asyncio.Task[None] | None = None
        self._sock: Any = None

        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.manual_ack_set(True)
        client.max_inflight_messages_set(max_inflight_publishes)
        client.max_queued_messages_set(0)  # bounded by the service's window instead
        client.connect_timeout = connect_timeout_s
        if endpoint.username:
            client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set_context(tls_context or ssl.create_default_context())
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._socket_register_write
        client.on_socket_unregister_write = self._socket_unregister_write
        self._client = client

    # ------------------------------------------------------------------ public

    @property
    def pending_publishes(self) -> int:
        return len(self._publishes)

    async def run(self) -> None:
        """Connect, and reconnect with jittered exponential backoff, until stop()."""
        backoff = 0.1
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._connect_once()
                backoff = 0.1
                await self._disconnected.wait()
            except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
                log.warning(
                    "%s broker %s unreachable: %s",
                    self.name,
                    self.endpoint.redacted(),
                    exc,
                    extra={"edge": self.name},
                )
                self._teardown_socket()
            if self._stopping:
                break
            if time.monotonic() - started > 30:
                backoff = 0.1
            delay = backoff * (0.5 + random.random())
            backoff = min(backoff * 2, 30.0)
            await asyncio.sleep(delay)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._client.is_connected():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout)
        self._teardown_socket()
        self._disconnected.set()

    def publish(
        self,
        topic: str,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> asyncio.Future[None]:
        """QoS 1 publish; the future completes on PUBACK (or fails on a refusal).

        While disconnected, paho keeps the message and resends it after the
        reconnect, so the future simply completes later.
        """
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=1, properties=props)
        future: asyncio.Future[None] = self._loop.create_future()
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            future.set_exception(PublishRefused(f"publish rejected locally: {info.rc!r}"))
            return future
        self._publishes[info.mid] = future
        return future

    def ack(self, mid: int, qos: int, generation: int) -> bool:
        """PUBACK a received message, unless it came over an earlier connection
        (the broker redelivers those itself)."""
        if qos == 0 or generation != self.generation or not self._client.is_connected():
            return False
        self._client.ack(mid, qos)
        return True

    # --------------------------------------------------------------- connect

    async def _connect_once(self) -> None:
        self._disconnected.clear()
        infos = await self._loop.getaddrinfo(
            self.endpoint.host, self.endpoint.port, type=socket.SOCK_STREAM
        )
        if not infos:
            raise OSError(f"cannot resolve {self.endpoint.host}")
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            # Small messages are republished from a callback: without this,
            # Nagle + delayed ACK add ~40 ms per hop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(self._loop.sock_connect(sock, address), self._connect_timeout_s)
        except BaseException:
            sock.close()
            raise
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self._receive_maximum  # the broker's in-flight window toward us
        if self._session_expiry_s:
            props.SessionExpiryInterval = self._session_expiry_s
        self._connack = self._loop.create_future()
        self._client.preconnected = sock
        self._client.connect(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=self._keepalive_s,
            clean_start=self._clean_start,
            properties=props,
        )
        try:
            reason = await asyncio.wait_for(self._connack, self._connect_timeout_s)
        except TimeoutError:
            self._client.disconnect()
            raise
        if reason.is_failure:
            raise ConnectionError(f"broker refused connection: {reason}")
        if self.subscriptions:
            options = SubscribeOptions(qos=1, noLocal=True)
            result, mid = self._client.subscribe([(t, options) for t in self.subscriptions])
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise ConnectionError(f"subscribe failed: {result!r}")
            suback: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
            self._subacks[mid] = suback
            codes = await asyncio.wait_for(suback, self._connect_timeout_s)
            failed = [str(c) for c in codes if c.is_failure]
            if failed:
                raise ConnectionError(f"subscription refused: {failed}")
        self.ready.set()
        log.info(
            "%s broker connected: %s",
            self.name,
            self.endpoint.redacted(),
            extra={"edge": self.name, "generation": self.generation},
        )
        if self._on_state_change:
            self._on_state_change(self.name, True)

    # ------------------------------------------------------- paho callbacks

    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        server_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        # paho does not honour the broker's Receive Maximum, and its public
        # setter refuses to run once connected; paho resends queued messages
        # right after this callback, so the limit is in place for them.
        limit = min(self._max_inflight_publishes, int(server_max or 65535))
        client._max_inflight_messages = limit
        if not reason_code.is_failure:
            # Bump here, not after the await: the broker redelivers unacked
            # messages right behind CONNACK, often in the same read, and they
            # belong to the new connection.
            self.generation += 1
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason_code)

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_ready = self.ready.is_set()
        self.ready.clear()
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"disconnected: {reason_code}"))
        for future in self._subacks.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected before SUBACK"))
        self._subacks.clear()
        if was_ready and not self._stopping:
            log.warning(
                "%s broker connection lost: %s",
                self.name,
                reason_code,
                extra={"edge": self.name},
            )
        if self._on_state_change:
            self._on_state_change(self.name, False)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(
            InboundMessage(
                source=self.name,
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=msg.mid,
                generation=self.generation,
            )
        )

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        future = self._publishes.pop(mid, None)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(PublishRefused(f"broker refused publish: {reason_code}"))
        else:
            future.set_result(None)

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason_codes)

    # ------------------------------------------------ socket <-> event loop

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock = sock
        self._loop.add_reader(sock, self._read)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = self._loop.create_task(self._misc_loop())

    def _read(self) -> None:
        # Drain several packets per wake-up: fewer event-loop round trips.
        self._client.loop_read(64)

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None

    def _socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _teardown_socket(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
            self._sock = None

    async def _misc_loop(self) -> None:
        """Keepalive pings and timeouts, once a second."""
        while True:
            await asyncio.sleep(1.0)
            if self._sock is None:
                if self._stopping:
                    return
                continue
            rc = self._client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._stopping:
                return
