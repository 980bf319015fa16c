"""Shared fixtures: real mosquitto brokers, the real gateway, MQTT test clients."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from google.protobuf.message import Message

from gateway.config import BrokerConfig, GatewayConfig, LimitsConfig, PipelineConfig
from gateway.policy import CompiledPolicy, load_policy
from gateway.service import GatewayService
from gateway.store import ConsentStore, SqliteConsentStore
from gateway.store.postgres import PostgresConsentStore
from sim.broker import MosquittoBroker
from sim.postgres import PrivatePostgres, server_binaries
from telematics.v1 import privacy_pb2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = REPO / "config" / "policy.yaml"
VIN = "WVWZZZ1JZXW000001"
OTHER_VIN = "WVWZZZ1JZXW000002"
BARRIER_VIN = "WVWZZZ1JZXW999999"  # only ever used to order test steps
KEY = bytes(range(32))


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


def gateway_config(
    vehicle_url: str, backend_url: str, state_dir: Path, pipeline: PipelineConfig | None = None
) -> GatewayConfig:
    return GatewayConfig(
        policy=DEFAULT_POLICY,
        state_dir=state_dir,
        vehicle_broker=BrokerConfig(
            url=vehicle_url, client_id="gw-vehicle", topic_prefix="vehicle", keepalive_s=5
        ),
        backend_broker=BrokerConfig(
            url=backend_url,
            client_id="gw-backend",
            topic_prefix="tsp",
            session_expiry_s=0,
            keepalive_s=5,
        ),
        # Tests run in seconds: a clock-skew margin (rule 11) of one second.
        pipeline=pipeline or PipelineConfig(inflight=256, drain_timeout_s=5, capture_skew_s=1),
    )


@dataclass
class GatewayHarness:
    """Starts and stops in-process gateways on one state directory."""

    vehicle_url: str
    backend_url: str
    state_dir: Path
    running: list[GatewayService] = field(default_factory=list)
    pipeline: PipelineConfig | None = None
    limits: LimitsConfig | None = None
    store_url: str | None = None  # a PostgreSQL database instead of the state dir's SQLite

    async def start(self, policy: CompiledPolicy | None = None) -> GatewayService:
        config = gateway_config(self.vehicle_url, self.backend_url, self.state_dir, self.pipeline)
        if self.limits is not None:
            config.limits = self.limits
        history = config.limits.history_per_vehicle
        service = GatewayService(
            config,
            policy or load_policy(DEFAULT_POLICY),
            KEY,
            SqliteConsentStore.in_state_dir(self.state_dir, history)
            if self.store_url is None
            else PostgresConsentStore(self.store_url, history),
        )
        await service.start()
        await asyncio.wait_for(service.ready.wait(), 10)
        self.running.append(service)
        return service

    async def start_unready(self) -> GatewayService:
        """Start without waiting for the brokers (one may be down on purpose)."""
        config = gateway_config(self.vehicle_url, self.backend_url, self.state_dir, self.pipeline)
        store = SqliteConsentStore.in_state_dir(self.state_dir)
        service = GatewayService(config, load_policy(DEFAULT_POLICY), KEY, store)
        await service.start()
        await asyncio.wait_for(service.vehicle_edge.ready.wait(), 10)
        self.running.append(service)
        return service

    async def stop(self, service: GatewayService) -> None:
        self.running.remove(service)
        await service.stop()


@pytest.fixture
async def gateways(broker: MosquittoBroker, tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    harness = GatewayHarness(broker.url, broker.url, tmp_path / "state")
    yield harness
    for service in list(harness.running):
        await harness.stop(service)


class Recorder:
    """Backend-side client: records everything the gateway publishes on tsp/#."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[aiomqtt.Message] = []
        self._changed = asyncio.Event()

    async def run(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the test closes the client
            async for message in self.client.messages:
                self.messages.append(message)
                self._changed.set()

    def topics(self) -> list[str]:
        return [str(m.topic) for m in self.messages]

    def on(self, suffix: str, prefix: str = "") -> list[aiomqtt.Message]:
        """Messages whose topic ends with `suffix` (and starts with `prefix`: one recipient)."""
        return [
            m
            for m in self.messages
            if str(m.topic).endswith(suffix) and str(m.topic).startswith(prefix)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


def user_properties(message: aiomqtt.Message) -> dict[str, str]:
    props = message.properties
    return dict(getattr(props, "UserProperty", [])) if props is not None else {}


class Car:
    """A vehicle-side client publishing real protobuf bytes."""

    _seq = itertools.count(1)
    _barrier_revision = itertools.count(1)

    def __init__(self, client: aiomqtt.Client, recorder: Recorder, vin: str = VIN) -> None:
        self.client = client
        self.recorder = recorder
        self.vin = vin
        self.applied: asyncio.Queue[privacy_pb2.PrivacyApplied] = asyncio.Queue()
        self.commands: list[aiomqtt.Message] = []
        self.barriers: asyncio.Queue[int] = asyncio.Queue()
        # The settings revision the car is under (its last settings sent): a
        # contract v2 car states it in every header (the causal token).
        self.revision = 0
        self._last_ms = 0

    def header(self, msg: Message, vin: str | None = None) -> Message:
        header = msg.header  # type: ignore[attr-defined]
        header.vin = vin or self.vin
        header.seq = next(self._seq)
        # Captured now (on the clock the gateway runs on), strictly increasing.
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        header.timestamp_ms = self._last_ms
        if vin is None or vin == self.vin:
            header.settings_revision = self.revision
        return msg

    async def send(self, relative: str, msg: Message | bytes, vin: str | None = None) -> None:
        payload = msg if isinstance(msg, bytes) else msg.SerializeToString()
        await self.client.publish(f"vehicle/{vin or self.vin}/{relative}", payload, qos=1)

    async def settings(
        self,
        revision: int,
        *,
        features: dict[str, bool] | None = None,
        location: int = 3,
        privacy_mode: bool = False,
        wait: bool = True,
    ) -> None:
        msg = privacy_pb2.PrivacySettings(
            revision=revision,
            location=location,
            privacy_mode=privacy_mode,  # type: ignore[arg-type]
        )
        msg.header.vin = self.vin
        for name, on in (features or {}).items():
            msg.features[name] = on
        self.revision = max(self.revision, revision)
        await self.send("avn/privacy", msg)
        if wait:
            while True:
                applied = await asyncio.wait_for(self.applied.get(), 10)
                if applied.revision == revision:
                    return

    async def subscribe(self) -> None:
        """What the car listens to: its PrivacyApplied, and the test barrier's."""
        await self.client.subscribe(f"vehicle/{self.vin}/avn/privacy/applied", qos=1)
        await self.client.subscribe(f"vehicle/{BARRIER_VIN}/avn/privacy/applied", qos=1)

    async def barrier(self) -> None:
        """Everything published before this on this connection has been decided
        (and what was forwarded is PUBACKed): the ordinary lane keeps arrival
        order, so a settings message of a barrier car sent now is answered only
        after all of them. (eCall is not a barrier: it has its own lane.)"""
        revision = next(self._barrier_revision)
        msg = privacy_pb2.PrivacySettings(revision=revision)
        msg.header.vin = BARRIER_VIN
        await self.send("avn/privacy", msg, vin=BARRIER_VIN)
        while await asyncio.wait_for(self.barriers.get(), 10) != revision:
            pass

    async def run(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                if str(message.topic) == f"vehicle/{BARRIER_VIN}/avn/privacy/applied":
                    applied = privacy_pb2.PrivacyApplied.FromString(message.payload)  # type: ignore[arg-type]
                    self.barriers.put_nowait(applied.revision)
                elif str(message.topic).endswith("/avn/privacy/applied"):
                    self.applied.put_nowait(privacy_pb2.PrivacyApplied.FromString(message.payload))  # type: ignore[arg-type]
                else:
                    self.commands.append(message)


@dataclass
class Clients:
    car: Car
    backend: Recorder
    backend_client: aiomqtt.Client


# The default policy's recipients: the backend prefix and the egress
# prefixes of the map provider and the app providers.
BACKEND_FILTERS = ("tsp/#", "map/#", "apps/#")


async def subscribe_backend(client: aiomqtt.Client) -> None:
    """Subscribe a backend-side client to every recipient of the default policy."""
    for topic in BACKEND_FILTERS:
        await client.subscribe(topic, qos=1)


@pytest.fixture
async def clients(broker: MosquittoBroker) -> AsyncIterator[Clients]:
    async with (
        aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="test-backend", protocol=aiomqtt.ProtocolVersion.V5
        ) as backend_client,
        aiomqtt.Client("127.0.0.1", broker.port, identifier=f"tbox-{VIN}") as car_client,
    ):
        await subscribe_backend(backend_client)
        recorder = Recorder(backend_client)
        car = Car(car_client, recorder)
        await car.subscribe()
        await car_client.subscribe(f"vehicle/{VIN}/cmd/#", qos=1)
        tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
        yield Clients(car, recorder, backend_client)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class GatewayProcess:
    """`python -m gateway run` in a subprocess, its stderr drained by a thread."""

    def __init__(self, vehicle_url: str, backend_url: str, state_dir: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "run",
                "--config",
                str(REPO / "config" / "gateway.toml"),
                "--vehicle-broker",
                vehicle_url,
                "--backend-broker",
                backend_url,
                "--state-dir",
                str(state_dir),
                "--control-listen",
                "127.0.0.1:0",
                *extra,
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            self.kill()
            raise RuntimeError("gateway not ready:\n" + "".join(self.lines))

    def _drain(self) -> None:
        # Reading continuously also keeps a chatty gateway from blocking on a full pipe.
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "gateway ready" in line:
                self._ready.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self._reap(10)

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def _reap(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._thread.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture(scope="session")
def postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server for the session (skipped, saying why, where
    its binaries are not installed: the test command installs them)."""
    if server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (scripts/test.sh installs them)")
    server = PrivatePostgres()
    server.start()
    yield server
    server.stop()


STORE_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=STORE_BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], ConsentStore]:
    """Opens the consent store of one backend; each call is a new connection
    (a reopen, or another instance) to the same data."""
    if request.param == "sqlite":
        path = tmp_path / "state" / SqliteConsentStore.FILENAME
        return lambda: SqliteConsentStore(path)
    url = request.getfixturevalue("postgres").new_database()
    return lambda: PostgresConsentStore(url)
