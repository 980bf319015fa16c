"""Consent at capture time and the causal token end to end (contract v2 rules
11 and 12): real Mosquitto, real SQLite, the in-process gateway."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from gateway.config import LimitsConfig, PipelineConfig
from gateway.service import GatewayService
from gateway.store import SqliteConsentStore
from gateway.store import sqlite as store_module
from telematics.v1 import streams_pb2
from tests.conftest import VIN, Clients, GatewayHarness

SKEW_S = 0.3
REMOTE = {"remote_control": True}


def pipeline(**overrides: float) -> PipelineConfig:
    return PipelineConfig(inflight=256, drain_timeout_s=5, capture_skew_s=SKEW_S, **overrides)  # type: ignore[arg-type]


def status(clients: Clients, *, revision: int | None = None, at: float | None = None) -> bytes:
    """A status message of the test car: its current revision unless `revision`,
    captured now unless `at` (gateway epoch seconds)."""
    msg = clients.car.header(streams_pb2.VehicleStatus(fuel_level_pct=40.0))
    if revision is not None:
        msg.header.settings_revision = revision
    if at is not None:
        msg.header.timestamp_ms = int(at * 1000)
    return msg.SerializeToString()


def forwarded_seqs(clients: Clients) -> list[int]:
    return [
        streams_pb2.VehicleStatus.FromString(m.payload).header.seq  # type: ignore[arg-type]
        for m in clients.backend.on("/tbox/status")
    ]


def seq_of(payload: bytes) -> int:
    return streams_pb2.VehicleStatus.FromString(payload).header.seq


def dropped(service: GatewayService, reason: str) -> float:
    return service.metrics.value(
        "gateway_messages_dropped_total", stream="tbox/status", reason=reason
    )


async def test_captured_in_privacy_mode_and_uploaded_later_is_never_forwarded(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Store and forward through a tunnel: records captured while privacy mode
    was on, uploaded after it ended (with their capture timestamp; one stating
    its capture revision, one stating none), never reach the backend."""
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    await car.settings(2, features=REMOTE, privacy_mode=True)
    captured_at = time.time()
    in_privacy_stated = status(clients)  # states revision 2
    in_privacy_timestamp = status(clients, revision=0, at=captured_at)
    await asyncio.sleep(3 * SKEW_S)
    await car.settings(3, features=REMOTE)
    await asyncio.sleep(3 * SKEW_S)
    fresh = status(clients)
    for payload in (in_privacy_stated, in_privacy_timestamp, fresh):
        await car.send("tbox/status", payload)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(fresh)]
    assert dropped(service, "privacy_mode") == 2


async def test_restriction_period_is_remembered_after_it_is_lifted(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Data captured while processing was restricted (Art. 18) never passes
    later, not after the restriction is lifted and not after a restart."""
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    await service.set_restriction(VIN, True, "dpo")
    captured_at = time.time()
    await asyncio.sleep(3 * SKEW_S)
    await service.set_restriction(VIN, False, "dpo")
    await gateways.stop(service)
    service = await gateways.start()
    await asyncio.sleep(3 * SKEW_S)
    late = status(clients, at=captured_at)  # states revision 1, the one in force then
    fresh = status(clients)
    await car.send("tbox/status", late)
    await car.send("tbox/status", fresh)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(fresh)]
    assert dropped(service, "restricted") == 1


async def test_settings_merged_over_the_rate_limit_keep_the_current_revision_exact(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Settings over a car's rate are folded into its latest history row (the
    strictest of them). After a restart, records captured under the current
    revision still pass; ones captured under a revision folded in with privacy
    mode do not."""
    gateways.pipeline = pipeline()
    gateways.limits = LimitsConfig(settings_per_vehicle=1)
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    await car.settings(2, features=REMOTE, privacy_mode=True)
    await car.settings(3, features=REMOTE)
    await gateways.stop(service)
    service = await gateways.start()
    under_privacy = status(clients, revision=2)
    current = status(clients)  # revision 3
    await car.send("tbox/status", under_privacy)
    await car.send("tbox/status", current)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(current)]
    assert dropped(service, "privacy_mode") == 1


async def test_captured_before_known_settings_is_dropped(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    old = status(clients, revision=0, at=time.time() - 3600)
    await car.send("tbox/status", old)
    await car.barrier()
    assert forwarded_seqs(clients) == []
    assert dropped(service, "captured_before_known_settings") == 1


async def test_message_for_a_revision_that_turns_its_feature_off_is_never_forwarded(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """The TBOX publishes under revision 2 before the AVN's revision 2 (which
    switches remote_control off) reaches the gateway: parked, then dropped."""
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    early = status(clients, revision=2)
    await car.send("tbox/status", early)
    await car.barrier()
    assert service.metrics.value("gateway_parked_messages") == 1
    await car.settings(2, features={"remote_control": False})
    await car.barrier()
    assert forwarded_seqs(clients) == []
    assert dropped(service, "feature_disabled") == 1
    assert service.metrics.value("gateway_parked_total", stream="tbox/status") == 1
    await asyncio.sleep(0.2)  # the released row is deleted once its outcome is final
    assert service.metrics.value("gateway_parked_messages") == 0
    assert service.store.parked() == []


async def test_held_message_is_forwarded_once_its_revision_arrives(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    early = status(clients, revision=2)
    await car.send("tbox/status", early)
    after = status(clients, revision=1)  # acknowledged and decided behind the parked one
    await car.send("tbox/status", after)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(after)]
    assert service.metrics.value("gateway_parked_bytes") == len(early)
    [row] = service.store.parked()
    assert VIN not in row.subject and VIN.encode() not in row.sealed  # keyed and sealed
    await car.settings(2, features=REMOTE)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(after), seq_of(early)]
    await asyncio.sleep(0.2)
    assert service.store.parked() == []
    assert service.metrics.value("gateway_parked_messages") == 0


async def test_parked_app_messages_leave_apart_from_the_cars_vin_messages(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Released together, a car's parked VIN-keyed and app messages would reach
    the backend in one burst and pair the app's pseudonym with the VIN by
    timing (rule 15): app rows wait a random delay of their own."""
    gateways.pipeline = pipeline(
        parked_app_release_min_delay_s=1.0, parked_app_release_max_delay_s=1.5
    )
    await gateways.start()
    car = clients.car
    features = REMOTE | {"third_party.music": True}
    await car.settings(1, features=features)
    app = car.header(streams_pb2.AppTraffic(app_id="music", payload=b"{}"))
    app.header.settings_revision = 2
    await car.send("avn/app/music", app)
    early = status(clients, revision=2)
    await car.send("tbox/status", early)
    await car.barrier()
    assert forwarded_seqs(clients) == [] and clients.backend.on("/avn/app/music") == []
    await car.settings(2, features=features)
    await car.barrier()
    released = time.monotonic()
    assert forwarded_seqs(clients) == [seq_of(early)]
    assert clients.backend.on("/avn/app/music") == []  # not in the same burst
    while not clients.backend.on("/avn/app/music"):
        assert time.monotonic() - released < 10, "the parked app message never left"
        await asyncio.sleep(0.05)
    assert time.monotonic() - released >= 0.9


async def test_held_message_expires_as_settings_pending(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline(hold_max_s=0.5)
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    await car.send("tbox/status", status(clients, revision=2))
    await car.barrier()
    deadline = time.monotonic() + 5
    while dropped(service, "settings_pending") < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert dropped(service, "settings_pending") == 1
    assert service.store.parked() == []
    assert service.metrics.value("gateway_parked_messages") == 0
    await car.settings(2, features=REMOTE)
    await car.barrier()
    assert forwarded_seqs(clients) == []


async def test_parked_messages_survive_a_restart(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    early = status(clients, revision=2)
    await car.send("tbox/status", early)
    await car.barrier()
    await gateways.stop(service)
    service = await gateways.start()
    assert service.metrics.value("gateway_parked_messages") == 1
    await car.barrier()
    assert forwarded_seqs(clients) == []
    await car.settings(2, features=REMOTE)
    await car.barrier()
    assert forwarded_seqs(clients) == [seq_of(early)]


async def test_parked_message_whose_revision_was_applied_before_a_crash_is_released(
    gateways: GatewayHarness, clients: Clients, tmp_path: Path
) -> None:
    """Settings applied, then the gateway died before releasing: the next
    start releases what the applied revision covers."""
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    early = status(clients, revision=2)
    await car.send("tbox/status", early)
    await car.barrier()
    await gateways.stop(service)
    # What a crash between the settings write and the release leaves behind.
    from gateway.core import LocationMode, SettingsSnapshot

    store = SqliteConsentStore.in_state_dir(gateways.state_dir)
    subject = service.audit_subject(VIN)  # the store keys cars by subject
    store.apply_settings(
        SettingsSnapshot(subject, 2, False, LocationMode.PRECISE, REMOTE, time.time(), "2026.12.1")
    )
    store.close()
    await gateways.start()
    await clients.backend.wait_for(lambda: forwarded_seqs(clients) == [seq_of(early)])


async def test_erasure_removes_parked_messages(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline()
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    await car.send("tbox/status", status(clients, revision=2))
    await car.barrier()
    assert len(service.store.parked()) == 1
    result = await service.erase_vehicle(VIN, "dpo")
    assert result["removed"]["parked"] == 1
    assert service.store.parked() == []
    assert service.metrics.value("gateway_parked_messages") == 0
    await car.settings(2, features=REMOTE)
    await car.barrier()
    assert forwarded_seqs(clients) == []


async def test_parked_bytes_are_bounded_per_car_oldest_dropped(
    gateways: GatewayHarness, clients: Clients
) -> None:
    gateways.pipeline = pipeline(parked_bytes_per_vehicle=1024)
    service = await gateways.start()
    car = clients.car
    await car.settings(1, features=REMOTE)
    sent = []
    for _ in range(40):
        msg = car.header(streams_pb2.VehicleStatus(fuel_level_pct=40.0))
        msg.header.settings_revision = 2
        msg.position.latitude = 48.1
        sent.append(msg.SerializeToString())
        await car.send("tbox/status", sent[-1])
    await car.barrier()
    kept = service.store.parked()
    assert sum(r.size for r in kept) <= 1024
    assert dropped(service, "parked_evicted") == 40 - len(kept)
    assert service.metrics.value("gateway_parked_bytes") == sum(r.size for r in kept)
    await car.settings(2, features=REMOTE)
    await car.barrier()
    # The newest were kept, released in their order.
    assert forwarded_seqs(clients) == [seq_of(p) for p in sent[-len(kept) :]]


def test_store_of_the_previous_schema_opens_and_parks(tmp_path: Path) -> None:
    """A state directory written by the previous release (schema 3, no parked
    table) is migrated to schema 4 in place and works."""
    path = tmp_path / "consent.sqlite3"
    store = SqliteConsentStore(path)
    store.close()
    with sqlite3.connect(path) as db:  # what the schema-3 gateway left behind
        db.execute("DROP TABLE parked")
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.close()
    store = SqliteConsentStore(path)
    try:
        store.attach_key(bytes(range(32)), lambda vin: "s" + vin)  # schema 8 needs the key
        assert store.meta("schema_version") == str(store_module.SCHEMA_VERSION)
        from gateway.store import ParkedMessage

        row = ParkedMessage("subject", 2, 1.0, 2.0, "tbox/status", 3, b"abc")
        assert store.park(row, 1024, 1 << 20).evicted == ()
        assert [p.revision for p in store.parked("subject")] == [2]
    finally:
        store.close()
