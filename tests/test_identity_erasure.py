"""Erasure pairs nothing (contract rule 16), on real brokers and a real store:
the VIN event carries only the VIN, each app pseudonym gets its own event on its
own topic later, what survives (epoch, revision floor, restriction) is durable,
and the car is asked to show its privacy screen again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.config import ErasureConfig
from gateway.control.audit import AuditRecord
from gateway.core.identity import IdentityRow
from gateway.store import SqliteConsentStore
from gateway.store import sqlite as store_module
from telematics.v1 import privacy_pb2, streams_pb2

from .conftest import VIN, Clients, GatewayHarness

APPS = {"third_party.music": True, "third_party.weather": True, "remote_control": True}
FAST = ErasureConfig(app_event_min_delay_s=0.8, app_event_max_delay_s=1.5)


def erasure_events(clients: Clients) -> list[str]:
    return [t for t in clients.backend.topics() if t.endswith("/erasure")]


async def send_apps(clients: Clients) -> dict[str, str]:
    """One message per app; returns app -> ref of its topic."""
    car = clients.car
    start = len(clients.backend.messages)
    for app in ("music", "weather"):
        await car.send(f"avn/app/{app}", car.header(streams_pb2.AppTraffic(app_id=app)))
    await car.barrier()
    refs = {}
    for message in clients.backend.messages[start:]:
        parts = str(message.topic).split("/")
        if parts[2:4] == ["avn", "app"]:
            refs[parts[4]] = parts[1]
    assert set(refs) == {"music", "weather"}, clients.backend.topics()
    return refs


async def next_applied(clients: Clients) -> privacy_pb2.PrivacyApplied:
    return await asyncio.wait_for(clients.car.applied.get(), 10)


@pytest.mark.integration
async def test_erasure_leaves_no_full_ip_address_in_memory(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Truncated addresses are remembered per full address (a car keeps its
    address for hours): an erasure drops them all, so the car's full address
    does not outlive it in the gateway's memory."""
    from gateway.core.transforms import forget_addresses, remembered_addresses

    service = await gateways.start()
    forget_addresses()
    await clients.car.settings(1, features={"remote_control": True})
    connectivity = streams_pb2.Connectivity(ip_address="2001:db8:85a3:8d3:1319:8a2e:370:7348")
    await clients.car.send("tbox/connectivity", clients.car.header(connectivity))
    await clients.car.barrier()
    forwarded = clients.backend.on("/tbox/connectivity")
    assert forwarded, clients.backend.topics()
    shown = streams_pb2.Connectivity.FromString(forwarded[0].payload)  # type: ignore[arg-type]
    assert shown.ip_address == "2001:db8:85a3::"
    assert remembered_addresses() >= 1
    await service.erase_vehicle(VIN, "dpo-test")
    assert remembered_addresses() == 0


@pytest.mark.integration
async def test_erasure_events_pair_nothing_and_the_car_is_asked_again(
    gateways: GatewayHarness, clients: Clients
) -> None:
    service = await gateways.start()
    service.config.erasure = FAST
    loop = asyncio.get_running_loop()
    await clients.car.settings(4, features=APPS)
    old_refs = await send_apps(clients)
    assert await service.set_restriction(VIN, True, "dpo-test")

    result = await service.erase_vehicle(VIN, "dpo-test")
    assert result["erasure_event"] == "delivered"
    await clients.backend.wait_for(lambda: bool(clients.backend.on(f"{VIN}/erasure")))
    vin_seen = loop.time()
    vin_event = privacy_pb2.ErasureEvent.FromString(
        clients.backend.on(f"{VIN}/erasure")[0].payload  # type: ignore[arg-type]
    )
    assert vin_event.vin == VIN and not vin_event.refs  # only the VIN
    assert erasure_events(clients) == [f"tsp/{VIN}/erasure"]  # not at the same moment
    assert service.is_restricted(VIN)  # shown to the DPO while the car is away

    # The car is asked to show its privacy screen again.
    applied = await next_applied(clients)
    assert applied.reprompt and applied.revision == 4

    await clients.backend.wait_for(lambda: len(erasure_events(clients)) == 3)
    assert loop.time() - vin_seen >= 0.5
    for app, ref in old_refs.items():
        (message,) = clients.backend.on(f"/{ref}/avn/app/{app}/erasure")
        payload = bytes(message.payload)  # type: ignore[arg-type]
        event = privacy_pb2.ErasureEvent.FromString(payload)
        assert list(event.refs) == [ref] and not event.vin  # only that ref
        assert VIN.encode() not in payload
        assert event.erased_at_ms != vin_event.erased_at_ms

    # An old revision is void: refused, and the car is asked again.
    await clients.car.settings(4, features=APPS, wait=False)
    applied = await next_applied(clients)
    assert applied.reprompt and applied.revision == 4
    assert VIN not in service.states

    # A new snapshot is applied, and the restriction outlived the erasure.
    await clients.car.settings(5, features=APPS)
    before = len(clients.backend.messages)
    await clients.car.send("tbox/status", clients.car.header(streams_pb2.VehicleStatus()))
    await clients.car.barrier()
    assert len(clients.backend.messages) == before
    assert await service.set_restriction(VIN, False, "dpo-test")
    # Data captured within the clock-skew margin of the restriction's end might
    # have been captured under it (rule 11): the car's next records come later.
    await asyncio.sleep(service.config.pipeline.capture_skew_s + 0.1)

    # A new epoch: the app pseudonyms are unrelated to the old ones, and stay
    # so after a restart.
    new_refs = await send_apps(clients)
    assert not set(new_refs.values()) & set(old_refs.values())
    await gateways.stop(service)
    service = await gateways.start()
    assert await send_apps(clients) == new_refs
    await clients.car.settings(5, features=APPS, wait=False)  # a redelivery: same revision
    assert not (await next_applied(clients)).reprompt


@pytest.mark.integration
async def test_pending_app_erasure_events_survive_a_restart(
    gateways: GatewayHarness, clients: Clients
) -> None:
    service = await gateways.start()
    service.config.erasure = ErasureConfig(app_event_min_delay_s=2.0, app_event_max_delay_s=2.5)
    await clients.car.settings(3, features=APPS)
    refs = await send_apps(clients)
    await service.erase_vehicle(VIN, "dpo-test")
    await gateways.stop(service)  # before any app event was due
    assert erasure_events(clients) == [f"tsp/{VIN}/erasure"]

    service = await gateways.start()
    await clients.backend.wait_for(lambda: len(erasure_events(clients)) == 3)
    assert {t.split("/")[1] for t in erasure_events(clients)} == {VIN, *refs.values()}
    for _ in range(100):  # removed once the backend broker acknowledged it
        if not service.store.pending_erasure_events():  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    assert service.store.pending_erasure_events() == []  # type: ignore[attr-defined]
    # After the restart too, an old revision is refused and the car asked again.
    await clients.car.settings(3, features=APPS, wait=False)
    applied = await next_applied(clients)
    while not applied.reprompt:  # the erasure's own request may still be queued
        applied = await next_applied(clients)
    assert applied.revision == 3


def test_what_survives_an_erasure_is_kept_under_the_subject_hash(tmp_path: Path) -> None:
    store = SqliteConsentStore(tmp_path / "c.sqlite3")
    record = AuditRecord(actor="dpo", action="erasure", subject="s" * 64, content={}, at=1.0)
    row = IdentityRow(epoch=2, revision_floor=9, restricted=True)
    store.erase_vehicle(VIN, "s" * 64, record, row, [(5.0, "tsp/ref/avn/app/music/erasure", b"x")])
    store.close()
    store = SqliteConsentStore(tmp_path / "c.sqlite3")
    assert store.identities() == {"s" * 64: row}
    ((event_id, due, topic, payload),) = store.pending_erasure_events()
    assert (due, topic, payload) == (5.0, "tsp/ref/avn/app/music/erasure", b"x")
    # A later erasure of the same car keeps one row (the newest), and the
    # restriction stored with the first one (Art. 18: only lifting it, through
    # the restriction endpoint, clears it; an erasure never does).
    store.erase_vehicle(VIN, "s" * 64, record, IdentityRow(3, 9, False))
    assert store.identities() == {"s" * 64: IdentityRow(3, 9, True)}
    assert store.set_identity_restricted("s" * 64, False)  # lifted
    store.erase_vehicle(VIN, "s" * 64, record, IdentityRow(4, 9, False))
    assert store.identities() == {"s" * 64: IdentityRow(4, 9, False)}
    store.delete_pending_erasure_event(event_id)
    assert store.pending_erasure_events() == []
    db = sqlite3.connect(tmp_path / "c.sqlite3")
    dump = "\n".join(db.iterdump())
    assert VIN not in dump  # neither table names the car in clear
    store.close()


def test_schema_7_is_reached_from_an_older_store(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    SqliteConsentStore(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE vehicle_identity")
    db.execute("DROP TABLE pending_erasure_events")
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.commit()
    db.close()
    store = SqliteConsentStore(path)
    # Up to 7 on open; 8 (cars by subject) needs the key.
    assert store.meta("schema_version") == "7"
    assert store.identities() == {} and store.pending_erasure_events() == []
    store.attach_key(bytes(range(32)), lambda vin: "s" + vin)
    assert store.meta("schema_version") == str(store_module.SCHEMA_VERSION)
    store.close()


def test_erasure_delays_are_validated() -> None:
    with pytest.raises(ValueError, match="app_event_max_delay_s"):
        ErasureConfig(app_event_min_delay_s=600, app_event_max_delay_s=60)
    with pytest.raises(ValueError):
        ErasureConfig(app_event_min_delay_s=0)  # never at the same moment as the VIN event


@pytest.mark.integration
async def test_a_second_erasure_after_a_restart_keeps_the_restriction_and_the_epoch(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """After a restart, an erased car not seen since is known only by its
    stored row: erasing it again ends the stored epoch (not epoch 0) and keeps
    its restriction (it was kept restricted by the first erasure)."""
    service = await gateways.start()
    await clients.car.settings(4, features=APPS)
    assert await service.set_restriction(VIN, True, "dpo-test")
    await service.erase_vehicle(VIN, "dpo-test")
    subject = service.audit_subject(VIN)
    assert service.store.identities()[subject] == IdentityRow(1, 4, True)
    await gateways.stop(service)
    service = await gateways.start()
    assert service.is_restricted(VIN)
    await service.erase_vehicle(VIN, "dpo-test")
    assert service.store.identities()[subject] == IdentityRow(2, 4, True)
    assert service.ctx.identity.epoch(VIN) == 2  # memory agrees with the store
