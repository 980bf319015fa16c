"""The gateway's MQTT edge against a real Mosquitto (issue 13, item 4): what
the delivery guarantee rests on, whatever the client underneath. QoS 1
redelivery after a reconnect, persistent sessions, the Receive Maximum the
edge announces, full topic names (no aliases), large packets, keepalive. The
TLS path is here too (large packets, back-pressure); TLS failures are in
tests/test_tls.py and tests/test_broker_mtls.py. The edge's answers to what
a real broker does not send (malformed packets, a resend's DUP flag) are in
tests/test_mqtt_edge_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from gateway.edges.mqtt import BrokerEndpoint, InboundMessage, MqttEdge
from gateway.edges.mqtt_codec import publish_properties
from sim.broker import MosquittoBroker

from .test_tls import CertificateAuthority

pytestmark = pytest.mark.integration


class Inbox:
    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.changed = asyncio.Event()

    def __call__(self, msg: InboundMessage) -> None:
        self.messages.append(msg)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@contextlib.asynccontextmanager
async def edge(
    broker: MosquittoBroker,
    inbox: Inbox,
    *,
    client_id: str = "interop-edge",
    persistent: bool = True,
    receive_maximum: int = 64,
    keepalive_s: int = 30,
    tls_context: ssl.SSLContext | None = None,
    max_inflight_publishes: int = 1024,
) -> AsyncIterator[MqttEdge]:
    e = MqttEdge(
        name="interop",
        endpoint=BrokerEndpoint.parse(broker.url),
        client_id=client_id,
        subscriptions=["in/#"],
        on_message=inbox,
        clean_start=not persistent,
        session_expiry_s=600 if persistent else 0,
        receive_maximum=receive_maximum,
        keepalive_s=keepalive_s,
        tls_context=tls_context,
        max_inflight_publishes=max_inflight_publishes,
    )
    task = asyncio.create_task(e.run())
    try:
        await asyncio.wait_for(e.ready.wait(), 10)
        yield e
    finally:
        await e.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def client(broker: MosquittoBroker, name: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=name, protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        yield c


async def publish(broker: MosquittoBroker, *payloads: bytes) -> None:
    async with client(broker, "interop-publisher") as c:
        for n, payload in enumerate(payloads):
            await c.publish(f"in/{n}", payload, qos=1)


async def test_an_unacknowledged_message_is_redelivered_after_a_reconnect() -> None:
    with MosquittoBroker() as broker:
        first = Inbox()
        async with edge(broker, first):
            await publish(broker, b"m1")
            await first.until(lambda: len(first.messages) == 1)
            # Not acknowledged: the connection ends with it in flight.
        again = Inbox()
        async with edge(broker, again) as e:
            await again.until(lambda: len(again.messages) == 1)
            msg = again.messages[0]
            assert msg.payload == b"m1" and msg.qos == 1
            assert e.ack(msg.mid, msg.qos, msg.generation)
            await asyncio.sleep(0.3)  # the PUBACK reaches the broker
        once_more = Inbox()
        async with edge(broker, once_more):
            await asyncio.sleep(1.0)
            assert once_more.messages == []  # acknowledged: never again


async def test_an_ack_from_an_earlier_connection_is_not_sent() -> None:
    """A packet id of the previous connection may name another message now."""
    with MosquittoBroker() as broker:
        inbox = Inbox()
        async with edge(broker, inbox) as e:
            await publish(broker, b"m1")
            await inbox.until(lambda: len(inbox.messages) == 1)
            old = inbox.messages[0]
            assert not e.ack(old.mid, old.qos, old.generation - 1)


async def test_a_persistent_session_keeps_what_arrives_while_away() -> None:
    with MosquittoBroker() as broker:
        inbox = Inbox()
        async with edge(broker, inbox):
            pass  # subscribed once, then gone
        await publish(broker, *(f"m{n}".encode() for n in range(5)))
        async with edge(broker, inbox) as e:
            await inbox.until(lambda: len(inbox.messages) == 5)
            assert sorted(m.payload for m in inbox.messages) == [f"m{n}".encode() for n in range(5)]
            for m in inbox.messages:
                e.ack(m.mid, m.qos, m.generation)


async def test_the_broker_honours_the_receive_maximum_the_edge_announces() -> None:
    """At most this many unacknowledged QoS 1 messages in flight to the edge:
    what bounds the gateway's memory whatever the broker holds."""
    with MosquittoBroker() as broker:
        inbox = Inbox()
        async with edge(broker, inbox, receive_maximum=4) as e:
            await publish(broker, *(f"m{n}".encode() for n in range(10)))
            await inbox.until(lambda: len(inbox.messages) >= 4)
            await asyncio.sleep(0.5)
            assert len(inbox.messages) == 4  # no more until some are acknowledged
            for m in list(inbox.messages):
                e.ack(m.mid, m.qos, m.generation)
            # Acknowledged: the flow resumes.
            await inbox.until(lambda: len(inbox.messages) >= 10)
            for m in inbox.messages[4:]:
                e.ack(m.mid, m.qos, m.generation)
            await inbox.until(lambda: len(inbox.messages) == 10)
            assert sorted(m.payload for m in inbox.messages) == sorted(
                f"m{n}".encode() for n in range(10)
            )


def test_publish_properties_never_carry_a_topic_alias() -> None:
    """The edge's PUBLISH properties are its user properties and nothing else:
    no Topic Alias (0x23), so every PUBLISH names its topic in full."""
    packed = publish_properties([("recipient", "developer"), ("k", "v")])
    body = packed[1:]  # after the one-byte length (short here)
    assert packed[0] == len(body)
    offset, ids = 0, []
    while offset < len(body):
        ids.append(body[offset])
        offset += 1
        for _ in range(2):  # user property: two UTF-8 strings
            offset += 2 + int.from_bytes(body[offset : offset + 2], "big")
    assert ids == [0x26, 0x26]


async def test_publishes_carry_full_topics_and_large_payloads() -> None:
    """Full topic names, and a 1 MiB payload both ways, unchanged."""
    with MosquittoBroker() as broker:
        inbox = Inbox()
        big = bytes(range(256)) * 4096  # 1 MiB
        async with edge(broker, inbox) as e, client(broker, "interop-receiver") as receiver:
            await receiver.subscribe("out/#", qos=1)
            topics = [f"out/{n}/a/rather/long/topic/name" for n in range(3)]
            for topic in topics:
                await asyncio.wait_for(e.publish(topic, big), 10)
            got: list[tuple[str, bytes, object]] = []
            async with asyncio.timeout(10):
                async for message in receiver.messages:
                    alias = getattr(message.properties, "TopicAlias", None)
                    got.append((message.topic.value, bytes(message.payload), alias))  # type: ignore[arg-type]
                    if len(got) == 3:
                        break
            assert [(t, p) for t, p, _ in got] == [(t, big) for t in topics]
            assert all(alias is None for _, _, alias in got)
            await publish(broker, big)
            await inbox.until(lambda: len(inbox.messages) == 1)
            assert inbox.messages[0].payload == big


async def test_an_idle_connection_is_kept_alive() -> None:
    """Nothing to send for several keepalive periods: the edge pings, the
    broker keeps it (mosquitto drops a client silent for 1.5 periods), and
    the same connection delivers the next message."""
    with MosquittoBroker() as broker:
        inbox = Inbox()
        async with edge(broker, inbox, keepalive_s=1) as e:
            generation = e.generation
            await asyncio.sleep(4.0)
            assert e.generation == generation  # never reconnected
            await publish(broker, b"after the pause")
            await inbox.until(lambda: len(inbox.messages) == 1)
            assert inbox.messages[0].generation == generation


async def test_a_burst_beyond_the_window_arrives_complete_and_in_order() -> None:
    """Ten times more publishes than the edge's window: the rest wait in
    order and all of them arrive, over one connection."""
    with MosquittoBroker() as broker:
        inbox = Inbox()
        async with (
            edge(broker, inbox, max_inflight_publishes=16) as e,
            client(broker, "interop-receiver") as receiver,
        ):
            await receiver.subscribe("out/#", qos=1)
            generation = e.generation
            futures = [e.publish(f"out/{n}", f"m{n}".encode()) for n in range(160)]
            assert e.pending_publishes == 160
            await asyncio.wait_for(asyncio.gather(*futures), 20)
            got: list[str] = []
            async with asyncio.timeout(10):
                async for message in receiver.messages:
                    got.append(message.topic.value)
                    if len(got) == 160:
                        break
            assert got == [f"out/{n}" for n in range(160)]
            assert e.generation == generation and e.pending_publishes == 0


async def test_the_tls_path_carries_large_packets_both_ways(tmp_path: Path) -> None:
    """Over mqtts:// (asyncio's TLS transport): a 1 MiB payload, many TLS
    records, each way; acknowledgement after a pause of reading."""
    ca = CertificateAuthority.create(tmp_path / "ca", "interop CA")
    listener = ca.listener(tmp_path / "broker", ("127.0.0.1",))
    context = ssl.create_default_context(cafile=str(ca.path))
    big = bytes(range(256)) * 4096
    with MosquittoBroker(tls=listener) as broker:
        inbox = Inbox()
        async with (
            edge(broker, inbox, tls_context=context) as e,
            aiomqtt.Client(
                "127.0.0.1",
                broker.port,
                identifier="interop-tls-client",
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=context,
            ) as c,
        ):
            await c.subscribe("out/#", qos=1)
            await asyncio.wait_for(e.publish("out/big", big), 10)
            async with asyncio.timeout(10):
                async for message in c.messages:
                    assert bytes(message.payload) == big  # type: ignore[arg-type]
                    break
            e.pause_reading()
            await c.publish("in/big", big, qos=1)
            await c.publish("in/small", b"s", qos=1)
            await asyncio.sleep(0.3)
            assert inbox.messages == []  # paused: nothing taken off the socket
            e.resume_reading()
            await inbox.until(lambda: len(inbox.messages) == 2)
            assert [m.payload for m in inbox.messages] == [big, b"s"]
            assert all(e.ack(m.mid, m.qos, m.generation) for m in inbox.messages)
