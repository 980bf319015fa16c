"""Run a scenario against real brokers: cars publish, the backend sends commands,
and every step is written to the ground-truth log with the settings in force."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.clock import TimeMapping
from sim.contract import PASS, decide_command, decide_message
from sim.groundtruth import GROUND_TRUTH_FILE, JsonLinesWriter, b64
from sim.model import (
    OWNERSHIP_CHANGE,
    PURPOSE_FMC_RESPONSE,
    PURPOSE_MALFORMED,
    PURPOSE_SPOOFED,
    CommandEvent,
    MessageEvent,
    OperatorEvent,
    PublishEvent,
    Settings,
    SettingsEvent,
)
from sim.mqtt import ClientFactory, ClientLike, MessageLike, aiomqtt_factory
from sim.policy import Policy
from sim.scenario import Scenario, VehicleScenario, unit_clock_skew_ms
from telematics.v1 import command_pb2, privacy_pb2

APPLIED_TIMEOUT_S = 5.0
RESULT_TIMEOUT_S = 5.0
FORWARD_GRACE_S = (
    0.3  # how long a car listens for a command the gateway refused (should never come)
)
SPOOFED_SEQ_BASE = 900_000


@dataclass
class FleetOptions:
    vehicle_broker: str
    backend_broker: str
    speedup: float
    vehicle_prefix: str = "vehicle"
    backend_prefix: str = "tsp"
    multiplex: int = (
        0  # 0 = two connections per car (tbox-{vin}, avn-{vin}); N = N shared connections
    )
    applied_timeout_s: float = APPLIED_TIMEOUT_S
    result_timeout_s: float = RESULT_TIMEOUT_S
    # Send the settings again when no PrivacyApplied came back within this long (a real
    # car retries; the gateway answers a repeated revision with PrivacyApplied again).
    settings_resend_s: float | None = None
    # The gateway runs on this simulated clock (`run --simulated-clock FILE`): the fleet
    # writes its time mapping there when its clock starts, so both agree on every
    # interval (refresh, find-my-car windows, capture time).
    clock_file: Path | None = None
    # The gateway's control API and a DPO token, for the scenario's operator
    # events (ownership changes, objections); without them those are skipped.
    control_url: str | None = None
    control_token: str | None = None
    # In-process instead (the in-memory reference gateway): (vin, action,
    # feature) -> (HTTP-like status, detail).
    operator: Callable[[str, str, str], Awaitable[tuple[int, str]]] | None = None


@dataclass
class FleetStats:
    """Live counters for the progress display."""

    clients_connected: int = 0
    vehicles_connected: int = 0
    vehicles_done: int = 0
    published: int = 0
    published_by_stream: Counter[str] = field(default_factory=Counter)
    expected_pass: int = 0
    expected_drops: Counter[str] = field(default_factory=Counter)
    settings_sent: int = 0
    settings_timeouts: int = 0
    settings_resent: int = 0
    commands_sent: int = 0
    commands_accepted: int = 0
    commands_refused: int = 0
    command_results_missing: int = 0
    sim_now_ms: int = 0
    lag_s: float = 0.0


class SimClock:
    """Simulated time runs `speedup` times faster than wall-clock time."""

    def __init__(self, sim_start_ms: int, speedup: float, clock_file: Path | None = None) -> None:
        self.sim_start_ms = sim_start_ms
        self.speedup = speedup
        self.clock_file = clock_file
        self.wall_start = time.time()

    @property
    def mapping(self) -> TimeMapping:
        return TimeMapping(self.sim_start_ms, self.wall_start, self.speedup)

    def start(self) -> None:
        self.wall_start = time.time()
        if self.clock_file is not None:
            self.mapping.write(self.clock_file)

    def wall_for(self, t_ms: int) -> float:
        return self.wall_start + (t_ms - self.sim_start_ms) / 1000.0 / self.speedup

    def now_ms(self) -> int:
        return self.sim_start_ms + int((time.time() - self.wall_start) * self.speedup * 1000)

    async def sleep_until(self, t_ms: int) -> float:
        """Sleep until the wall time of `t_ms`; returns how late we are (seconds)."""
        delay = self.wall_for(t_ms) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
            return 0.0
        return -delay


class VehicleState:
    """What one simulated car knows at run time."""

    def __init__(self, scenario: VehicleScenario) -> None:
        self.scenario = scenario
        self.vin = scenario.vin
        self.seq: Counter[str] = Counter()
        self.spoofed_seq = SPOOFED_SEQ_BASE
        self.settings_by_revision: dict[int, Settings] = {}
        self.applied_revision: int | None = None
        self.published_revision: int | None = None
        self.applied_changed = asyncio.Event()
        self.forwarded_commands: dict[str, asyncio.Future[float]] = {}
        self.last_window_open_wall: float | None = None
        # (sim time, revision) of every settings change the car made, in order:
        # the revision a record was captured under (the causal token it states).
        self.revisions: list[tuple[int, int]] = []

    def revision_at(self, t_ms: int) -> int:
        """The settings revision the car was under at sim time `t_ms` (0: none yet)."""
        revision = 0
        for changed_ms, changed_to in self.revisions:
            if changed_ms > t_ms:
                break
            revision = changed_to
        return revision

    def next_seq(self, unit: str) -> int:
        self.seq[unit] += 1
        return self.seq[unit]

    @property
    def settings_in_force(self) -> Settings | None:
        if self.applied_revision is None:
            return None
        return self.settings_by_revision.get(self.applied_revision)

    @property
    def pending_revision(self) -> int | None:
        """A published revision the gateway has not confirmed yet (after a timeout)."""
        if self.published_revision is None:
            return None
        if self.applied_revision is None or self.published_revision > self.applied_revision:
            return self.published_revision
        return None


class Fleet:
    def __init__(
        self,
        scenario: Scenario,
        policy: Policy,
        options: FleetOptions,
        out_dir: Path,
        client_factory: ClientFactory = aiomqtt_factory,
    ) -> None:
        self.client_factory = client_factory
        self.scenario = scenario
        self.policy = policy
        self.options = options
        self.clock = SimClock(scenario.sim_start_ms, options.speedup, options.clock_file)
        self.stats = FleetStats(sim_now_ms=scenario.sim_start_ms)
        self.truth = JsonLinesWriter(out_dir / GROUND_TRUTH_FILE)
        self.vehicles = {vehicle.vin: VehicleState(vehicle) for vehicle in scenario.vehicles}
        self.tbox_clients: dict[str, ClientLike] = {}
        self.avn_clients: dict[str, ClientLike] = {}
        self.backend: ClientLike | None = None
        self.pending_results: dict[
            str, asyncio.Future[tuple[command_pb2.CommandResult, float]]
        ] = {}
        self._readers: list[asyncio.Task[None]] = []

    # --- ground truth ---------------------------------------------------------
    def write_header(self, extra: dict[str, Any]) -> None:
        self.truth.write(
            {
                "type": "meta",
                "seed": self.scenario.seed,
                "vehicles": len(self.scenario.vehicles),
                "sim_start_ms": self.scenario.sim_start_ms,
                "duration_ms": self.scenario.duration_ms,
                "speedup": self.options.speedup,
                "gateway_clock": "wall" if self.options.clock_file is None else "simulated",
                "policy_version": self.policy.version,
                "vehicle_prefix": self.options.vehicle_prefix,
                "backend_prefix": self.options.backend_prefix,
                **extra,
            }
        )
        for vehicle in self.scenario.vehicles:
            profile = vehicle.profile
            self.truth.write(
                {
                    "type": "vehicle",
                    "vin": vehicle.vin,
                    "index": profile.index,
                    "home": [profile.home.point.lat, profile.home.point.lon],
                    "work": [profile.work.point.lat, profile.work.point.lon],
                    "settings_start": profile.settings_start,
                }
            )
            # The true route, thinned to one point per 30 s of driving, for the report.
            last_t = -(10**15)
            for sample in vehicle.trajectory.samples:
                if sample.t_ms - last_t >= 30_000 or sample.speed_kmh == 0:
                    self.truth.write(
                        {
                            "type": "trace",
                            "vin": vehicle.vin,
                            "ts_ms": sample.t_ms,
                            "lat": sample.point.lat,
                            "lon": sample.point.lon,
                            "speed_kmh": round(sample.speed_kmh, 1),
                        }
                    )
                    last_t = sample.t_ms

    # --- connections ----------------------------------------------------------
    async def connect(self, stack: contextlib.AsyncExitStack) -> None:
        options = self.options
        backend: ClientLike = await stack.enter_async_context(
            self.client_factory(options.backend_broker, "tsp-backend-sim", True)
        )
        self.backend = backend
        await backend.subscribe(f"{options.backend_prefix}/+/cmd/+/result", qos=1)
        await backend.subscribe(f"{options.backend_prefix}/+/msg/+/result", qos=1)
        self._readers.append(asyncio.create_task(self._read(backend, self._on_backend_message)))
        self.stats.clients_connected += 1
        semaphore = asyncio.Semaphore(64)  # don't SYN-flood the broker with hundreds of connects

        async def open_client(client_id: str, mqtt5: bool, vins: list[str]) -> ClientLike:
            async with semaphore:
                client: ClientLike = await stack.enter_async_context(
                    self.client_factory(options.vehicle_broker, client_id, mqtt5)
                )
                topics = []
                for vin in vins:
                    topics.append((f"{options.vehicle_prefix}/{vin}/cmd/#", 1))
                    topics.append((f"{options.vehicle_prefix}/{vin}/avn/privacy/applied", 1))
                    topics.append((f"{options.vehicle_prefix}/{vin}/avn/msg/+", 1))
                for start in range(0, len(topics), 200):
                    await client.subscribe(topics[start : start + 200])
                self._readers.append(
                    asyncio.create_task(self._read(client, self._on_vehicle_message))
                )
                self.stats.clients_connected += 1
                return client

        vins = list(self.vehicles)
        if options.multiplex > 0:
            groups = [vins[n :: options.multiplex] for n in range(options.multiplex)]
            clients = await asyncio.gather(
                *(
                    open_client(f"sim-mux-{n}", True, group)
                    for n, group in enumerate(groups)
                    if group
                )
            )
            for client, group in zip(clients, [g for g in groups if g], strict=True):
                for vin in group:
                    self.tbox_clients[vin] = client
                    self.avn_clients[vin] = client
            self.stats.vehicles_connected = len(vins)
        else:

            async def open_vehicle(vin: str) -> None:
                # TBOX speaks MQTT 3.1.1, the AVN MQTT 5: the gateway must accept both.
                self.tbox_clients[vin] = await open_client(f"tbox-{vin}", False, [vin])
                self.avn_clients[vin] = await open_client(f"avn-{vin}", True, [vin])
                self.stats.vehicles_connected += 1

            await asyncio.gather(*(open_vehicle(vin) for vin in vins))

    async def _read(self, client: ClientLike, handler: Callable[[MessageLike], None]) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                handler(message)

    def _on_vehicle_message(self, message: MessageLike) -> None:
        parts = message.topic.value.split("/")
        if len(parts) < 3 or parts[1] not in self.vehicles:
            return
        vehicle = self.vehicles[parts[1]]
        payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
        now = time.time()
        if parts[2:] == ["avn", "privacy", "applied"]:
            applied = privacy_pb2.PrivacyApplied()
            try:
                applied.ParseFromString(payload)
            except Exception:
                self.truth.write(
                    {
                        "type": "applied_invalid",
                        "vin": vehicle.vin,
                        "wall": now,
                        "payload": b64(payload),
                    }
                )
                return
            self.truth.write(
                {
                    "type": "applied",
                    "vin": vehicle.vin,
                    "revision": applied.revision,
                    "ack_vin": applied.vin,
                    "policy_version": applied.policy_version,
                    "wall": now,
                }
            )
            if applied.reprompt:
                # "Show the privacy screen again" (a new owner): confirms nothing.
                return
            if vehicle.applied_revision is None or applied.revision > vehicle.applied_revision:
                vehicle.applied_revision = applied.revision
            vehicle.applied_changed.set()
        elif parts[2:4] == ["avn", "msg"] and len(parts) == 5:
            command = command_pb2.Command()
            with contextlib.suppress(Exception):
                command.ParseFromString(payload)
            self.truth.write(
                {
                    "type": "message_received",
                    "vin": vehicle.vin,
                    "category": parts[4],
                    "request_id": command.request_id,
                    "wall": now,
                }
            )
        elif len(parts) >= 4 and parts[2] == "cmd":
            command = command_pb2.Command()
            with contextlib.suppress(Exception):
                command.ParseFromString(payload)
            self.truth.write(
                {
                    "type": "command_received",
                    "vin": vehicle.vin,
                    "command": parts[3],
                    "request_id": command.request_id,
                    "wall": now,
                }
            )
            waiter = vehicle.forwarded_commands.get(command.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)

    def _on_backend_message(self, message: MessageLike) -> None:
        result = command_pb2.CommandResult()
        try:
            result.ParseFromString(
                bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            )
        except Exception:
            return
        parts = message.topic.value.split("/")
        if len(parts) == 5 and parts[2] == "msg":
            self.truth.write(
                {
                    "type": "message_result",
                    "vin": parts[1],
                    "category": parts[3],
                    "request_id": result.request_id,
                    "accepted": result.accepted,
                    "reason": result.reason,
                    "wall": time.time(),
                }
            )
            return
        waiter = self.pending_results.get(result.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result((result, time.time()))

    # --- running ----------------------------------------------------------------
    async def play(
        self, meta: dict[str, Any], on_connected: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Connect every car, play the scenario to the end, disconnect."""
        self.write_header(meta)
        async with contextlib.AsyncExitStack() as stack:
            await self.connect(stack)
            if on_connected is not None:
                await on_connected()
            try:
                await self.run()
            finally:
                await self.close()

    async def run(self) -> None:
        self.clock.start()
        self.truth.write({"type": "start", "wall": self.clock.wall_start})
        tasks = [
            asyncio.create_task(self._run_vehicle(vehicle)) for vehicle in self.vehicles.values()
        ]
        ticker = asyncio.create_task(self._tick())
        try:
            await asyncio.gather(*tasks)
        finally:
            ticker.cancel()
            for task in tasks:
                task.cancel()
            self.truth.write({"type": "end", "wall": time.time()})
            self.truth.flush()

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
        self.truth.close()

    async def _tick(self) -> None:
        while True:
            self.stats.sim_now_ms = min(self.clock.now_ms(), self.scenario.sim_end_ms)
            await asyncio.sleep(0.25)

    async def _run_vehicle(self, vehicle: VehicleState) -> None:
        for event in vehicle.scenario.events:
            lag = await self.clock.sleep_until(event.t_ms)
            self.stats.lag_s = max(self.stats.lag_s * 0.99, lag)
            if isinstance(event, SettingsEvent):
                await self._send_settings(vehicle, event)
            elif isinstance(event, PublishEvent):
                await self._publish(vehicle, event)
            elif isinstance(event, CommandEvent):
                await self._command(vehicle, event)
            elif isinstance(event, MessageEvent):
                await self._message(vehicle, event)
            elif isinstance(event, OperatorEvent):
                await self._operator(vehicle, event)
        self.stats.vehicles_done += 1

    async def _message(self, vehicle: VehicleState, event: MessageEvent) -> None:
        """The backend sends a message-centre message; the car records what reaches it."""
        assert self.backend is not None
        command = command_pb2.Command(
            request_id=event.request_id, command=event.category, issued_at_ms=event.t_ms
        )
        wall_sent = time.time()
        topic = f"{self.options.backend_prefix}/{vehicle.vin}/msg/{event.category}"
        await self.backend.publish(topic, command.SerializeToString(deterministic=True), qos=1)
        self.truth.write(
            {
                "type": "message_sent",
                "vin": vehicle.vin,
                "category": event.category,
                "request_id": event.request_id,
                "applied_rev": vehicle.applied_revision,
                "pending_rev": vehicle.pending_revision,
                "wall_sent": wall_sent,
            }
        )

    async def _control_api(self, vin: str, event: OperatorEvent) -> tuple[int, str]:
        import aiohttp

        options = self.options
        base = f"{options.control_url}/v1/vehicles/{vin}"
        url = (
            f"{base}/ownership-change"
            if event.action == OWNERSHIP_CHANGE
            else f"{base}/objections/{event.feature}"
        )
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url,
                    headers={"Authorization": f"Bearer {options.control_token}"},
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as response,
            ):
                return response.status, (await response.text())[:500]
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, str(exc)

    async def _operator(self, vehicle: VehicleState, event: OperatorEvent) -> None:
        """A DPO's action through the control API. Nothing else leaves this car
        meanwhile; after an ownership change the car is unknown to the gateway
        until the new owner's settings are applied, and they are sent at once."""
        options = self.options
        wall_start = time.time()
        if options.operator is not None:
            status, body = await options.operator(vehicle.vin, event.action, event.feature)
        elif options.control_url is not None and options.control_token is not None:
            status, body = await self._control_api(vehicle.vin, event)
        else:
            self.truth.write(
                {"type": "operator_skipped", "vin": vehicle.vin, "action": event.action}
            )
            return
        done = status == 200
        if done and event.action == OWNERSHIP_CHANGE:
            vehicle.applied_revision = None
            vehicle.published_revision = None
        self.truth.write(
            {
                "type": "operator",
                "vin": vehicle.vin,
                "action": event.action,
                "feature": event.feature,
                "t_ms": event.t_ms,
                "wall_start": wall_start,
                "wall_end": time.time(),
                "status": status,
                "detail": "" if done else body,
            }
        )
        if done and event.new_settings is not None:
            await self._send_settings(vehicle, SettingsEvent(event.t_ms, event.new_settings))

    def _window_open(self, vehicle: VehicleState) -> bool:
        opened = vehicle.last_window_open_wall
        return opened is not None and time.time() - opened < self._gateway_seconds(
            self.policy.find_my_car_window_s
        )

    def _gateway_seconds(self, seconds: float) -> float:
        """Wall seconds of a span on the gateway's clock."""
        return seconds if self.options.clock_file is None else seconds / self.options.speedup

    async def _publish(
        self, vehicle: VehicleState, event: PublishEvent, *, timestamp_ms: int | None = None
    ) -> None:
        unit = event.unit
        client = self.tbox_clients[vehicle.vin] if unit == "tbox" else self.avn_clients[vehicle.vin]
        header_vin = event.header_vin or vehicle.vin
        header_ts_ms = 0
        # The revision the car was under when it captured the record (rule 12).
        capture_rev = (
            vehicle.revision_at(event.captured_ms)
            if event.captured_ms is not None
            else vehicle.revision_at(event.t_ms)
        )
        if event.purpose == PURPOSE_MALFORMED:
            seq = 0
            payload = event.raw_payload or b""
        else:
            assert event.message is not None
            message = type(event.message)()
            message.CopyFrom(event.message)
            if event.purpose == PURPOSE_SPOOFED:
                vehicle.spoofed_seq += 1
                seq = vehicle.spoofed_seq
            else:
                seq = vehicle.next_seq(unit)
            header = message.header  # type: ignore[attr-defined]
            header.vin = header_vin
            header.seq = seq
            captured_ms = self._capture_ms(event, timestamp_ms)
            header_ts_ms = captured_ms + unit_clock_skew_ms(vehicle.vin, unit)
            header.timestamp_ms = header_ts_ms
            header.settings_revision = capture_rev
            payload = message.SerializeToString(deterministic=True)
        topic = f"{self.options.vehicle_prefix}/{vehicle.vin}/{event.stream}"
        settings = vehicle.settings_in_force
        prediction = decide_message(self.policy, event.stream, settings, self._window_open(vehicle))
        captured_under = vehicle.settings_by_revision.get(capture_rev)
        if prediction == PASS and capture_rev and captured_under is not None:
            # Consent at capture time (rule 11): allowed then and now.
            prediction = decide_message(self.policy, event.stream, captured_under, True)
        if event.purpose in (PURPOSE_MALFORMED, PURPOSE_SPOOFED):
            prediction = event.purpose
        wall_start = time.time()
        error = ""
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            error = str(exc)
        wall_end = time.time()
        self.truth.write(
            {
                "type": "publish",
                "vin": vehicle.vin,
                "unit": unit,
                "stream": event.stream,
                "topic": topic,
                "purpose": event.purpose,
                "payload": b64(payload),
                "seq": seq,
                "ts_ms": self._capture_ms(event, timestamp_ms),
                "header_ts_ms": header_ts_ms,  # what the unit's (skewed) clock stamped
                "capture_rev": capture_rev,
                "uploaded_late": event.captured_ms is not None,
                "header_vin": header_vin,
                "nonce": event.nonce,
                "applied_rev": vehicle.applied_revision,
                "pending_rev": vehicle.pending_revision,
                "wall_start": wall_start,
                "wall_end": wall_end,
                "error": error,
            }
        )
        self.stats.published += 1
        self.stats.published_by_stream[event.stream] += 1
        if prediction == PASS:
            self.stats.expected_pass += 1
        else:
            self.stats.expected_drops[prediction] += 1

    @staticmethod
    def _capture_ms(event: PublishEvent, timestamp_ms: int | None) -> int:
        if timestamp_ms is not None:
            return timestamp_ms
        return event.captured_ms if event.captured_ms is not None else event.t_ms

    async def _send_settings(self, vehicle: VehicleState, event: SettingsEvent) -> None:
        topic = f"{self.options.vehicle_prefix}/{vehicle.vin}/avn/privacy"
        sent: list[tuple[Settings, int, float]] = []
        payload = b""
        for settings in (*event.flood, event.settings):
            vehicle.settings_by_revision[settings.revision] = settings
            vehicle.revisions.append((event.t_ms, settings.revision))
            message = settings.to_proto(vehicle.vin, vehicle.next_seq("avn"), event.t_ms)
            payload = message.SerializeToString(deterministic=True)
            wall_sent = time.time()
            vehicle.applied_changed.clear()
            await self.avn_clients[vehicle.vin].publish(topic, payload, qos=1)
            vehicle.published_revision = settings.revision
            self.stats.settings_sent += 1
            sent.append((settings, message.header.seq, wall_sent))
        # Nothing else leaves this car until the gateway confirms the new settings:
        # the TBOX and the AVN are separate connections and could otherwise race.
        revision = event.settings.revision
        deadline = time.monotonic() + self.options.applied_timeout_s
        resend = self.options.settings_resend_s
        while True:
            wait = deadline - time.monotonic()
            if resend is not None:
                wait = min(wait, resend)
            applied = await self._wait_applied(vehicle, revision, max(wait, 0.0))
            if applied or time.monotonic() >= deadline:
                break
            await self.avn_clients[vehicle.vin].publish(topic, payload, qos=1)
            self.stats.settings_resent += 1
        if not applied:
            self.stats.settings_timeouts += 1
        wall_applied = time.time() if applied else None
        for settings, seq, wall_sent in sent:
            # A flood's earlier revisions were applied (in order) before the last one.
            self.truth.write(
                {
                    "type": "settings",
                    "vin": vehicle.vin,
                    "ts_ms": event.t_ms,
                    "seq": seq,
                    "settings": settings.to_json(),
                    "wall_sent": wall_sent,
                    "applied": applied,
                    "wall_applied": wall_applied,
                }
            )

    async def _wait_applied(self, vehicle: VehicleState, revision: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while vehicle.applied_revision is None or vehicle.applied_revision < revision:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            vehicle.applied_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vehicle.applied_changed.wait(), remaining)
        return True

    async def _command(self, vehicle: VehicleState, event: CommandEvent) -> None:
        assert self.backend is not None
        loop = asyncio.get_running_loop()
        command = command_pb2.Command(
            request_id=event.request_id,
            command=event.command,
            issued_at_ms=event.t_ms,
            args=event.args,
        )
        result_waiter: asyncio.Future[tuple[command_pb2.CommandResult, float]] = (
            loop.create_future()
        )
        forward_waiter: asyncio.Future[float] = loop.create_future()
        self.pending_results[event.request_id] = result_waiter
        vehicle.forwarded_commands[event.request_id] = forward_waiter
        prediction = decide_command(self.policy, event.command, vehicle.settings_in_force)
        applied_rev, pending_rev = vehicle.applied_revision, vehicle.pending_revision
        wall_sent = time.time()
        topic = f"{self.options.backend_prefix}/{vehicle.vin}/cmd/{event.command}"
        await self.backend.publish(topic, command.SerializeToString(deterministic=True), qos=1)
        self.stats.commands_sent += 1
        result: command_pb2.CommandResult | None = None
        wall_result: float | None = None
        with contextlib.suppress(TimeoutError):
            result, wall_result = await asyncio.wait_for(
                result_waiter, self.options.result_timeout_s
            )
        wall_forwarded: float | None = None
        grace = (
            self.options.result_timeout_s
            if result is not None and result.accepted
            else FORWARD_GRACE_S
        )
        with contextlib.suppress(TimeoutError):
            wall_forwarded = await asyncio.wait_for(forward_waiter, grace)
        self.pending_results.pop(event.request_id, None)
        vehicle.forwarded_commands.pop(event.request_id, None)
        if result is None:
            self.stats.command_results_missing += 1
        elif result.accepted:
            self.stats.commands_accepted += 1
        else:
            self.stats.commands_refused += 1
        self.truth.write(
            {
                "type": "command",
                "vin": vehicle.vin,
                "command": event.command,
                "request_id": event.request_id,
                "ts_ms": event.t_ms,
                "applied_rev": applied_rev,
                "pending_rev": pending_rev,
                "predicted": prediction,
                "wall_sent": wall_sent,
                "result": None
                if result is None
                else {
                    "accepted": result.accepted,
                    "reason": result.reason,
                    "command": result.command,
                },
                "wall_result": wall_result,
                "wall_forwarded": wall_forwarded,
            }
        )
        if event.command == "find_my_car" and wall_forwarded is not None:
            # The gateway opened a window when it forwarded the command.
            vehicle.last_window_open_wall = min(wall_forwarded, wall_result or wall_forwarded)
            if event.response is not None:
                response = PublishEvent(
                    event.t_ms + 3_000,
                    "tbox",
                    "tbox/location",
                    event.response,
                    purpose=PURPOSE_FMC_RESPONSE,
                )
                await self._publish(vehicle, response)
