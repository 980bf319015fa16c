"""Baseline relays, each run as its own process.

`python -m bench.relays naive URL IN_PREFIX OUT_PREFIX`
    An aiomqtt subscriber that awaits each QoS 1 publish in turn: what a
    straightforward asyncio relay looks like (and it acks before processing).

`python -m bench.relays edge URL IN_PREFIX OUT_PREFIX`
    The gateway's own MQTT edge (`MqttEdge`, one connection each way) relaying
    QoS 1 with the gateway's user properties and acknowledging each message
    after the backend's PUBACK, in order, with the gateway's collector
    settings: no decision, no store, no metrics, no decision queue. What any
    design built on this edge and asyncio pays per message before it does
    anything (the floor `bench peers` reports).

`python -m bench.relays noop run --config ... (gateway run arguments)`
    The real gateway process (CLI, GatewayService, MqttEdge pair, AckWindow,
    metrics, logging) with only the decision core replaced by a pass-through:
    every vehicle message is forwarded unchanged to {backend}/{vin}/{stream}
    with user properties of the same shape. The difference to the full
    gateway is the cost of the privacy decision itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.core import DecisionContext, Drop, DropReason, Forward, LocationAnchor, VehicleState
from gateway.core.capture import CaptureHistory
from gateway.core.decide import Decision, split_vehicle_topic

_PROPERTIES = (
    ("policy-version", "noop"),
    ("feature", "noop"),
    ("legal-basis", "contract"),
    ("retention-days", "30"),
    ("transforms", ""),
)


def passthrough_decide(
    ctx: DecisionContext,
    topic: str,
    payload: bytes,
    states: Mapping[str, VehicleState],
    anchors: Mapping[str, LocationAnchor],
    now: float,
    histories: Mapping[str, CaptureHistory] | None = None,
) -> Decision:
    parts = split_vehicle_topic(ctx.vehicle_prefix, topic)
    if parts is None:
        return Drop(DropReason.UNKNOWN_TOPIC, "", detail=topic)
    vin, relative = parts
    return Forward(
        topic=f"{ctx.backend_prefix}/{vin}/{relative}",
        payload=payload,
        user_properties=_PROPERTIES,
        vin=vin,
        stream=relative,
        feature="noop",
        transforms=(),
    )


def run_noop(argv: list[str]) -> int:
    import gateway.service
    from gateway.cli import main

    gateway.service.decide = passthrough_decide  # type: ignore[attr-defined]
    return main(argv)


async def naive_relay(url: str, in_prefix: str, out_prefix: str) -> None:
    import aiomqtt

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    v5 = aiomqtt.ProtocolVersion.V5
    async with (
        aiomqtt.Client(host, port, identifier=f"naive-in-{in_prefix}", protocol=v5) as inbound,
        aiomqtt.Client(host, port, identifier=f"naive-out-{in_prefix}", protocol=v5) as outbound,
    ):
        await inbound.subscribe(f"{in_prefix}/#", qos=1)
        print("relay ready", file=sys.stderr, flush=True)
        cut = len(in_prefix)
        async for message in inbound.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            # One publish at a time: the round trip to PUBACK serialises the relay.
            await outbound.publish(out_prefix + message.topic.value[cut:], payload, qos=1)


async def edge_relay(url: str, in_prefix: str, out_prefix: str) -> None:
    from gateway.cli import tune_garbage_collector
    from gateway.edges.mqtt import BrokerEndpoint, InboundMessage, MqttEdge, PublishRefused

    endpoint = BrokerEndpoint.parse(url)
    cut = len(in_prefix)

    def relay(message: InboundMessage) -> None:
        def done(refusal: PublishRefused | None) -> None:
            # PUBACKs come back in the order sent: acknowledgements stay in order.
            vehicle.ack(message.mid, message.qos, message.generation)

        backend.publish_then(out_prefix + message.topic[cut:], message.payload, _PROPERTIES, done)

    vehicle = MqttEdge(
        name="vehicle",
        endpoint=endpoint,
        client_id=f"edge-relay-in-{in_prefix}",
        subscriptions=[f"{in_prefix}/#"],
        on_message=relay,
        clean_start=True,
    )
    backend = MqttEdge(
        name="backend",
        endpoint=endpoint,
        client_id=f"edge-relay-out-{in_prefix}",
        subscriptions=[],
        on_message=lambda message: None,
        clean_start=True,
    )
    tasks = [asyncio.create_task(vehicle.run()), asyncio.create_task(backend.run())]
    await vehicle.ready.wait()
    await backend.ready.wait()
    tune_garbage_collector()  # as the gateway process runs the edge
    print("relay ready", file=sys.stderr, flush=True)
    await asyncio.gather(*tasks)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "noop":
        return run_noop(argv[1:])
    relays = {"naive": naive_relay, "edge": edge_relay}
    if argv and argv[0] in relays and len(argv) == 4:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relays[argv[0]](argv[1], argv[2], argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main(sys.argv[1:]))
