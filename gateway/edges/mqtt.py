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
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("gateway.mqtt")


MAX_RECONNECT_DELAY_S = 30.0


def reconnect_delay(backoff: float, rand: float) -> float:
    """Wait before the next connection attempt: `backoff` jittered to
    [0.5, 1.5) times itself, for `rand` in [0, 1), never above
    MAX_RECONNECT_DELAY_S. At the cap the range shrinks to [1/3, 1] of it
    rather than clipping, so clients cut off together still spread out."""
    upper = min(backoff * 1.5, MAX_RECONNECT_DELAY_S)
    return upper * (1.0 + 2.0 * rand) / 3.0


class BrokerUrlError(ValueError):
    pass


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages.

    Works on text that does not parse (that is when it gets printed): the
    credentials are whatever precedes the last '@', so a raw '@' or '/' in
    the password cannot push part of it out of the redacted span.
    """
    userinfo_end = url.rfind("@")
    if userinfo_end < 0:
        return url
    scheme_end = url.find("://")
    start = scheme_end + 3 if 0 <= scheme_end < userinfo_end else 0
    user, sep, _ = url[start:userinfo_end].partition(":")
    if not sep:
        return url
    return f"{url[:start]}{user.partition('/')[0]}:***{url[userinfo_end:]}"


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        # Messages show the URL redacted: it may carry the broker password.
        # urllib's messages are not passed on, they can quote parts of it.
        shown = repr(redact_url(url))
        try:
            parts = urlsplit(url)
        except ValueError:
            raise BrokerUrlError(f"broker URL {shown}: malformed host") from None
        if parts.scheme not in ("mqtt", "mqtts"):
            raise BrokerUrlError(f"broker URL {shown}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise BrokerUrlError(f"broker URL {shown}: missing host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise BrokerUrlError(f"broker URL {shown}: port must be 0 to 65535") from None
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
    # When it arrived (monotonic): a shared store's changes committed before
    # then are read before it is decided.
    received: float = field(default_factory=time.monotonic)


class PublishRefused(Exception):
    """A QoS 1 publish failed: the broker answered with a failure reason code,
    or the edge refused it before sending (`code` is then the MQTT v5 code it
    stands for, e.g. 0x95 Packet too large)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


PACKET_TOO_LARGE = 0x95
IMPLEMENTATION_SPECIFIC_ERROR = 0x83


def _varint_size(value: int) -> int:
    size = 1
    while value >= 128:
        value >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, props: Properties | None) -> int:
    """Bytes of a QoS 1 MQTT v5 PUBLISH on the wire (what Maximum Packet Size limits)."""
    props_len = len(props.pack()) if props is not None else 1  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode()) + 2 + props_len + len(payload)
    return 1 + _varint_size(remaining) + remaining


class TlsHandshakeError(ConnectionError):
    """The broker's TLS handshake failed or timed out: nothing was sent in clear."""


_OPENSSL_NOISE = re.compile(r"^\[[A-Z0-9_: ]+\] |\s*\(_ssl\.c:\d+\)$")


# What a broker's TLS alert says about our side, in words. Alerts name the
# problem tersely and only the first match is explained.
_ALERT_HINTS = (
    ("certificate required", "the broker requires a client certificate"),
    ("unknown ca", "the broker does not trust the issuer of our client certificate"),
    ("certificate expired", "the broker says our client certificate has expired"),
    ("certificate revoked", "the broker says our client certificate is revoked"),
    ("bad certificate", "the broker refused our client certificate"),
    ("unsupported certificate", "the broker refused our client certificate"),
    ("protocol version", "no TLS version both sides accept (see tls_min_version)"),
    ("unsupported protocol", "no TLS version both sides accept (see tls_min_version)"),
)


def _tls_failure(exc: BaseException, client_cert: bool | None = None) -> str:
    """Why a handshake failed, in words (without OpenSSL's source locations).
    `client_cert`: whether we presented one (None: not known), to explain
    what a broker that requires one answers when none was sent."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
        text = "the broker closed the connection during the handshake"
        if client_cert is False:
            text += " (no client certificate is configured: does the broker require one?)"
        return text
    if not isinstance(exc, ssl.SSLError):
        return str(exc) or type(exc).__name__
    text = _OPENSSL_NOISE.sub("", str(exc.args[1] if len(exc.args) > 1 else exc))
    hints = [hint for words, hint in _ALERT_HINTS if words in text]
    if hints:
        hint = hints[0]
        if client_cert is False and "client certificate" in hint:
            hint += "; no client certificate is configured (tls_cert_file, tls_key_file)"
        text += f" ({hint})"
    elif client_cert is False and "handshake failure" in text:
        # What a TLS 1.2 broker that requires a client certificate says when none comes.
        text += (
            " (no client certificate is configured: a broker that requires one"
            " answers this way; see tls_cert_file, tls_key_file)"
        )
    return text


_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_SESSION_TAKEN_OVER = 0x8E  # DISCONNECT reason: another connection with our client id
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _Client(mqtt.Client):
    """paho client that accepts a socket connected by asyncio, with buffered socket I/O.

    paho connects, and does the TLS handshake, with blocking calls; doing
    both on the event loop ourselves keeps an unreachable or silent broker
    from freezing the other side. A TLS socket arrives here already past its
    handshake and is used as is: paho never wraps it again.

    paho reads a packet with at least three recv() calls (command byte,
    length bytes, body) and writes every packet with its own send(): at
    thousands of messages a second the syscalls cost more than the privacy
    decision. Reads are served from one large recv(); writes are collected
    and flushed with one send() per event-loop pass (`flush`). Neither
    changes what paho considers sent or received: a flushed buffer is no
    different from data sitting in the kernel's socket buffer.
    """

    preconnected: socket.socket | None = None
    _READ_SIZE = 1 << 18

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        # Why the socket failed, when it did with an error: paho reports
        # only "connection lost" (Unspecified error). With TLS 1.3 a broker
        # refuses a client certificate after our side of the handshake is
        # done, so its alert arrives here, with the first read.
        self.socket_error: OSError | None = None

    def _create_socket(self) -> Any:
        self._rbuf, self._rpos, self._wbuf = b"", 0, bytearray()  # nothing crosses connections
        self.socket_error = None
        sock, self.preconnected = self.preconnected, None
        if sock is None:  # not how MqttEdge connects; paho's own path (TLS included)
            return super()._create_socket()
        return sock  # paho makes it non-blocking

    @property
    def read_buffered(self) -> bool:
        """Bytes received but not yet handed to paho. A TLS socket can hold
        decrypted bytes that do not make the socket readable for epoll."""
        if self._rpos < len(self._rbuf):
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            try:
                data = super()._sock_recv(max(bufsize, self._READ_SIZE))
            except BlockingIOError:
                raise
            except OSError as exc:
                self.socket_error = exc
                raise
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos : end]
        self._rpos = end
        return chunk

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        self._wbuf += buf
        return len(buf)

    def flush(self) -> bool:
        """Send what paho wrote; True when everything went out."""
        if not self._wbuf or self._sock is None:
            return True
        try:
            sent = self._sock.send(self._wbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        except OSError as exc:
            self.socket_error = self._unread_alert() or exc
            self._wbuf.clear()
            self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return True
        del self._wbuf[:sent]
        return not self._wbuf

    def _unread_alert(self) -> ssl.SSLError | None:
        """After a failed write, the broker's TLS alert may still wait unread:
        it says why the broker closed (e.g. it refused our client certificate
        while our CONNECT was on its way)."""
        sock = self._sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        try:
            sock.recv(1)
        except ssl.SSLEOFError:
            return None
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLError as alert:
            return alert
        except OSError:
            return None
        return None

    def _update_inflight(self) -> MQTTErrorCode:
        # paho scans every outgoing message on every PUBACK looking for queued
        # ones (O(window) per ack). Only QoS>0 messages are kept, so when none
        # is queued beyond the in-flight count there is nothing to find.
        if len(self._out_messages) <= self._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        # Success without reason code or properties, the usual PUBACK: skip
        # building a ReasonCode and a Properties object per message.
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_close(self) -> None:
        # paho closes right after "sending" DISCONNECT: let it reach the socket first.
        if self._sock is not None and self._wbuf:
            with contextlib.suppress(OSError, ssl.SSLError):
                self._sock.send(self._wbuf)
        self._wbuf.clear()
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()


class _PackedProperties(Properties):
    """PUBLISH properties packed once and reused (paho would rebuild and repack
    them for every message; the gateway sends the same few sets over and over)."""

    _packed: bytes

    def __init__(self, user_properties: tuple[tuple[str, str], ...]) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self.UserProperty = list(user_properties)
        object.__setattr__(self, "_packed", super().pack())  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        return self._packed


_PROPERTIES_CACHE: dict[tuple[tuple[str, str], ...], _PackedProperties] = {}


def _publish_properties(user_properties: Sequence[tuple[str, str]]) -> _PackedProperties:
    key = tuple(user_properties)
    props = _PROPERTIES_CACHE.get(key)
    if props is None:
        if len(_PROPERTIES_CACHE) > 4096:  # bounded: transforms lists vary a little
            _PROPERTIES_CACHE.clear()
        props = _PROPERTIES_CACHE[key] = _PackedProperties(key)
    return props


_Pending = tuple[str, bytes, Properties | None, "asyncio.Future[None]"]


class MqttEdge:
    """An MQTT v5 client connection with reconnect, publish futures and manual acks."""

    _READ_BATCH = 256  # packets handled per event-loop wake-up

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
        tls_server_name: str | None = None,
        tls_client_cert: bool = False,
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
        self._tls_context = (tls_context or ssl.create_default_context()) if endpoint.tls else None
        self._tls_server_name = tls_server_name or endpoint.host
        self._tls_client_cert = tls_client_cert
        self._on_state_change = on_state_change
        self.generation = 0
        self.ready = asyncio.Event()  # connected and subscribed
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._publishes: dict[int, asyncio.Future[None]] = {}  # handed to paho, by mid
        self._backlog: deque[_Pending] = deque()  # waiting for room in the in-flight window
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_task: asyncio.Task[None] | None = None
        # The broker's Maximum Packet Size (CONNACK): mosquitto disconnects a
        # client that sends more instead of refusing the one message.
        self.max_packet_size: int | None = None
        self._sock: Any = None
        self._write_scheduled = False
        self._writer_added = False
        self._read_scheduled = False
        self._reading_paused = False  # actual state of the reader
        self._pause_wanted = False  # what the owner asked for; survives a reconnect
        self._accepting = False  # CONNACK received on the current connection
        self._drain_scheduled = False

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
        if self._tls_context is not None:
            # The edge does the handshake itself (_tls_handshake). Set in paho
            # too, so that even paho's own connect path could only speak TLS.
            client.tls_set_context(self._tls_context)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_subscribe  # the same reason codes, by mid
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._socket_register_write
        client.on_socket_unregister_write = self._socket_unregister_write
        self._client = client

    # ------------------------------------------------------------------ public

    def set_tls(self, context: ssl.SSLContext, server_name: str | None, client_cert: bool) -> None:
        """New TLS material (CA, client certificate) for the next connection;
        the current one, if any, is kept."""
        if not self.endpoint.tls:
            raise ValueError(f"{self.name} broker is not mqtts://")
        self._tls_context = context
        self._tls_server_name = server_name or self.endpoint.host
        self._tls_client_cert = client_cert
        self._client._ssl_context = context  # paho's own connect path, were it ever used

    def set_password(self, password: str | None) -> None:
        """Credentials for the next connection (the current one is kept)."""
        if self.endpoint.username:
            self._client.username_pw_set(self.endpoint.username, password)

    @property
    def pending_publishes(self) -> int:
        return len(self._publishes) + len(self._backlog)

    async def run(self) -> None:
        """Connect, and reconnect with jittered exponential backoff, until stop()."""
        backoff = 0.1
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._connect_once()
                backoff = 0.1
                await self._disconnected.wait()
            except TlsHandshakeError as exc:
                log.warning(
                    "%s broker %s TLS handshake failed: %s",
                    self.name,
                    self.endpoint.redacted(),
                    exc,
                    extra={"edge": self.name},
                )
                self._teardown_socket()
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
            delay = reconnect_delay(backoff, random.random())
            backoff = min(backoff * 2, MAX_RECONNECT_DELAY_S)
            await asyncio.sleep(delay)

    async def unsubscribe_all(self, timeout: float = 5.0) -> bool:
        """UNSUBSCRIBE every filter (also from the persistent session: a later
        reconnect subscribes nothing). A member leaving a shared subscription
        this way gets no new messages, and the broker gives them to the other
        members; what it sent already still arrives. False when the broker did
        not confirm in time (not connected: the session keeps the filters)."""
        topics, self.subscriptions = self.subscriptions, []
        if not topics or not self._client.is_connected():
            return not topics
        result, mid = self._client.unsubscribe(topics)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return False
        unsuback: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = unsuback
        try:
            codes = await asyncio.wait_for(unsuback, timeout)
        except TimeoutError:
            return False
        return not any(c.is_failure for c in codes)

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
        reconnect, so the future simply completes later. Beyond the in-flight
        window messages wait here, in order, rather than in paho: paho looks
        for its queued messages with a scan of all of them on every PUBACK.
        """
        props = _publish_properties(user_properties) if user_properties else None
        future: asyncio.Future[None] = self._loop.create_future()
        if (
            not self._accepting
            or self._backlog
            or len(self._publishes) >= self._client._max_inflight_messages
        ):
            # Not connected yet: the broker's packet limit is unknown until its
            # CONNACK, so nothing goes to paho (which would send it unchecked).
            self._backlog.append((topic, payload, props, future))
        elif not self._refuse_if_too_large(topic, payload, props, future):
            self._hand_to_paho(topic, payload, props, future)
        return future

    def _refuse_if_too_large(
        self, topic: str, payload: bytes, props: Properties | None, future: asyncio.Future[None]
    ) -> bool:
        """Fail `future` with 0x95 when the packet exceeds the broker's Maximum
        Packet Size: mosquitto disconnects a client that sends one (again after
        every reconnect) instead of refusing the message."""
        limit = self.max_packet_size
        if limit is None or len(payload) + len(topic) + 64 <= limit:
            return False
        size = publish_packet_size(topic, payload, props)
        if size <= limit:
            return False
        if not future.done():
            future.set_exception(
                PublishRefused(
                    f"packet of {size} bytes exceeds the broker's maximum of {limit}",
                    PACKET_TOO_LARGE,
                )
            )
        return True

    def _hand_to_paho(
        self,
        topic: str,
        payload: bytes,
        props: Properties | None,
        future: asyncio.Future[None],
    ) -> None:
        info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            refusal = PublishRefused(
                f"publish rejected locally: {info.rc!r}", IMPLEMENTATION_SPECIFIC_ERROR
            )
            future.set_exception(refusal)
            return
        self._publishes[info.mid] = future

    def _drain_backlog(self) -> None:
        self._drain_scheduled = False
        if not self._accepting:
            return
        backlog, limit = self._backlog, self._client._max_inflight_messages
        while backlog and len(self._publishes) < limit:
            item = backlog.popleft()
            if not self._refuse_if_too_large(*item):
                self._hand_to_paho(*item)

    def _refuse_held_too_large(self, client: mqtt.Client) -> None:
        """On a (re)connect, before paho resends what it holds: the broker's limit
        may be lower than the previous one's (a restart with a new config)."""
        if self.max_packet_size is None:
            return
        with client._out_message_mutex:
            for mid, message in list(client._out_messages.items()):
                future = self._publishes.get(mid)
                if future is None:
                    continue
                if self._refuse_if_too_large(
                    message.topic, bytes(message.payload), message.properties, future
                ):
                    del client._out_messages[mid]
                    del self._publishes[mid]

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
        if self._tls_context is not None:
            sock = await self._tls_handshake(sock, self._tls_context)
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
        except ConnectionError as exc:
            tls_refusal = self._tls_refusal()
            if tls_refusal is not None:
                # TLS 1.3: the broker checked our certificate after our side of
                # the handshake completed, and said no with an alert.
                raise TlsHandshakeError(tls_refusal) from exc
            raise
        if reason.is_failure:
            raise ConnectionError(f"broker refused connection: {reason}")
        if self.subscriptions:
            # Retain Handling 2: a retained message is never sent at subscribe
            # time. Retained telemetry is old data whose capture-time consent is
            # unknown, and a retained command would replay on every reconnect.
            options = SubscribeOptions(qos=1, noLocal=True, retainHandling=2)
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

    async def _tls_handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS over the connected non-blocking socket, driven by the event
        loop and bounded by the connect timeout. Any failure closes the socket
        and raises TlsHandshakeError: never a fallback to plaintext."""
        try:
            tls = context.wrap_socket(
                sock, server_hostname=self._tls_server_name, do_handshake_on_connect=False
            )
        except (ssl.SSLError, ValueError) as exc:
            sock.close()
            raise TlsHandshakeError(_tls_failure(exc)) from exc
        except BaseException:
            sock.close()
            raise
        try:
            await asyncio.wait_for(self._drive_handshake(tls), self._connect_timeout_s)
        except TimeoutError as exc:
            tls.close()
            raise TlsHandshakeError(
                f"no handshake answer within {self._connect_timeout_s:g} s"
            ) from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            tls.close()
            raise TlsHandshakeError(_tls_failure(exc, self._tls_client_cert)) from exc
        except BaseException:
            tls.close()
            raise
        return tls

    async def _drive_handshake(self, tls: ssl.SSLSocket) -> None:
        loop, fd = self._loop, tls.fileno()
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                wants_read = True
            except ssl.SSLWantWriteError:
                wants_read = False
            ready: asyncio.Future[None] = loop.create_future()
            if wants_read:
                loop.add_reader(fd, _wake, ready)
            else:
                loop.add_writer(fd, _wake, ready)
            try:
                await ready
            finally:
                if wants_read:
                    loop.remove_reader(fd)
                else:
                    loop.remove_writer(fd)

    def _tls_refusal(self) -> str | None:
        """The TLS alert (or reset) that ended the connection, in words, if any."""
        error = self._client.socket_error
        if self._tls_context is None or error is None:
            return None
        return _tls_failure(error, self._tls_client_cert)

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
        packet_max = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet_size = int(packet_max) if packet_max else None
        # paho does not honour the broker's Receive Maximum, and its public
        # setter refuses to run once connected; paho resends queued messages
        # right after this callback, so the limit is in place for them.
        limit = min(self._max_inflight_publishes, int(server_max or 65535))
        client._max_inflight_messages = limit
        if not reason_code.is_failure:
            self._accepting = True
            self._refuse_held_too_large(client)
            if self._pause_wanted and self._sock is not None and not self._reading_paused:
                # The owner paused reading before this reconnect: keep it paused
                # once the CONNACK is read (what follows stays in the socket).
                self._reading_paused = True
                self._loop.remove_reader(self._sock)
            # Bump here, not after the await: the broker redelivers unacked
            # messages right behind CONNACK, often in the same read, and they
            # belong to the new connection.
            self.generation += 1
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason_code)
        # After paho's resend of what it holds (right behind this callback):
        # the new window may have room for waiting messages.
        self._loop.call_soon(self._drain_backlog)

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
        self._accepting = False
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"disconnected: {reason_code}"))
        for future in self._subacks.values():
            if not future.done():
                future.set_exception(ConnectionError("disconnected before SUBACK"))
        self._subacks.clear()
        if getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER:
            # Not a network problem: two processes share an identity and
            # will keep taking the session (and its queued messages) from
            # each other.
            log.error(
                "%s session taken over by another client with id %s: another gateway"
                " instance is using this identity",
                self.name,
                self.client_id,
                extra={"edge": self.name, "client_id": self.client_id},
            )
        elif was_ready and not self._stopping:
            error = self._client.socket_error
            log.warning(
                "%s broker connection lost: %s",
                self.name,
                _tls_failure(error) if error is not None else reason_code,
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
        if self._backlog and not self._drain_scheduled:
            # Not from inside this callback: paho still counts the acked
            # message as in flight until the callback returns.
            self._drain_scheduled = True
            self._loop.call_soon(self._drain_backlog)
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(
                PublishRefused(f"broker refused publish: {reason_code}", reason_code.value)
            )
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

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def pause_reading(self) -> None:
        """Stop taking packets off the socket: TCP back-pressure to the broker,
        which then holds further messages itself. Needed because a broker may
        send beyond our Receive Maximum (mosquitto 2.0 does once acks flow)."""
        self._pause_wanted = True
        if self._reading_paused:
            return
        self._reading_paused = True
        if self._sock is not None:
            self._loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        self._pause_wanted = False
        if not self._reading_paused:
            return
        self._reading_paused = False
        # Nothing was read while paused: paho must not take that for a dead peer.
        self._client._last_bytes_received = time.monotonic()
        if self._sock is not None:
            self._loop.add_reader(self._sock, self._read)
            if not self._read_scheduled:  # bytes may already sit in our buffer
                self._read_scheduled = True
                self._loop.call_soon(self._read_again)

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock = sock
        # A new connection must read its CONNACK; the owner pauses again if needed.
        self._reading_paused = False
        self._loop.add_reader(sock, self._read)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = self._loop.create_task(self._misc_loop())

    def _read(self) -> None:
        # A bounded batch per wake-up, then yield: the decide loop and the
        # writer get their turn even when the broker sends faster than we
        # decide (mosquitto 2.0 overshoots our Receive Maximum once acks
        # flow). Bytes already in our buffer do not make the socket readable
        # again, so a non-empty buffer reschedules the read itself.
        client = self._client
        for _ in range(self._READ_BATCH):
            if self._reading_paused:
                return  # resume_reading() picks up what is buffered
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or not client.read_buffered:
                break
        if self._reading_paused:
            return
        if client.read_buffered and self._sock is not None and not self._read_scheduled:
            self._read_scheduled = True  # at most one pending: reads must not crowd out the rest
            self._loop.call_soon(self._read_again)

    def _read_again(self) -> None:
        self._read_scheduled = False
        if self._sock is not None and not self._reading_paused:
            self._read()

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._write_scheduled = self._writer_added = False
        if self._sock is sock:
            self._sock = None

    def _socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Write once the current callbacks are done (one send() for everything
        # they queued) rather than on an epoll writability round trip: the
        # socket is almost always writable. Only a full socket waits for epoll.
        if not self._write_scheduled and not self._writer_added:
            self._write_scheduled = True
            self._loop.call_soon(self._write)

    def _socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        pass  # _write decides, once the buffer is flushed

    def _write(self) -> None:
        self._write_scheduled = False
        client, sock = self._client, self._sock
        if sock is None:
            return
        client.loop_write()
        done = client.flush()
        if done and self._writer_added:
            self._loop.remove_writer(sock)
            self._writer_added = False
        elif not done and not self._writer_added and self._sock is sock:
            self._loop.add_writer(sock, self._write)
            self._writer_added = True

    def _teardown_socket(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
            self._sock = None
        self._writer_added = False

    async def _misc_loop(self) -> None:
        """Keepalive pings and timeouts, once a second."""
        while True:
            await asyncio.sleep(1.0)
            if self._sock is None:
                if self._stopping:
                    return
                continue
            if self._reading_paused:
                self._keepalive_while_paused()
                continue
            rc = self._client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._stopping:
                return

    def _keepalive_while_paused(self) -> None:
        """While reading is paused (back-pressure) the broker's PINGRESPs stay
        unread in the socket, so paho's keepalive check would drop a healthy
        connection. Keep the broker's side alive with PINGREQs and skip the
        check until reading resumes."""
        client = self._client
        if time.monotonic() - client._last_msg_out >= self._keepalive_s / 2:
            client._send_pingreq()
            client._ping_t = 0  # the answer is read when reading resumes
            client._last_msg_out = time.monotonic()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
