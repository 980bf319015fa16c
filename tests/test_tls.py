"""TLS toward a broker: the handshake never stalls the event loop, and a
broker whose certificate does not verify is never talked to."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.policy import load_policy
from gateway.service import GatewayService
from gateway.store import SqliteConsentStore
from sim.broker import MosquittoBroker
from telematics.v1 import privacy_pb2

from .conftest import DEFAULT_POLICY, KEY, VIN, gateway_config

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never sends a byte:
    a TLS client waits forever for the ServerHello."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


class ThreadedCar:
    """A car whose MQTT client runs on its own thread, so that what it
    measures does not depend on the gateway's event loop being free."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self._answers: dict[int, threading.Event] = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"tbox-{VIN}"
        )
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.subscribe(f"vehicle/{VIN}/avn/privacy/applied", qos=1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        applied = privacy_pb2.PrivacyApplied.FromString(msg.payload)
        event = self._answers.get(applied.revision)
        if event is not None:
            event.set()

    def settings_round_trip(self, revision: int, timeout: float = 15.0) -> float:
        """Send settings; seconds until the gateway's PrivacyApplied arrived."""
        msg = privacy_pb2.PrivacySettings(revision=revision, location=3)
        msg.header.vin = VIN
        msg.features["remote_control"] = True
        answered = self._answers[revision] = threading.Event()
        started = time.monotonic()
        self._client.publish(f"vehicle/{VIN}/avn/privacy", msg.SerializeToString(), qos=1)
        if not answered.wait(timeout):
            raise TimeoutError(f"no PrivacyApplied for revision {revision}")
        return time.monotonic() - started

    def probe(self, duration: float, every: float = 0.25) -> list[float]:
        """Settings round trips, one after the other, for `duration` seconds."""
        times: list[float] = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            times.append(self.settings_round_trip(len(times) + 1))
            time.sleep(every)
        return times

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def max_loop_lag(duration: float, period: float = 0.02) -> float:
    """The longest the event loop was late waking a sleeping task."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    end = loop.time() + duration
    while loop.time() < end:
        before = loop.time()
        await asyncio.sleep(period)
        worst = max(worst, loop.time() - before - period)
    return worst


async def test_silent_tls_backend_does_not_stall_the_loop_or_the_vehicle_side(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """A backend endpoint that accepts TCP but never answers the TLS handshake
    must not freeze the event loop: the vehicle side keeps answering."""
    car = ThreadedCar(broker)
    try:
        async with silent_listener() as port:
            config = gateway_config(broker.url, f"mqtts://127.0.0.1:{port}", tmp_path / "state")
            service = GatewayService(
                config,
                load_policy(DEFAULT_POLICY),
                KEY,
                SqliteConsentStore.in_state_dir(tmp_path / "state"),
            )
            await service.start()
            try:
                lag = asyncio.create_task(max_loop_lag(6.0))
                await asyncio.wait_for(service.vehicle_edge.ready.wait(), 10)
                # Spread over the backend's connect attempts.
                answers = await asyncio.to_thread(car.probe, 5.0)
                worst_lag = await lag
                assert not service.backend_edge.ready.is_set()
            finally:
                await service.stop()
    finally:
        car.close()
    print(f"max loop lag {worst_lag:.3f} s, PrivacyApplied after {max(answers):.3f} s")
    assert worst_lag < 0.5, f"event loop stalled for {worst_lag:.2f} s"
    assert max(answers) < 1.0, f"PrivacyApplied took {max(answers):.2f} s"
