"""One MQTT v5 connection, driven by the asyncio event loop (no threads).

The packets are `gateway.edges.mqtt_codec`'s (pure, no I/O); this module
owns the connection: asyncio transports (TLS included), reconnects, the
session's packet ids and in-flight window, publish confirmations and manual
acknowledgements. It knows nothing about privacy.

Why not a general-purpose client: aiomqtt acknowledges a QoS 1 message to the
broker before the application sees it, so a crash loses messages the broker
believes delivered; paho allows manual acknowledgements but builds several
objects per packet and hands every packet through three locks and a generic
callback layer, which cost more CPU than the privacy decision itself
(docs/performance.md). The gateway needs a small subset of MQTT v5, and owning
it keeps the delivery guarantee in code this project tests.
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
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from gateway.edges.mqtt_codec import (
    CONNACK,
    DISCONNECT,
    DUP_FLAG,
    FIXED_FLAGS,
    NO_PROPERTIES,
    PACKET_TOO_LARGE,
    PINGREQ_PACKET,
    PINGRESP,
    PROTOCOL_ERROR,
    PUBLISH,
    SESSION_TAKEN_OVER,
    SUBACK,
    SUBSCRIBE_OPTIONS,
    TOPIC_NAME_INVALID,
    UNSUBACK,
    Connack,
    PacketReader,
    ProtocolError,
    connect_packet,
    decode_connack,
    decode_disconnect,
    decode_puback,
    decode_publish,
    decode_suback,
    disconnect_packet,
    puback_packet,
    publish_header,
    publish_properties,
    publish_size,
    reason_text,
    subscribe_packet,
    unsubscribe_packet,
)

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


# What the broker answered a publish: None (delivered) or why it refused.
PublishDone = Callable[["PublishRefused | None"], None]


class _Pending(NamedTuple):
    """A publish the broker has not acknowledged yet (sent or waiting)."""

    topic: bytes
    properties: bytes  # the encoded property block
    payload: bytes
    on_done: PublishDone


_PROPERTIES_CACHE: dict[tuple[tuple[str, str], ...], bytes] = {}
# The last set seen and its block, by identity: the decision core hands the
# same tuple object for every message of a kind, and hashing a tuple of
# pairs (never cached by Python) costs more than the rest of this function.
# Holding the set keeps its id from being reused.
_last_properties: tuple[object, bytes] = (object(), NO_PROPERTIES)  # matches no set


def cached_publish_properties(user_properties: Sequence[tuple[str, str]]) -> bytes:
    """The property block of a PUBLISH, encoded once per distinct set (the
    gateway sends the same few sets over and over)."""
    global _last_properties
    last, block = _last_properties
    if user_properties is last:
        return block
    key = tuple(user_properties)
    found = _PROPERTIES_CACHE.get(key)
    if found is None:
        if len(_PROPERTIES_CACHE) > 4096:  # bounded: transforms lists vary a little
            _PROPERTIES_CACHE.clear()
        found = _PROPERTIES_CACHE[key] = publish_properties(key)
    if type(user_properties) is tuple:  # immutable: what its identity names cannot change
        _last_properties = (user_properties, found)
    return found


class _Connection(asyncio.Protocol):
    """One transport's events, handed to its edge. A new one per connection:
    a late event of a connection the edge has given up is ignored."""

    def __init__(self, edge: MqttEdge) -> None:
        self.edge = edge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.edge._connection_made(self, transport)

    def data_received(self, data: bytes) -> None:
        edge = self.edge
        if edge._conn is self:
            edge._data_received(data)

    def eof_received(self) -> bool:
        return False  # close: the broker hung up

    def pause_writing(self) -> None:
        if self.edge._conn is self:
            self.edge._pause_writing()

    def resume_writing(self) -> None:
        if self.edge._conn is self:
            self.edge._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge._connection_lost(self, exc)


class MqttEdge:
    """An MQTT v5 client connection with reconnect, publish futures and manual acks.

    The packets are `mqtt_codec`'s; this class owns the session: packet ids,
    the in-flight window (the broker's Receive Maximum and Maximum Packet
    Size honoured), resending what was unacknowledged after a reconnect,
    keepalive, back-pressure, and acknowledging a received message only when
    its owner says so and only on the connection it came over.
    """

    _READ_BATCH = 256  # packets handled per event-loop pass
    _READ_AHEAD = 4 << 20  # bytes of complete packets not yet handled before the socket is paused
    _WRITE_AHEAD = 1 << 20  # publish bytes buffered per event-loop pass; the rest waits in order
    _CLOSE_GRACE_S = 1.0  # for a DISCONNECT of ours to go out before the socket is closed

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
        self._password = endpoint.password
        self._on_state_change = on_state_change
        self.generation = 0
        self.ready = asyncio.Event()  # connected and subscribed
        self._loop = asyncio.get_running_loop()
        self._disconnected = asyncio.Event()
        self._stopping = False
        # The connection: its protocol object, transport, unparsed input and
        # output not yet written.
        self._conn: _Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._reader = PacketReader()
        self._out = bytearray()
        self._flush_scheduled = False
        self._process_scheduled = False
        self._closing = False  # this connection is being closed: ignore what it sends
        self._accepting = False  # CONNACK received on the current connection
        self._connack: asyncio.Future[Connack] | None = None
        self._peer_disconnect: tuple[int, str | None] | None = None
        self._lost_reason: str | None = None
        # Why the connection failed, when it did with an error (a TLS 1.3
        # broker refuses a client certificate after our side of the
        # handshake, so its alert ends the connection here).
        self.socket_error: BaseException | None = None
        # Publishes: sent and unacknowledged (by packet id, in send order),
        # and waiting for room in the window, in order.
        self._inflight: dict[int, _Pending] = {}
        self._backlog: deque[_Pending] = deque()
        self._inflight_limit = max_inflight_publishes
        # SUBSCRIBE/UNSUBSCRIBE waiting for their SUBACK/UNSUBACK, by packet id.
        self._requests: dict[int, asyncio.Future[list[int]]] = {}
        self._next_id = 1
        # The broker's Maximum Packet Size (CONNACK): mosquitto disconnects a
        # client that sends more instead of refusing the one message.
        self.max_packet_size: int | None = None
        self._reading_paused = False  # what the owner asked for; survives a reconnect
        # The connection's SUBACK has been read: from then on the owner's pause
        # stops reading. Before it, messages are read (to reach the SUBACK)
        # and, while paused, held here until resume_reading().
        self._subscribed = False
        self._subscribe_request: asyncio.Future[list[int]] | None = None
        self._held: deque[InboundMessage] = deque()
        self._held_bytes = 0
        self._transport_paused = False
        self._write_progress_at = 0.0  # when the transport's buffer last shrank
        self._write_buffer_seen = 0
        self._writing_paused = False  # the transport's buffer is full: the broker is slow
        self._keepalive_now = keepalive_s  # the broker may set another (CONNACK)
        self._last_in = self._last_out = 0.0
        self._ping_sent: float | None = None

    # ------------------------------------------------------------------ public

    def set_tls(self, context: ssl.SSLContext, server_name: str | None, client_cert: bool) -> None:
        """New TLS material (CA, client certificate) for the next connection;
        the current one, if any, is kept."""
        if not self.endpoint.tls:
            raise ValueError(f"{self.name} broker is not mqtts://")
        self._tls_context = context
        self._tls_server_name = server_name or self.endpoint.host
        self._tls_client_cert = client_cert

    def set_password(self, password: str | None) -> None:
        """Credentials for the next connection (the current one is kept)."""
        if self.endpoint.username:
            self._password = password

    @property
    def pending_publishes(self) -> int:
        return len(self._inflight) + len(self._backlog)

    async def run(self) -> None:
        """Connect, and reconnect with jittered exponential backoff, until stop()."""
        try:
            await self._run()
        finally:  # stopped, or cancelled: never leave a connection behind
            self._abort()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._connect_once()
                backoff = 0.1
                await self._watch()
            except TlsHandshakeError as exc:
                log.warning(
                    "%s broker %s TLS handshake failed: %s",
                    self.name,
                    self.endpoint.redacted(),
                    exc,
                    extra={"edge": self.name},
                )
                self._abort()
            except (OSError, ProtocolError) as exc:  # timeouts, TLS and refusals included
                log.warning(
                    "%s broker %s unreachable: %s",
                    self.name,
                    self.endpoint.redacted(),
                    str(exc) or type(exc).__name__,
                    extra={"edge": self.name},
                )
                self._abort()
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
        if not topics or not self._accepting:
            return not topics
        try:
            codes = await asyncio.wait_for(
                self._request(lambda packet_id: unsubscribe_packet(packet_id, topics)), timeout
            )
        except (TimeoutError, ConnectionError):
            return False
        return len(codes) == len(topics) and not any(code >= 0x80 for code in codes)

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        transport = self._transport
        if transport is not None and not self._closing:
            self._closing = True
            self._write(disconnect_packet())
            self._flush()
            transport.close()  # after what is buffered has gone out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), timeout)
        self._abort()
        self._disconnected.set()

    def publish(
        self,
        topic: str,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> asyncio.Future[None]:
        """QoS 1 publish; the future completes on PUBACK (or fails on a refusal).
        See `publish_then`."""
        future: asyncio.Future[None] = self._loop.create_future()

        def done(refusal: PublishRefused | None) -> None:
            if future.done():
                return
            if refusal is None:
                future.set_result(None)
            else:
                future.set_exception(refusal)

        self.publish_then(topic, payload, user_properties, done)
        return future

    def publish_then(
        self,
        topic: str,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]],
        on_done: PublishDone,
    ) -> None:
        """QoS 1 publish; `on_done(None)` once the broker acknowledged it, or
        `on_done(PublishRefused)` when it refused it (or it cannot be sent).
        Once, never from inside this call; never if the edge is stopped first
        (what it was for stays unacknowledged upstream and is redelivered). A callback rather than a
        future: this is the per-message path, and a future costs a loop
        round trip per message.

        While disconnected, the message is kept and sent again after the
        reconnect, so it simply completes later. Beyond the broker's Receive
        Maximum (and our own window) messages wait here, in order.
        """
        props = cached_publish_properties(user_properties) if user_properties else NO_PROPERTIES
        item = _Pending(topic.encode(), props, payload, on_done)
        if (
            self._accepting
            and not self._backlog
            and len(self._inflight) < self._inflight_limit
            and not self._writing_paused
            and len(self._out) < self._WRITE_AHEAD
        ):
            self._send_publish(item)
        else:
            # Not connected yet: the broker's packet limit is unknown until
            # its CONNACK, so nothing is sent unchecked.
            self._backlog.append(item)

    def ack(self, mid: int, qos: int, generation: int) -> bool:
        """PUBACK a received message, unless it came over an earlier connection
        (the broker redelivers those itself, and the packet id may name
        another message now)."""
        if qos == 0 or generation != self.generation or not self._accepting or self._closing:
            return False
        self._write(puback_packet(mid))
        return True

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def pause_reading(self) -> None:
        """Stop taking packets off the socket: TCP back-pressure to the broker,
        which then holds further messages itself. Needed because a broker may
        send beyond our Receive Maximum (mosquitto 2.0 does once acks flow)."""
        self._reading_paused = True
        self._apply_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        # Nothing was read while paused (the broker's PINGRESPs included):
        # that is not a dead peer.
        self._last_in = time.monotonic()
        self._ping_sent = None
        self._apply_reading()
        self._schedule_process()  # packets may already sit in the reader

    # --------------------------------------------------------------- connect

    async def _connect_once(self) -> None:
        self._disconnected.clear()
        self.ready.clear()
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
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"no TCP connection within {self._connect_timeout_s:g} s") from None
        except BaseException:
            sock.close()
            raise
        if self._stopping:  # stop() ran while we connected
            sock.close()
            raise ConnectionError("stopping")
        conn = self._conn = _Connection(self)
        self._connack = connack = self._loop.create_future()
        self.socket_error = None
        if self._tls_context is not None:
            await self._tls_connect(sock, conn, self._tls_context)
        else:
            await self._loop.create_connection(lambda: conn, sock=sock)
        if self._stopping:
            self._abort()
            raise ConnectionError("stopping")
        try:
            reply = await asyncio.wait_for(connack, self._connect_timeout_s)
        except TimeoutError:
            self._abort()
            raise TimeoutError(f"no CONNACK within {self._connect_timeout_s:g} s") from None
        except ConnectionError as exc:
            tls_refusal = self._tls_refusal()
            if tls_refusal is not None:
                # TLS 1.3: the broker checked our certificate after our side of
                # the handshake completed, and said no with an alert.
                raise TlsHandshakeError(tls_refusal) from exc
            raise
        if not reply.accepted:
            why = reason_text(reply.reason)
            if reply.reason_string:
                why += f": {reply.reason_string}"
            raise ConnectionError(f"broker refused connection: {why}")
        request, topics = self._subscribe_request, list(self.subscriptions)
        if request is not None:  # sent right behind CONNACK, before any resend
            try:
                codes = await asyncio.wait_for(request, self._connect_timeout_s)
            except TimeoutError:
                self._abort()
                raise TimeoutError(f"no SUBACK within {self._connect_timeout_s:g} s") from None
            failed = [reason_text(code) for code in codes if code >= 0x80]
            if failed or len(codes) != len(topics):
                raise ConnectionError(f"subscription refused: {failed or codes}")
        if self._conn is not conn or not self._accepting:
            raise ConnectionError("the connection ended while subscribing")
        self.ready.set()
        self._apply_reading()  # the owner's pause holds from now on (see _handle_packets)
        log.info(
            "%s broker connected: %s",
            self.name,
            self.endpoint.redacted(),
            extra={"edge": self.name, "generation": self.generation},
        )
        if self._on_state_change:
            self._on_state_change(self.name, True)

    async def _tls_connect(
        self, sock: socket.socket, conn: _Connection, context: ssl.SSLContext
    ) -> None:
        """TLS over the connected socket, by the event loop and bounded by the
        connect timeout. Any failure closes the socket and raises
        TlsHandshakeError: never a fallback to plaintext."""
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: conn,
                    sock=sock,
                    ssl=context,
                    server_hostname=self._tls_server_name,
                    ssl_handshake_timeout=self._connect_timeout_s + 5,
                ),
                self._connect_timeout_s,
            )
        except TimeoutError as exc:
            raise TlsHandshakeError(
                f"no handshake answer within {self._connect_timeout_s:g} s"
            ) from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise TlsHandshakeError(_tls_failure(exc, self._tls_client_cert)) from exc

    def _tls_refusal(self) -> str | None:
        """The TLS alert (or reset) that ended the connection, in words, if any."""
        error = self.socket_error
        if self._tls_context is None or not isinstance(error, ssl.SSLError):
            return None  # a plain reset or timeout is not a TLS refusal
        return _tls_failure(error, self._tls_client_cert)

    async def _watch(self) -> None:
        """Keepalive until the connection ends."""
        while not self._disconnected.is_set():
            keepalive = self._keepalive_now
            tick = min(1.0, max(keepalive / 4, 0.05)) if keepalive else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), tick)
            if not self._disconnected.is_set():
                self._keepalive()

    def _keepalive(self) -> None:
        keepalive = self._keepalive_now
        if self._transport is None or self._closing or not keepalive:
            return
        now = time.monotonic()
        if self._writing_paused:
            # Our PINGREQ waits behind data the broker has not read yet: judge
            # it by what it does, PUBACKs arriving (when we read) or our
            # buffer shrinking (a slow but live broker does either).
            size = self._transport.get_write_buffer_size()
            if size < self._write_buffer_seen:
                self._write_progress_at = now
            self._write_buffer_seen = size
            alive_at = self._write_progress_at
            if not (self._reading_paused and self._subscribed):
                alive_at = max(alive_at, self._last_in)
            if now - alive_at >= 2 * keepalive:
                self._close_connection(f"the broker took nothing for {2 * keepalive} s")
            return
        if self._reading_paused and self._subscribed:
            # Back-pressure: the broker's PINGRESPs stay unread in the socket,
            # so there is no answer to wait for. Keep its side alive.
            if now - self._last_out >= keepalive / 2:
                self._write(PINGREQ_PACKET)
                self._flush()
            return
        if self._ping_sent is not None:
            # Dead when nothing at all came back for a keepalive period since
            # the ping: behind megabytes of our publishes the PINGREQ reaches
            # a slow broker late, while its PUBACKs show it is alive.
            if now - max(self._ping_sent, self._last_in) >= keepalive:
                self._close_connection(f"no answer to a keepalive ping within {keepalive} s")
            return
        if now - self._last_out >= keepalive / 2 or now - self._last_in >= keepalive:
            self._write(PINGREQ_PACKET)
            self._flush()
            self._ping_sent = now

    # ------------------------------------------------------ connection events

    def _connection_made(self, conn: _Connection, transport: asyncio.BaseTransport) -> None:
        if conn is not self._conn:
            transport.abort()  # type: ignore[attr-defined]
            return
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._reader = PacketReader()
        self._out = bytearray()
        self._closing = False
        self._transport_paused = False
        self._writing_paused = False
        self._subscribed = False
        self._subscribe_request = None
        self._peer_disconnect = None
        self._lost_reason = None
        self._keepalive_now = self._keepalive_s
        self._last_in = self._last_out = time.monotonic()
        self._ping_sent = None
        username = self.endpoint.username
        self._write(
            connect_packet(
                self.client_id,
                keepalive_s=self._keepalive_s,
                clean_start=self._clean_start,
                session_expiry_s=self._session_expiry_s,
                receive_maximum=self._receive_maximum,
                username=username,
                password=self._password if username else None,
            )
        )
        self._flush()

    def _data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_in = time.monotonic()
        self._reader.feed(data)
        self._process()

    def _schedule_process(self) -> None:
        if not self._process_scheduled and self._transport is not None:
            self._process_scheduled = True
            self._loop.call_soon(self._process_again)

    def _process_again(self) -> None:
        self._process_scheduled = False
        if self._transport is not None and not self._closing:
            self._process()

    def _process(self) -> None:
        """Handle a bounded batch of received packets, then yield: the decide
        loop and the writer get their turn even when the broker sends faster
        than we decide."""
        try:
            self._handle_packets()
        except ProtocolError as exc:
            self._close_connection(f"protocol error: {exc}", exc.code)
            return
        except Exception:
            # The owner's bug, on a message it has not acknowledged: drop the
            # connection so that the broker redelivers it (and what follows).
            log.exception("%s handling a received packet failed", self.name)
            self._close_connection("the received packet could not be handled")
            return
        if self._backlog and self._accepting and len(self._inflight) < self._inflight_limit:
            self._drain_backlog()
        self._apply_reading()

    def _handle_packets(self) -> None:
        reader, on_message, name = self._reader, self._on_message, self.name
        inflight = self._inflight
        # When the bytes were read (one clock read per batch, not per packet):
        # what a shared store's catch-up compares with. Never earlier than
        # their arrival, which is what makes skipping a catch-up safe.
        received = self._last_in
        held = self._held
        while held and not self._reading_paused:
            message = held.popleft()
            self._held_bytes -= len(message.payload)
            on_message(message)
        for _ in range(self._READ_BATCH):
            if self._reading_paused and self._subscribed:
                return  # resume_reading() picks up what is buffered
            packet = reader.next()
            if packet is None:
                return
            first, body = packet
            kind = first >> 4
            if kind == PUBLISH and self._accepting:
                topic, qos, mid, payload = decode_publish(first, body)
                message = InboundMessage(name, topic, payload, qos, mid, self.generation, received)
                if self._reading_paused:  # paused before the SUBACK came: keep it for later
                    self._hold(message)
                else:
                    on_message(message)
            elif first == 0x40 and self._accepting:  # PUBACK
                if len(body) == 2:  # success, the usual short form
                    item = inflight.pop((body[0] << 8) | body[1], None)
                    if item is not None:
                        try:
                            item.on_done(None)
                        except Exception:  # the owner's bug: not this connection's
                            log.exception("%s publish completion failed", name)
                else:
                    self._publish_answered(*decode_puback(body))
            elif first == 0xD0 and not body:  # PINGRESP
                self._ping_sent = None
            else:
                self._handle_control(first, body)
            if self._closing:
                return
        self._schedule_process()  # the batch is used up: the rest on the next pass

    def _hold(self, message: InboundMessage) -> None:
        """A message read while paused, to reach this connection's SUBACK.
        Bounded: beyond the read-ahead the connection is given up (the broker
        keeps the messages and redelivers them)."""
        self._held.append(message)
        self._held_bytes += len(message.payload)
        if self._held_bytes > self._READ_AHEAD:
            self._close_connection("too much arrived before the subscription was confirmed")

    def _handle_control(self, first: int, body: memoryview) -> None:
        kind = first >> 4
        if kind not in FIXED_FLAGS:
            raise ProtocolError(f"unexpected packet type {kind}", PROTOCOL_ERROR)
        if FIXED_FLAGS[kind] != first & 0x0F or (kind == PINGRESP and body):
            raise ProtocolError(f"malformed fixed header 0x{first:02x}")
        if kind == CONNACK:
            if self._accepting:
                raise ProtocolError("second CONNACK", PROTOCOL_ERROR)
            self._connack_received(decode_connack(body))
        elif kind in (SUBACK, UNSUBACK) and self._accepting:
            packet_id, codes = decode_suback(body)
            future = self._requests.pop(packet_id, None)
            if future is not None and future is self._subscribe_request:
                self._subscribed = True  # at once: the owner's pause holds from the next packet
            if future is not None and not future.done():
                future.set_result(codes)
        elif kind == DISCONNECT:
            self._peer_disconnect = decode_disconnect(body)
            self._close_connection(None)
        else:
            raise ProtocolError(f"unexpected packet type {kind}", PROTOCOL_ERROR)

    def _connack_received(self, reply: Connack) -> None:
        if reply.accepted:
            self.max_packet_size = reply.maximum_packet_size
            self._inflight_limit = min(self._max_inflight_publishes, reply.receive_maximum)
            if reply.server_keepalive_s is not None:
                self._keepalive_now = reply.server_keepalive_s
            self._accepting = True
            # Before the packets behind CONNACK (often in the same read): the
            # broker's redeliveries belong to the new connection.
            self.generation += 1
            if self.subscriptions:
                # Ahead of the resends: its SUBACK must not wait for megabytes
                # of them to reach a slow broker.
                topics = list(self.subscriptions)
                self._subscribe_request = self._request(
                    lambda packet_id: subscribe_packet(packet_id, topics, SUBSCRIBE_OPTIONS)
                )
            else:
                self._subscribed = True
            self._resend_inflight()
            self._drain_backlog()
        future = self._connack
        if future is not None and not future.done():
            future.set_result(reply)

    def _resend_inflight(self) -> None:
        """After a reconnect, what was sent and not acknowledged goes again,
        marked DUP, oldest first; beyond the new window it waits at the front
        of the backlog. The broker's limit may be lower than the previous
        one's (a restart with a new config): what no longer fits is refused."""
        held = list(self._inflight.items())
        self._inflight.clear()
        waiting: list[_Pending] = []
        for packet_id, item in held:
            if self._refuse_if_too_large(item):
                continue
            if len(self._inflight) >= self._inflight_limit:
                waiting.append(item)
                continue
            topic, props, payload, _ = item
            self._inflight[packet_id] = item
            header = publish_header(topic, packet_id, props, len(payload))
            self._out += bytes([header[0] | DUP_FLAG])
            self._out += memoryview(header)[1:]
            self._out += payload
        self._backlog.extendleft(reversed(waiting))
        self._schedule_flush()

    def _publish_answered(self, packet_id: int, reason: int) -> None:
        item = self._inflight.pop(packet_id, None)
        if item is None:
            return
        refusal = None
        if reason >= 0x80:
            refusal = PublishRefused(f"broker refused publish: {reason_text(reason)}", reason)
        try:
            item.on_done(refusal)
        except Exception:  # the owner's bug: not this connection's
            log.exception("%s publish completion failed", self.name)

    def _connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        if exc is not None and self.socket_error is None:
            self.socket_error = exc
        self._lost()

    def _lost(self) -> None:
        """The connection is over (closed by either side, or given up)."""
        self._conn = None
        self._transport = None
        self._closing = False
        self._out = bytearray()
        self._reader = PacketReader()
        self._held.clear()  # never handed over, never acknowledged: redelivered
        self._held_bytes = 0
        self._subscribed = False
        was_ready = self.ready.is_set()
        self.ready.clear()
        self._accepting = False
        self._disconnected.set()
        why = self._why_lost()
        future = self._connack
        if future is not None and not future.done():
            future.set_exception(ConnectionError(f"disconnected: {why}"))
        for ack in self._requests.values():
            if not ack.done():
                ack.set_exception(ConnectionError("disconnected before SUBACK"))
        self._requests.clear()
        if self._peer_disconnect is not None and self._peer_disconnect[0] == SESSION_TAKEN_OVER:
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
            log.warning("%s broker connection lost: %s", self.name, why, extra={"edge": self.name})
        if self._on_state_change:
            self._on_state_change(self.name, False)

    def _why_lost(self) -> str:
        if self._peer_disconnect is not None:
            code, text = self._peer_disconnect
            return f"the broker disconnected: {reason_text(code)}" + (f": {text}" if text else "")
        if self._lost_reason is not None:
            return self._lost_reason
        if self.socket_error is not None:
            return _tls_failure(self.socket_error)
        return "the broker closed the connection"

    def _close_connection(self, reason: str | None, code: int | None = None) -> None:
        """End the connection from our side (a DISCONNECT with `code` first, if
        given); `reason` is what the log says."""
        transport = self._transport
        if transport is None or self._closing:
            return
        self._closing = True
        self._lost_reason = reason
        if code is not None:
            self._write(disconnect_packet(code))
            self._flush()
            transport.close()  # once the DISCONNECT is out...
            # ...or at once if the broker is not reading either.
            self._loop.call_later(self._CLOSE_GRACE_S, self._abort_if_current, transport)
        else:
            transport.abort()

    def _abort_if_current(self, transport: asyncio.Transport) -> None:
        if self._transport is transport:
            self._abort()

    def _abort(self) -> None:
        """Give the connection up now (connect failed, or stopping)."""
        transport = self._transport
        if transport is not None:
            transport.abort()
            self._lost()
        self._conn = None
        self.ready.clear()

    # ------------------------------------------------------------------ output

    def _write(self, data: bytes) -> None:
        self._out += data
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Write once the current callbacks are done: one send() for everything
        # they queued.
        if not self._flush_scheduled and self._out:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or not self._out:
            return
        # A new buffer rather than clearing this one: the transport may keep
        # a reference to it until it is sent.
        data, self._out = self._out, bytearray()
        transport.write(data)  # may call pause_writing() at once
        self._last_out = time.monotonic()
        if self._backlog and self._accepting and not self._writing_paused and not self._closing:
            self._drain_backlog()  # what waited for this buffer to go out

    def _request(self, packet: Callable[[int], bytes]) -> asyncio.Future[list[int]]:
        """Send a SUBSCRIBE or UNSUBSCRIBE; the future gets its reason codes."""
        packet_id = self._allocate_id()
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._requests[packet_id] = future
        self._write(packet(packet_id))
        return future

    def _allocate_id(self) -> int:
        for _ in range(0xFFFF):
            packet_id = self._next_id
            self._next_id = 1 if packet_id == 0xFFFF else packet_id + 1
            if packet_id not in self._inflight and packet_id not in self._requests:
                return packet_id
        raise RuntimeError("every packet identifier is in use")

    def _send_publish(self, item: _Pending) -> None:
        topic, props, payload, _ = item
        limit = self.max_packet_size
        if (
            len(topic) > 0xFFFF
            or (limit is not None and len(payload) + len(topic) + len(props) + 9 > limit)
        ) and self._refuse_if_too_large(item):  # (its first checks, inline: the usual case)
            return
        packet_id = self._allocate_id()
        self._inflight[packet_id] = item
        out = self._out
        out += publish_header(topic, packet_id, props, len(payload))
        out += payload
        self._schedule_flush()

    def _refuse_if_too_large(self, item: _Pending) -> bool:
        """Fail the publish with 0x95 when the packet exceeds the broker's
        Maximum Packet Size: mosquitto disconnects a client that sends one
        (again after every reconnect) instead of refusing the message."""
        topic, props, payload, on_done = item
        if len(topic) > 0xFFFF:
            refusal = PublishRefused("topic longer than 65,535 bytes", TOPIC_NAME_INVALID)
            self._loop.call_soon(on_done, refusal)  # never inside publish_then()
            return True
        limit = self.max_packet_size
        if limit is None or len(payload) + len(topic) + len(props) + 9 <= limit:
            return False
        size = publish_size(topic, props, len(payload))
        if size <= limit:
            return False
        refusal = PublishRefused(
            f"packet of {size} bytes exceeds the broker's maximum of {limit}", PACKET_TOO_LARGE
        )
        self._loop.call_soon(on_done, refusal)
        return True

    def _drain_backlog(self) -> None:
        backlog, inflight, limit = self._backlog, self._inflight, self._inflight_limit
        while (
            backlog
            and len(inflight) < limit
            and self._accepting
            and not self._writing_paused
            and len(self._out) < self._WRITE_AHEAD
        ):
            self._send_publish(backlog.popleft())

    # -------------------------------------------------------- back-pressure

    def _apply_reading(self) -> None:
        """Pause the socket while the owner wants no more (TCP back-pressure),
        or while more than _READ_AHEAD bytes wait to be handled; never before
        the CONNACK, which must be read."""
        transport = self._transport
        if transport is None or self._closing:
            return
        paused = self._accepting and (
            (self._reading_paused and self._subscribed)
            # Complete packets waiting for the next pass (an incomplete large
            # one must be read to the end: pausing then would never resume).
            or (self._process_scheduled and self._reader.buffered > self._READ_AHEAD)
        )
        if paused != self._transport_paused:
            self._transport_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: the broker reads
        slower than we write. New publishes wait in the backlog meanwhile."""
        self._writing_paused = True
        self._write_progress_at = time.monotonic()
        self._write_buffer_seen = self._transport.get_write_buffer_size() if self._transport else 0

    def _resume_writing(self) -> None:
        self._writing_paused = False
        if self._ping_sent is not None:
            self._ping_sent = time.monotonic()  # it waited in the buffer until now
        if self._backlog and self._accepting and not self._closing:
            self._drain_backlog()
