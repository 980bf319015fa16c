"""The real gateway between real mosquitto brokers, driven by real MQTT clients."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import PipelineConfig
from gateway.edges.mqtt import InboundMessage
from gateway.policy import load_policy
from gateway.store import SqliteConsentStore
from sim.broker import MosquittoBroker
from telematics.v1 import command_pb2, common_pb2, streams_pb2

from .conftest import (
    BARRIER_VIN,
    DEFAULT_POLICY,
    OTHER_VIN,
    VIN,
    Car,
    Clients,
    GatewayHarness,
    GatewayProcess,
    Recorder,
    subscribe_backend,
    user_properties,
)

pytestmark = pytest.mark.integration

ALL_FEATURES = {
    "remote_control": True,
    "find_my_car": True,
    "charging": True,
    "energy_consumption": True,
    "digital_key": True,
    "online_navigation": True,
    "online_search": True,
    "voice_recognition": True,
    "third_party.music": True,
}


def status(car: Car, lat: float = 48.137154, lon: float = 11.576124) -> streams_pb2.VehicleStatus:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0)
    msg.position.CopyFrom(
        common_pb2.GeoPoint(
            latitude=lat, longitude=lon, altitude_m=520, speed_kmh=42, heading_deg=90
        )
    )
    car.header(msg)
    return msg


def nav(car: Car) -> streams_pb2.NavRequest:
    msg = streams_pb2.NavRequest(route_id="r1")
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    msg.destination.latitude, msg.destination.longitude = 48.2, 11.6
    car.header(msg)
    return msg


def seqs(messages: list[aiomqtt.Message], cls: type) -> list[int]:
    return [cls.FromString(m.payload).header.seq for m in messages]


async def test_unknown_vehicle_only_ecall_passes(
    gateways: GatewayHarness, clients: Clients
) -> None:
    await gateways.start()
    car = clients.car
    await car.send("tbox/status", status(car))
    await car.send("avn/nav", nav(car))
    loc = car.header(streams_pb2.Location())
    await car.send("tbox/location", loc)
    app = car.header(streams_pb2.AppTraffic(app_id="music", payload=b"x"))
    await car.send("avn/app/music", app)
    await car.send("tbox/ecall", car.header(streams_pb2.ECall()))
    await car.barrier()
    await clients.backend.wait_for(lambda: bool(clients.backend.on("/tbox/ecall")))
    assert [t.split("/", 2)[2] for t in clients.backend.topics()] == ["tbox/ecall"]
    ecall = clients.backend.messages[0]
    assert user_properties(ecall)["legal-basis"] == "legal_obligation"


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        (common_pb2.LOCATION_OFF, "absent"),
        (common_pb2.LOCATION_APPROXIMATE, "coarse"),
        (common_pb2.LOCATION_PRECISE, "exact"),
    ],
)
async def test_location_modes(
    gateways: GatewayHarness, clients: Clients, mode: int, expect: str
) -> None:
    await gateways.start()
    car = clients.car
    await car.settings(1, features=ALL_FEATURES, location=mode)
    sent = status(car)
    await car.send("tbox/status", sent)
    await car.send("avn/nav", nav(car))
    await car.barrier()
    statuses = clients.backend.on("/tbox/status")
    assert len(statuses) == 1
    got = streams_pb2.VehicleStatus.FromString(statuses[0].payload)  # type: ignore[arg-type]
    props = user_properties(statuses[0])
    assert props["policy-version"] == load_policy(DEFAULT_POLICY).version
    assert props["feature"] == "remote_control" and props["retention-days"] == "30"
    navs = clients.backend.on("/avn/nav")
    if expect == "absent":
        assert not got.HasField("position")
        assert props["transforms"] == "clear:position"
        assert navs == []  # location is nav's purpose
    elif expect == "coarse":
        assert got.position.latitude != sent.position.latitude
        # Within a cell: half a cell of secret shift plus half of snapping.
        assert abs(got.position.latitude - sent.position.latitude) <= 2000 / 111_320 + 1e-9
        assert got.position.speed_kmh == 0 and got.position.altitude_m == 0
        assert got.position.horizontal_accuracy_m == 2000
        assert props["transforms"] == "coarsen:position"
        assert len(navs) == 2  # the backend and the map provider (test_recipients.py)
    else:
        assert got.position == sent.position
        assert props["transforms"] == ""


async def test_feature_switched_off_mid_stream_leaks_nothing_after(
    gateways: GatewayHarness, clients: Clients
) -> None:
    await gateways.start()
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    before = [status(car) for _ in range(20)]
    for msg in before:
        await car.send("tbox/status", msg)
    await car.settings(2, features={"remote_control": False})
    after = [status(car) for _ in range(20)]
    for msg in after:
        await car.send("tbox/status", msg)
    await car.barrier()
    got = seqs(clients.backend.on("/tbox/status"), streams_pb2.VehicleStatus)
    assert sorted(set(got)) == [m.header.seq for m in before]


async def test_privacy_mode_passes_only_ecall_and_refuses_commands(
    gateways: GatewayHarness, clients: Clients
) -> None:
    await gateways.start()
    car = clients.car
    await car.settings(1, features=ALL_FEATURES, privacy_mode=True)
    await car.send("tbox/status", status(car))
    await car.send("avn/nav", nav(car))
    cmd = command_pb2.Command(request_id="r-1", command="lock")
    await clients.backend_client.publish(f"tsp/{VIN}/cmd/lock", cmd.SerializeToString(), qos=1)
    await clients.backend.wait_for(lambda: bool(clients.backend.on("/cmd/lock/result")))
    await car.barrier()
    topics = [t.split("/", 2)[2] for t in clients.backend.topics()]
    assert "tbox/status" not in topics and "avn/nav" not in topics
    result = command_pb2.CommandResult.FromString(clients.backend.on("/cmd/lock/result")[0].payload)  # type: ignore[arg-type]
    assert (result.request_id, result.accepted, result.reason) == ("r-1", False, "privacy_mode")
    assert car.commands == []


async def test_spoofed_vin_and_malformed_payloads_are_dropped_and_gateway_keeps_going(
    gateways: GatewayHarness, clients: Clients
) -> None:
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    spoofed = status(car)
    spoofed.header.vin = OTHER_VIN
    await car.send("tbox/status", spoofed)
    await car.send("tbox/status", b"\xff\xff\xff\x0f garbage")
    await car.send("tbox/unknown_stream", b"")
    good = status(car)
    await car.send("tbox/status", good)
    await car.barrier()
    got = seqs(clients.backend.on("/tbox/status"), streams_pb2.VehicleStatus)
    assert got == [good.header.seq]
    m = service.metrics
    assert (
        m.value("gateway_messages_dropped_total", stream="tbox/status", reason="vin_mismatch") == 1
    )
    assert (
        m.value("gateway_messages_dropped_total", stream="tbox/status", reason="undecodable") == 1
    )
    assert m.value("gateway_messages_dropped_total", stream="", reason="unknown_topic") == 1


async def test_position_without_fix_is_cleared_and_message_still_forwarded(
    gateways: GatewayHarness, clients: Clients
) -> None:
    service = await gateways.start()
    car = clients.car
    features = {"remote_control": True}
    await car.settings(1, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    no_fix = status(car, lat=math.nan, lon=math.nan)
    await car.send("tbox/status", no_fix)
    await car.settings(2, features=features, location=common_pb2.LOCATION_PRECISE)
    out_of_range = status(car, lat=48.1, lon=math.inf)
    await car.send("tbox/status", out_of_range)
    await car.barrier()

    got = clients.backend.on("/tbox/status")
    assert seqs(got, streams_pb2.VehicleStatus) == [no_fix.header.seq, out_of_range.header.seq]
    for message in got:
        out = streams_pb2.VehicleStatus.FromString(message.payload)  # type: ignore[arg-type]
        assert not out.HasField("position")
        assert out.fuel_level_pct == 50.0
        assert user_properties(message)["transforms"] == "invalid_position:position"
    m = service.metrics
    assert m.value("gateway_internal_errors_total") == 0
    assert m.value("gateway_transforms_total", transform="invalid_position:position") == 2
    assert VIN not in service.anchors


async def test_stale_revision_is_ignored(gateways: GatewayHarness, clients: Clients) -> None:
    service = await gateways.start()
    car = clients.car
    await car.settings(5, features={"remote_control": False})
    await car.settings(4, features={"remote_control": True}, wait=False)
    await car.send("tbox/status", status(car))
    await car.barrier()
    assert clients.backend.on("/tbox/status") == []
    assert service.states[VIN].revision == 5
    assert (
        service.metrics.value(
            "gateway_messages_dropped_total", stream="avn/privacy", reason="stale_revision"
        )
        == 1
    )


async def test_find_my_car_allowed_refused_and_window_expiry(
    gateways: GatewayHarness, clients: Clients
) -> None:
    policy = load_policy(DEFAULT_POLICY)
    short = dataclasses.replace(policy, window_s=1.0)
    await gateways.start(short)
    car, backend = clients.car, clients.backend

    async def find(request_id: str) -> command_pb2.CommandResult:
        cmd = command_pb2.Command(request_id=request_id, command="find_my_car")
        await clients.backend_client.publish(
            f"tsp/{VIN}/cmd/find_my_car", cmd.SerializeToString(), qos=1
        )

        def answered() -> bool:
            return any(
                command_pb2.CommandResult.FromString(m.payload).request_id == request_id  # type: ignore[arg-type]
                for m in backend.on("/cmd/find_my_car/result")
            )

        await backend.wait_for(answered)
        return next(
            r
            for m in backend.on("/cmd/find_my_car/result")
            if (r := command_pb2.CommandResult.FromString(m.payload)).request_id == request_id  # type: ignore[arg-type]
        )

    def location() -> streams_pb2.Location:
        msg = streams_pb2.Location()
        msg.position.latitude, msg.position.longitude = 48.1, 11.5
        return car.header(msg)  # type: ignore[return-value]

    # Feature off: refused, nothing reaches the car, location outside a window dropped.
    await car.settings(1, features={"find_my_car": False}, location=common_pb2.LOCATION_PRECISE)
    refused = await find("f-1")
    assert (refused.accepted, refused.reason) == (False, "feature_disabled:find_my_car")
    outside = location()
    await car.send("tbox/location", outside)

    # Feature on: accepted, forwarded to the car, location passes inside the window.
    await car.settings(2, features={"find_my_car": True}, location=common_pb2.LOCATION_PRECISE)
    accepted = await find("f-2")
    assert (accepted.accepted, accepted.reason) == (True, "forwarded")
    assert [str(m.topic) for m in car.commands] == [f"vehicle/{VIN}/cmd/find_my_car"]
    inside = location()
    await car.send("tbox/location", inside)
    await car.barrier()
    await asyncio.sleep(1.2)  # the 1 s window closes
    late = location()
    await car.send("tbox/location", late)
    await car.barrier()
    got = seqs(backend.on("/tbox/location"), streams_pb2.Location)
    assert got == [inside.header.seq]


async def test_third_party_app_is_pseudonymized_with_no_vin_in_any_byte(
    gateways: GatewayHarness, clients: Clients
) -> None:
    await gateways.start()
    car = clients.car
    await car.settings(1, features={"third_party.music": True, "third_party.weather": False})
    music = car.header(
        streams_pb2.AppTraffic(app_id="music", content_type="json", payload=b'{"track":1}')
    )
    weather = car.header(streams_pb2.AppTraffic(app_id="weather", payload=b"{}"))
    leaky = car.header(streams_pb2.AppTraffic(app_id="music", payload=b"vin=" + VIN.encode()))
    await car.send("avn/app/music", music)
    await car.send("avn/app/weather", weather)
    await car.send("avn/app/music", leaky)
    await car.barrier()
    apps = [m for m in clients.backend.messages if "/avn/app/" in str(m.topic)]
    assert len(apps) == 1
    message = apps[0]
    everything = (
        str(message.topic).encode()
        + bytes(message.payload)
        + repr(user_properties(message)).encode()
    )  # type: ignore[arg-type]
    assert VIN.encode() not in everything
    assert str(message.topic).endswith("/avn/app/music")
    ref = str(message.topic).split("/")[1]
    assert len(ref) == 32 and streams_pb2.AppTraffic.FromString(message.payload).header.vin == ref  # type: ignore[arg-type]
    assert user_properties(message)["feature"] == "third_party.music"


async def test_settings_survive_restart(gateways: GatewayHarness, clients: Clients) -> None:
    first = await gateways.start()
    car = clients.car
    await car.settings(3, features={"remote_control": True, "online_navigation": False})
    await gateways.stop(first)
    second = await gateways.start()
    # Loaded under the car's subject (the store never holds the VIN) until
    # the car shows up.
    assert VIN not in second.states and second.states[second.audit_subject(VIN)].revision == 3
    # The control plane reads it without moving it (it runs outside the decision loop).
    state = second.state_of(VIN)
    assert state is not None and state.revision == 3 and VIN not in second.states
    second.claim(VIN)
    assert second.states[VIN].revision == 3 and second.audit_subject(VIN) not in second.states
    await car.send("avn/nav", nav(car))
    kept = status(car)
    await car.send("tbox/status", kept)
    await car.barrier()
    assert clients.backend.on("/avn/nav") == []
    assert seqs(clients.backend.on("/tbox/status"), streams_pb2.VehicleStatus) == [kept.header.seq]


def _backend_session(broker: MosquittoBroker) -> aiomqtt.Client:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier="durable-backend",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
    )


async def test_backend_broker_outage_loses_nothing(tmp_path: Path) -> None:
    """Vehicle messages received while the backend broker is down are held
    (unacknowledged) and delivered once it is back."""
    with MosquittoBroker() as vehicle_broker:
        backend_broker = MosquittoBroker(persistence=True).start()
        try:
            harness = GatewayHarness(vehicle_broker.url, backend_broker.url, tmp_path / "state")
            await harness.start()
            # The backend's own session must outlive the outage, as a real one would.
            async with _backend_session(backend_broker) as backend_client:
                await subscribe_backend(backend_client)
            async with (
                aiomqtt.Client(
                    "127.0.0.1", vehicle_broker.port, identifier=f"tbox-{VIN}"
                ) as car_client,
            ):
                car = Car(car_client, Recorder(car_client))
                await car.subscribe()
                car_task = asyncio.create_task(car.run())
                await car.settings(1, features={"remote_control": True})
                backend_broker.stop_keep_state()
                sent = [status(car) for _ in range(30)]
                for msg in sent:
                    await car.send("tbox/status", msg)
                await asyncio.sleep(0.5)
                backend_broker.start()
                async with _backend_session(backend_broker) as backend_client:
                    recorder = Recorder(backend_client)
                    rec_task = asyncio.create_task(recorder.run())
                    want = {m.header.seq for m in sent}

                    def all_arrived() -> bool:
                        return want <= set(
                            seqs(recorder.on("/tbox/status"), streams_pb2.VehicleStatus)
                        )

                    await recorder.wait_for(all_arrived, timeout=30)
                    rec_task.cancel()
                car_task.cancel()
            for service in list(harness.running):
                await harness.stop(service)
        finally:
            backend_broker.stop()


async def test_kill_9_mid_stream_then_restart_delivers_everything_and_keeps_settings(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = GatewayProcess(broker.url, broker.url, state)
    try:
        async with (
            aiomqtt.Client(
                "127.0.0.1",
                broker.port,
                identifier="kill-backend",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as backend_client,
            aiomqtt.Client("127.0.0.1", broker.port, identifier=f"tbox-{VIN}") as car_client,
        ):
            await subscribe_backend(backend_client)
            recorder = Recorder(backend_client)
            car = Car(car_client, recorder)
            await car.subscribe()
            tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
            await car.settings(1, features={"remote_control": True, "online_navigation": False})
            allowed: list[int] = []
            forbidden: list[int] = []
            for i in range(400):
                if i % 4 == 3:
                    msg = nav(car)
                    forbidden.append(msg.header.seq)
                    await car.send("avn/nav", msg)
                else:
                    smsg = status(car)
                    allowed.append(smsg.header.seq)
                    await car.send("tbox/status", smsg)
                if i == 150:
                    proc.kill()
            # Restart on the same state directory: the broker kept the session queue.
            proc = GatewayProcess(broker.url, broker.url, state)
            await car.barrier()

            def all_allowed() -> bool:
                return set(allowed) <= set(
                    seqs(recorder.on("/tbox/status"), streams_pb2.VehicleStatus)
                )

            try:
                await recorder.wait_for(all_allowed, timeout=30)
            except TimeoutError as exc:
                got = set(seqs(recorder.on("/tbox/status"), streams_pb2.VehicleStatus))
                missing = sorted(set(allowed) - got)
                raise AssertionError(
                    f"missing {len(missing)}: {missing[:20]}\n" + "".join(proc.lines[-30:])
                ) from exc
            assert recorder.on("/avn/nav") == []
            # The settings are still enforced after the restart.
            late_nav = nav(car)
            await car.send("avn/nav", late_nav)
            await car.barrier()
            assert recorder.on("/avn/nav") == []
            for task in tasks:
                task.cancel()
    finally:
        assert proc.terminate() == 0


def test_sigterm_exits_cleanly(broker: MosquittoBroker, tmp_path: Path) -> None:
    proc = GatewayProcess(broker.url, broker.url, tmp_path / "state")
    started = time.monotonic()
    assert proc.terminate() == 0
    assert time.monotonic() - started < 15
    assert any("gateway stopped" in line for line in proc.lines)


async def test_vehicle_broker_restart_gateway_reconnects_and_loses_nothing(tmp_path: Path) -> None:
    """The vehicle-side broker restarts (sessions persisted): the gateway
    reconnects with backoff and receives what was queued for it meanwhile."""
    vehicle_broker = MosquittoBroker(persistence=True).start()
    try:
        with MosquittoBroker() as backend_broker:
            harness = GatewayHarness(vehicle_broker.url, backend_broker.url, tmp_path / "state")
            service = await harness.start()
            async with aiomqtt.Client(
                "127.0.0.1",
                backend_broker.port,
                identifier="backend",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as backend_client:
                await subscribe_backend(backend_client)
                recorder = Recorder(backend_client)
                rec_task = asyncio.create_task(recorder.run())
                async with aiomqtt.Client("127.0.0.1", vehicle_broker.port, identifier="avn") as c:
                    car = Car(c, recorder)
                    await car.subscribe()
                    task = asyncio.create_task(car.run())
                    await car.settings(1, features={"remote_control": True})
                    task.cancel()
                vehicle_broker.stop_keep_state()
                await asyncio.sleep(0.3)
                vehicle_broker.start()
                async with aiomqtt.Client("127.0.0.1", vehicle_broker.port, identifier="tbox") as c:
                    car = Car(c, recorder)
                    sent = [status(car) for _ in range(20)]
                    for msg in sent:  # likely before the gateway is back: queued for its session
                        await car.send("tbox/status", msg)
                    want = {m.header.seq for m in sent}

                    def arrived() -> bool:
                        got = set(seqs(recorder.on("/tbox/status"), streams_pb2.VehicleStatus))
                        return want <= got

                    await recorder.wait_for(arrived, timeout=30)
                assert service.vehicle_edge.ready.is_set()
                assert service.metrics.value("gateway_broker_connected", edge="vehicle") == 1
                rec_task.cancel()
            for running in list(harness.running):
                await harness.stop(running)
    finally:
        vehicle_broker.stop()


async def test_slow_decisions_pause_reading_bounding_the_queue_without_loss(
    broker: MosquittoBroker, tmp_path: Path, clients: Clients
) -> None:
    """Back-pressure does not rely on the broker honouring Receive Maximum:
    past the high-water mark the gateway stops reading the vehicle socket."""
    from gateway.policy import load_policy as load
    from gateway.service import GatewayService
    from gateway.store import SqliteConsentStore

    from .conftest import KEY, gateway_config

    config = gateway_config(broker.url, broker.url, tmp_path / "state")
    config.pipeline.inflight = 16
    service = GatewayService(
        config, load(DEFAULT_POLICY), KEY, SqliteConsentStore.in_state_dir(config.state_dir)
    )
    deepest = 0
    paused = 0
    original_enqueue = service._enqueue_vehicle_message
    original_handle = service._handle_vehicle_message

    def enqueue(msg: InboundMessage) -> None:
        nonlocal deepest, paused
        original_enqueue(msg)
        deepest = max(deepest, service._queue.qsize())
        paused += service.vehicle_edge.reading_paused

    async def slow_handle(msg: InboundMessage, slot: object) -> None:
        await asyncio.sleep(0.002)  # a decision loop slower than the car
        await original_handle(msg, slot)  # type: ignore[arg-type]

    service._enqueue_vehicle_message = enqueue  # type: ignore[method-assign]
    service._handle_vehicle_message = slow_handle  # type: ignore[method-assign]
    await service.start()
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        car = clients.car
        await car.settings(1, features={"remote_control": True})
        sent = [status(car) for _ in range(300)]
        await asyncio.gather(*(car.send("tbox/status", m) for m in sent))
        want = {m.header.seq for m in sent}
        await clients.backend.wait_for(
            lambda: (
                want <= set(seqs(clients.backend.on("/tbox/status"), streams_pb2.VehicleStatus))
            ),
            timeout=30,
        )
        assert deepest <= config.pipeline.inflight + 1
        assert paused > 0  # the high-water mark was reached and reading paused
    finally:
        await service.stop()


async def test_location_anchor_survives_restart(gateways: GatewayHarness, clients: Clients) -> None:
    """Contract rule 13: a restart cannot be used to force a refresh of the
    approximate value; the anchor is durable, written with the message's ack."""
    first = await gateways.start()
    car = clients.car
    await car.settings(
        1, features={"remote_control": True}, location=common_pb2.LOCATION_APPROXIMATE
    )
    home = status(car)
    await car.send("tbox/status", home)
    await car.barrier()
    anchor = first.anchors[VIN]
    await gateways.stop(first)

    second = await gateways.start()
    assert second.anchors[second.audit_subject(VIN)] == anchor
    second.claim(VIN)
    assert second.anchors[VIN] == anchor
    away = status(car, lat=48.237154, lon=11.676124)  # 13 km away, a second later
    away.header.timestamp_ms = 0  # and no car timestamp to go by
    await car.send("tbox/status", away)
    await car.barrier()
    got = [
        streams_pb2.VehicleStatus.FromString(m.payload).position  # type: ignore[arg-type]
        for m in clients.backend.on("/tbox/status")
    ]
    assert len(got) == 2
    assert {(p.latitude, p.longitude) for p in got} == {(anchor.latitude, anchor.longitude)}
    assert second.anchors[VIN] == anchor


async def test_the_store_never_holds_a_vin(gateways: GatewayHarness, clients: Clients) -> None:
    """Issue 10 / rule 16: cars are keyed by a keyed hash of the VIN in every
    table, the audit content names none, and after real traffic (settings,
    positions with anchors, counts, a restriction, a restart) no byte of the
    database, its WAL or shared memory holds the VIN."""
    # A short capture-skew margin: data captured near a restriction is dropped.
    gateways.pipeline = PipelineConfig(inflight=256, drain_timeout_s=5, capture_skew_s=0.2)
    service = await gateways.start()
    car = clients.car
    await car.settings(
        1,
        features={"remote_control": True, "online_navigation": True},
        location=common_pb2.LOCATION_APPROXIMATE,
    )
    await car.send("tbox/status", status(car))
    await car.send("avn/nav", nav(car))
    await car.barrier()
    await service.set_restriction(VIN, True, "dpo")
    await service.set_restriction(VIN, False, "dpo")
    await asyncio.sleep(0.3)
    await car.send("tbox/status", status(car))
    await car.barrier()
    assert len(clients.backend.on("/tbox/status")) == 2
    await service.accounting.flush()
    files = sorted(gateways.state_dir.glob(SqliteConsentStore.FILENAME + "*"))
    assert len(files) >= 2  # database and WAL, while running
    for file in files:
        data = file.read_bytes()
        for vin in (VIN, BARRIER_VIN):
            assert vin.encode() not in data and vin.lower().encode() not in data, file.name
    subject = service.audit_subject(VIN)
    cars = {v.snapshot.vin for v in service.store.load_all()}
    assert cars == {subject, service.audit_subject(BARRIER_VIN)}
    assert service.store.history(subject) and service.store.egress_counts(subject)
    assert dict(service.store.load_anchors()).keys() == {subject}
    await gateways.stop(service)
    second = await gateways.start()
    await car.send("tbox/status", status(car))
    await car.barrier()
    assert len(clients.backend.on("/tbox/status")) == 3  # the car is known again
    assert second.states[VIN].revision == 1


@pytest.mark.integration
async def test_policy_switch_keeps_anchors_not_yet_committed(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """A policy switch reloads the state from the store between two messages:
    an anchor set by a message whose batch is not committed yet must survive
    it, or the car's next message refreshes early (contract rule 13)."""
    service = await gateways.start()
    car = clients.car
    await car.settings(
        1, features={"remote_control": True}, location=common_pb2.LOCATION_APPROXIMATE
    )
    await car.send("tbox/status", status(car))
    await car.barrier()
    committed = service.anchors[VIN]
    # The next refresh, decided but (as between two group commits) not stored yet.
    newer = dataclasses.replace(committed, refreshed_at=committed.refreshed_at + 1000, latitude=1.0)
    service.anchors[VIN] = newer
    service.load_state()
    assert service.anchors[VIN] == newer


async def test_counts_are_kept_as_long_as_their_streams_retention(
    gateways: GatewayHarness,
) -> None:
    """Issue 14, item 7: the gateway's own records follow the policy's
    retention per stream (7 days for connectivity, 365 for trips)."""
    from gateway.store import EgressCount

    service = await gateways.start()
    subject = service.audit_subject(VIN)
    ten_days_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 10 * 86400))
    service.store.add_egress_counts(
        [
            EgressCount(subject, ten_days_ago, "tbox/connectivity", "remote_control", "p", 3),
            EgressCount(subject, ten_days_ago, "tbox/trip", "energy_consumption", "p", 4),
        ]
    )
    removed = await service.purge_retention()
    assert removed["egress_counts"] == 1
    assert [c.stream for c in service.store.egress_counts(subject)] == ["tbox/trip"]
