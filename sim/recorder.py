"""The backend's view: record every message on tsp/# and on each recipient's
egress prefix, with its MQTT v5 user properties."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import aiomqtt

from sim.groundtruth import RECORDING_FILE, JsonLinesWriter, b64
from sim.mqtt import ClientFactory, MessageLike, aiomqtt_factory, user_properties


class Recorder:
    """Subscribes (MQTT v5, QoS 1) to the backend topics and appends each message to
    recording.jsonl. Duplicates (QoS 1 redelivery) are recorded as they come."""

    def __init__(
        self,
        broker_url: str,
        out_dir: Path,
        *,
        client_id: str = "tsp-recorder-sim",
        topic_prefixes: tuple[str, ...] = ("tsp",),
        client_factory: ClientFactory = aiomqtt_factory,
    ) -> None:
        """`topic_prefixes`: the backend prefix and every recipient's egress
        prefix (`Policy.prefixes`)."""
        self.client_factory = client_factory
        self.broker_url = broker_url
        self.client_id = client_id
        self.topic_filters = [f"{prefix}/#" for prefix in topic_prefixes]
        self.writer = JsonLinesWriter(out_dir / RECORDING_FILE)
        self.received = 0
        self.received_telemetry = 0  # forwarded vehicle messages (not commands or their results)
        self.received_by_stream: Counter[str] = Counter()
        self.last_message_at = time.monotonic()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recorder")
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait(
            {ready, self._task}, timeout=15, return_when=asyncio.FIRST_COMPLETED
        )
        if self._task in done:
            ready.cancel()
            self._task.result()  # re-raise the connection error
        if not self.ready.is_set():
            ready.cancel()
            raise TimeoutError(f"recorder could not subscribe on {self.broker_url}")

    async def _run(self) -> None:
        async with self.client_factory(self.broker_url, self.client_id, True) as client:
            for topic_filter in self.topic_filters:
                await client.subscribe(topic_filter, qos=1)
            self.ready.set()
            async for message in client.messages:
                self._store(message)

    def _store(self, message: MessageLike) -> None:
        payload = (
            message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        )
        topic = message.topic.value
        self.writer.write(
            {
                "wall": time.time(),
                "topic": topic,
                "payload": b64(payload),
                "props": user_properties(message.properties),
                "qos": message.qos,
                "retain": bool(message.retain),
            }
        )
        self.received += 1
        if "/cmd/" not in topic and "/msg/" not in topic:
            self.received_telemetry += 1
        parts = topic.split("/")
        self.received_by_stream["/".join(parts[2:]) if len(parts) >= 3 else topic] += 1
        self.last_message_at = time.monotonic()

    async def wait_quiet(self, quiet_s: float = 3.0, max_wait_s: float = 60.0) -> None:
        """Return once nothing has arrived for `quiet_s` (the gateway has drained)."""
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            if time.monotonic() - self.last_message_at >= quiet_s:
                return
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        self.writer.close()


async def record_until_cancelled(
    broker_url: str, out_dir: Path, duration_s: float | None, prefixes: tuple[str, ...] = ("tsp",)
) -> int:
    recorder = Recorder(broker_url, out_dir, topic_prefixes=prefixes)
    await recorder.start()
    try:
        if duration_s is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration_s)
    finally:
        await recorder.stop()
    return recorder.received
