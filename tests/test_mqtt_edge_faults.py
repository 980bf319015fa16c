"""The MQTT edge against a scripted broker: what Mosquitto does not do on
demand (withhold acknowledgements across a reconnect, announce a small
Receive Maximum to its clients and check it, send malformed packets, stop
answering pings, take a session over). The script is a real TCP server on
127.0.0.1 that reads the edge's packets with the codec and answers by hand,
so each test sees exactly the bytes the edge sends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.edges import mqtt_codec as codec
from gateway.edges.mqtt import BrokerEndpoint, InboundMessage, MqttEdge
from gateway.edges.mqtt_codec import PacketReader


class Peer:
    """One connection the edge made to the scripted broker."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.packets = PacketReader()

    async def packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next packet the edge sent: (first byte, body)."""
        async with asyncio.timeout(timeout):
            while (packet := self.packets.next()) is None:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the edge closed the connection")
                self.packets.feed(data)
        first, body = packet
        return first, bytes(body)

    async def expect(self, kind: int, timeout: float = 5.0) -> tuple[int, bytes]:
        first, body = await self.packet(timeout)
        assert first >> 4 == kind, (first, body)
        return first, body

    async def nothing_within(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self.packet(seconds)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def handshake(self, connack_properties: bytes = b"\x00") -> list[tuple[int, bytes]]:
        """CONNECT -> CONNACK (session present), SUBSCRIBE -> SUBACK granted.
        Returns what the edge sent between CONNACK and its SUBSCRIBE."""
        await self.expect(codec.CONNECT)
        self.send(b"\x20" + codec.encode_varint(2 + len(connack_properties)) + b"\x01\x00")
        self.send(connack_properties)
        before: list[tuple[int, bytes]] = []
        while (packet := await self.packet())[0] >> 4 != codec.SUBSCRIBE:
            before.append(packet)
        body = packet[1]
        assert body[2:3] == b"\x00"  # no properties
        self.send(b"\x90\x04" + body[:2] + b"\x00\x01")
        return before

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def scripted_broker() -> AsyncIterator[tuple[int, asyncio.Queue[Peer]]]:
    peers: asyncio.Queue[Peer] = asyncio.Queue()
    every: list[Peer] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        every.append(Peer(reader, writer))
        await peers.put(every[-1])

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, peers
    finally:
        server.close()
        for peer in every:
            peer.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def running_edge(
    port: int,
    inbox: list[InboundMessage],
    *,
    keepalive_s: int = 30,
    connect_timeout_s: float = 5.0,
) -> AsyncIterator[MqttEdge]:
    e = MqttEdge(
        name="scripted",
        endpoint=BrokerEndpoint("127.0.0.1", port),
        client_id="scripted-edge",
        subscriptions=["in/#"],
        on_message=inbox.append,
        clean_start=False,
        session_expiry_s=600,
        keepalive_s=keepalive_s,
        connect_timeout_s=connect_timeout_s,
    )
    task = asyncio.create_task(e.run())
    try:
        yield e
    finally:
        await e.stop(timeout=1.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unacknowledged_publishes_are_resent_with_dup_and_their_packet_ids() -> None:
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        first_peer = await peers.get()
        await first_peer.handshake()
        futures = [e.publish("out/a", b"one"), e.publish("out/b", b"two")]
        sent = [await first_peer.expect(codec.PUBLISH) for _ in range(2)]
        assert [first for first, _ in sent] == [0x32, 0x32]  # QoS 1, not DUP
        ids = [codec.decode_publish(*packet)[2] for packet in sent]
        first_peer.close()  # no PUBACK: both still in flight
        peer = await peers.get()
        # The subscription is renewed first (its SUBACK must not wait behind
        # the resends), then the resends follow.
        assert await peer.handshake() == []
        again = [await peer.expect(codec.PUBLISH) for _ in range(2)]
        assert [first for first, _ in again] == [0x3A, 0x3A]  # DUP set
        decoded = [codec.decode_publish(*packet) for packet in again]
        assert [(t, i, p) for t, _, i, p in decoded] == [
            ("out/a", ids[0], b"one"),
            ("out/b", ids[1], b"two"),
        ]
        assert not any(f.done() for f in futures)
        for packet_id in ids:
            peer.send(codec.puback_packet(packet_id))
        await asyncio.wait_for(asyncio.gather(*futures), 5)


async def test_the_brokers_receive_maximum_bounds_what_is_unacknowledged() -> None:
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.handshake(b"\x03\x21\x00\x02")  # Receive Maximum 2
        await asyncio.wait_for(e.ready.wait(), 5)
        futures = [e.publish(f"out/{n}", b"x") for n in range(5)]
        got = [codec.decode_publish(*await peer.expect(codec.PUBLISH)) for _ in range(2)]
        await peer.nothing_within(0.3)  # the third waits for an acknowledgement
        peer.send(codec.puback_packet(got[0][2]))
        got.append(codec.decode_publish(*await peer.expect(codec.PUBLISH)))
        await peer.nothing_within(0.3)
        for _topic, _, packet_id, _ in got[1:]:
            peer.send(codec.puback_packet(packet_id))
        got += [codec.decode_publish(*await peer.expect(codec.PUBLISH)) for _ in range(2)]
        assert [topic for topic, *_ in got] == [f"out/{n}" for n in range(5)]
        for _, _, packet_id, _ in got[3:]:
            peer.send(codec.puback_packet(packet_id))
        await asyncio.wait_for(asyncio.gather(*futures), 5)


async def test_a_refused_publish_fails_its_future_with_the_reason() -> None:
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.handshake()
        future = e.publish("out/denied", b"x")
        packet_id = codec.decode_publish(*await peer.expect(codec.PUBLISH))[2]
        peer.send(b"\x40\x03" + packet_id.to_bytes(2, "big") + b"\x87")
        with pytest.raises(Exception, match=r"Not authorized \(0x87\)") as exc:
            await asyncio.wait_for(future, 5)
        assert getattr(exc.value, "code", None) == 0x87


async def test_a_malformed_packet_ends_the_connection_with_a_reason_and_delivers_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox: list[InboundMessage] = []
    caplog.set_level(logging.WARNING, logger="gateway.mqtt")
    async with scripted_broker() as (port, peers), running_edge(port, inbox) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        peer.send(b"\x36\x06\x00\x01a\x00\x01\x00")  # QoS 3
        peer.send(b"\x32\x06\x00\x01a\x00\x02\x00")  # a valid one behind it
        _first, body = await peer.expect(codec.DISCONNECT)
        assert body == bytes([codec.MALFORMED_PACKET])
        with pytest.raises(EOFError):
            await peer.packet()
        assert inbox == []  # nothing after the bad packet was taken either
        again = await peers.get()  # and it comes back
        await again.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
    lines = [r.getMessage() for r in caplog.records]
    assert any("protocol error: PUBLISH with QoS 3" in line for line in lines), lines


async def test_a_broker_that_stops_answering_pings_is_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.mqtt")
    async with scripted_broker() as (port, peers), running_edge(port, [], keepalive_s=1):
        peer = await peers.get()
        await peer.handshake()
        await peer.expect(codec.PINGREQ, timeout=2)
        # No PINGRESP: within about a keepalive the edge gives the connection up.
        with pytest.raises(EOFError):
            while True:
                await peer.packet(timeout=3)
        again = await peers.get()
        await again.handshake()
        await again.expect(codec.PINGREQ, timeout=2)
        again.send(b"\xd0\x00")  # answered: kept
        await again.expect(codec.PINGREQ, timeout=2)
    lines = [r.getMessage() for r in caplog.records]
    assert any("no answer to a keepalive ping within 1 s" in line for line in lines), lines


async def test_a_session_taken_over_is_named(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.mqtt")
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        peer.send(codec.disconnect_packet(codec.SESSION_TAKEN_OVER))
        await peers.get()  # it reconnects
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("session taken over by another client with id scripted-edge" in m for m in errors)


async def test_an_ack_is_sent_only_on_the_connection_the_message_came_over() -> None:
    inbox: list[InboundMessage] = []
    async with scripted_broker() as (port, peers), running_edge(port, inbox) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        peer.send(b"\x32\x0b\x00\x04in/x\x00\x09\x00ok")
        async with asyncio.timeout(5):
            while not inbox:
                await asyncio.sleep(0.01)
        message = inbox[0]
        assert (message.topic, message.mid, message.payload) == ("in/x", 9, b"ok")
        assert e.ack(message.mid, message.qos, message.generation)
        assert await peer.expect(codec.PUBACK) == (0x40, b"\x00\x09")
        peer.close()
        again = await peers.get()
        await again.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        assert not e.ack(message.mid, message.qos, message.generation)
        await again.nothing_within(0.3)


def _publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    return codec.publish_header(topic.encode(), packet_id, codec.NO_PROPERTIES, len(payload)) + (
        payload
    )


async def test_a_packet_larger_than_the_read_ahead_is_delivered() -> None:
    """A 6 MiB message (more than the edge reads ahead of its owner) arrives
    whole; it is not left half-read with the socket paused."""
    inbox: list[InboundMessage] = []
    big = bytes(range(256)) * (6 * 4096)
    async with scripted_broker() as (port, peers), running_edge(port, inbox) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        peer.send(_publish("in/big", 1, big))
        peer.send(_publish("in/small", 2, b"s"))
        async with asyncio.timeout(10):
            while len(inbox) < 2:
                await asyncio.sleep(0.02)
        assert [(m.topic, m.payload) for m in inbox] == [("in/big", big), ("in/small", b"s")]


async def test_a_reconnect_while_reading_is_paused_becomes_ready() -> None:
    """The owner paused reading (back-pressure) when the connection dropped:
    the new connection still reads its SUBACK and becomes ready, and the
    pause holds for messages once it is."""
    inbox: list[InboundMessage] = []
    async with (
        scripted_broker() as (port, peers),
        # Paused, the socket is not read: the edge notices the broker has gone
        # when its next keepalive ping cannot be written.
        running_edge(port, inbox, connect_timeout_s=1.0, keepalive_s=1) as e,
    ):
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        e.pause_reading()
        peer.close()
        again = await peers.get()
        await again.handshake()
        await asyncio.wait_for(e.ready.wait(), 3)
        generation = e.generation
        again.send(_publish("in/x", 1, b"held"))
        await asyncio.sleep(0.3)
        assert inbox == []  # paused
        e.resume_reading()
        async with asyncio.timeout(5):
            while not inbox:
                await asyncio.sleep(0.01)
        assert inbox[0].payload == b"held" and inbox[0].generation == generation


async def test_a_protocol_error_close_does_not_wait_for_a_broker_that_stopped_reading() -> None:
    """Our DISCONNECT cannot go out (the broker reads nothing and our buffer
    is full): the connection is still given up, and the edge comes back."""
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        for n in range(64):  # several MiB the peer never reads
            e.publish(f"out/{n}", bytes(256 * 1024))
        await asyncio.sleep(0.5)
        peer.send(b"\x36\x06\x00\x01a\x00\x01\x00")  # QoS 3
        again = await asyncio.wait_for(peers.get(), 5)
        await again.expect(codec.CONNECT)


async def test_a_slow_broker_is_not_taken_for_a_dead_one() -> None:
    """More queued than the broker reads for several keepalive periods, while
    it keeps acknowledging: one connection throughout, everything delivered."""
    async with scripted_broker() as (port, peers), running_edge(port, [], keepalive_s=1) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        generation = e.generation
        futures = [e.publish(f"out/{n}", bytes(100_000)) for n in range(60)]
        acked = 0
        async with asyncio.timeout(30):
            while acked < 60:
                first, body = await peer.packet()
                if first >> 4 == codec.PUBLISH:
                    peer.send(codec.puback_packet(codec.decode_publish(first, body)[2]))
                    acked += 1
                    await asyncio.sleep(0.06)  # about 1.6 MB/s: 4 s for all of it
                elif first >> 4 == codec.PINGREQ:
                    peer.send(b"\xd0\x00")
        await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert e.generation == generation


async def test_messages_before_the_suback_wait_while_paused_and_keep_their_order() -> None:
    """Reading was paused when the connection dropped. The new connection
    must read on to its SUBACK, past what the broker sends first: those
    messages are held, not handed over, until reading resumes; then all
    arrive in order, the held ones first."""
    inbox: list[InboundMessage] = []
    async with (
        scripted_broker() as (port, peers),
        running_edge(port, inbox, keepalive_s=1) as e,
    ):
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        e.pause_reading()
        peer.close()
        again = await peers.get()
        await again.expect(codec.CONNECT)
        again.send(b"\x20\x03\x01\x00\x00")  # CONNACK, session present
        again.send(b"".join(_publish("in/before", n, b"b%d" % n) for n in range(1, 51)))
        _, body = await again.expect(codec.SUBSCRIBE)
        again.send(b"\x90\x04" + body[:2] + b"\x00\x01")
        again.send(b"".join(_publish("in/after", n, b"a%d" % n) for n in range(51, 61)))
        await asyncio.wait_for(e.ready.wait(), 5)
        await asyncio.sleep(0.3)
        assert inbox == []  # paused: nothing handed over, before the SUBACK or after
        e.resume_reading()
        async with asyncio.timeout(5):
            while len(inbox) < 60:
                await asyncio.sleep(0.01)
        assert [m.mid for m in inbox] == list(range(1, 61))
        assert {m.generation for m in inbox} == {e.generation}


async def test_ready_is_not_left_set_for_a_connection_that_ended_while_subscribing() -> None:
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.expect(codec.CONNECT)
        peer.send(b"\x20\x03\x00\x00\x00")
        _, body = await peer.expect(codec.SUBSCRIBE)
        # SUBACK and a DISCONNECT (server shutting down) in one write.
        peer.send(b"\x90\x04" + body[:2] + b"\x00\x01" + codec.disconnect_packet(0x8B))
        again = await asyncio.wait_for(peers.get(), 5)  # it comes back...
        assert not e.ready.is_set()  # ...and was never taken for ready meanwhile
        await again.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)


async def test_publishes_to_a_broker_that_reads_nothing_wait_in_order_not_in_buffers() -> None:
    """20 MB published to a broker that has stopped reading: what is handed
    to the socket stays about a megabyte; the rest waits in the backlog, and
    all of it arrives in order once the broker reads again."""
    async with scripted_broker() as (port, peers), running_edge(port, []) as e:
        peer = await peers.get()
        await peer.handshake()
        await asyncio.wait_for(e.ready.wait(), 5)
        futures = [e.publish(f"out/{n}", bytes(200_000)) for n in range(100)]
        await asyncio.sleep(0.5)
        transport = e._transport
        assert transport is not None
        buffered = transport.get_write_buffer_size() + len(e._out)
        assert buffered < 3_000_000, buffered
        assert len(e._backlog) > 50
        got: list[str] = []
        async with asyncio.timeout(20):
            while len(got) < 100:
                first, body = await peer.packet()
                if first >> 4 == codec.PUBLISH:
                    topic, _, packet_id, _ = codec.decode_publish(first, body)
                    got.append(topic)
                    peer.send(codec.puback_packet(packet_id))
        assert got == [f"out/{n}" for n in range(100)]
        await asyncio.wait_for(asyncio.gather(*futures), 5)


async def test_stop_during_a_connect_leaves_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() while the TCP connect is under way: the connect that completes
    afterwards is closed at once, nothing is sent, run() ends."""
    loop = asyncio.get_running_loop()
    real_connect = loop.sock_connect
    connecting, release = asyncio.Event(), asyncio.Event()

    async def held_connect(sock: socket.socket, address: object) -> None:
        connecting.set()
        await release.wait()
        await real_connect(sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "sock_connect", held_connect)
    async with scripted_broker() as (port, peers):
        e = MqttEdge(
            name="scripted",
            endpoint=BrokerEndpoint("127.0.0.1", port),
            client_id="scripted-edge",
            subscriptions=["in/#"],
            on_message=lambda _: None,
            clean_start=True,
        )
        task = asyncio.create_task(e.run())
        await asyncio.wait_for(connecting.wait(), 5)
        stopping = asyncio.create_task(e.stop(timeout=1.0))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(stopping, 5)
        await asyncio.wait_for(task, 5)  # run() returns by itself
        peer = await asyncio.wait_for(peers.get(), 5)  # TCP did connect...
        with pytest.raises(EOFError):
            await peer.packet(timeout=2)  # ...but no CONNECT came, and it is closed
        assert not e.ready.is_set()
