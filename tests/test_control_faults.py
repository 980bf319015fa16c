"""The control plane under faults: dead letters, a store that cannot be written, probes
(real HTTP, mosquitto, SQLite)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ControlConfig
from gateway.control.api import ControlPlane
from sim.broker import MosquittoBroker
from telematics.v1 import streams_pb2

from .conftest import VIN, Clients, GatewayHarness
from .test_control import Control, control  # noqa: F401  (the fixture)
from .test_fault_isolation import NO_BATTERY_ACL, OPEN_ACL, battery

pytestmark = pytest.mark.integration


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker(acl=NO_BATTERY_ACL) as b:
        yield b


async def test_dead_letters_listed_redriven_and_purged_by_the_operator(
    control: Control, clients: Clients, broker: MosquittoBroker  # noqa: F811
) -> None:
    http, url, car = control.http, control.url, clients.car
    await car.settings(1, features={"charging": True})
    for _ in range(3):
        await car.send("tbox/battery", battery(car))
    await car.barrier()

    assert (await http.get(f"{url}/v1/dead-letters", headers=control.auth("viewer"))).status == 403
    assert (await http.get(f"{url}/v1/dead-letters")).status == 401
    listing = await (
        await http.get(f"{url}/v1/dead-letters?limit=2", headers=control.auth("operator"))
    ).json()
    assert listing["total"] == 3 and len(listing["dead_letters"]) == 2
    first = listing["dead_letters"][0]
    assert (first["stream"], first["reason"], first["kind"]) == (
        "tbox/battery",
        "not_authorized",
        "vehicle",
    )
    assert "sealed" not in first and "payload" not in first  # metadata only
    rest = await (
        await http.get(
            f"{url}/v1/dead-letters?after={listing['next_after']}", headers=control.auth("operator")
        )
    ).json()
    assert len(rest["dead_letters"]) == 1
    metrics = await (await http.get(f"{url}/metrics", headers=control.auth("viewer"))).text()
    assert 'gateway_dead_letters_total{edge="backend",reason="not_authorized"} 3.0' in metrics
    assert "gateway_dead_letters_stored 3.0" in metrics

    deleted = await http.delete(
        f"{url}/v1/dead-letters?id={first['id']}", headers=control.auth("operator")
    )
    assert (await deleted.json()) == {"deleted": 1}
    broker.reload(OPEN_ACL)
    await asyncio.sleep(0.5)
    redriven = await http.post(f"{url}/v1/dead-letters/redrive", headers=control.auth("operator"))
    assert (await redriven.json())["redriven"] == 2
    await clients.backend.wait_for(lambda: len(clients.backend.on("/tbox/battery")) == 2)
    for _ in range(100):
        if control.service.store.dead_letter_count() == 0:
            break
        await asyncio.sleep(0.05)
    assert control.service.store.dead_letter_count() == 0
    misspelt = await http.delete(f"{url}/v1/dead-letters?ids=5", headers=control.auth("operator"))
    assert misspelt.status == 400  # never "purge everything" by accident
    purged = await http.delete(
        f"{url}/v1/dead-letters?all=true", headers=control.auth("operator")
    )
    assert (await purged.json()) == {"deleted": 0}


async def test_read_only_store_is_not_ready_keeps_ecall_and_recovers(
    control: Control, clients: Clients  # noqa: F811
) -> None:
    http, url, car, service = control.http, control.url, clients.car, control.service
    await car.settings(1, features={"remote_control": True})
    store = service.store
    with store._lock:  # what a read-only remount or a full disk does to every write
        store._db.execute("PRAGMA query_only = ON")
    try:
        ready = await http.get(f"{url}/readyz", headers=control.auth("viewer"))
        assert ready.status == 503
        assert (await ready.json())["checks"]["store_writable"] is False
        # New settings cannot be made durable: not applied (fail closed), retried.
        await car.settings(2, features={"remote_control": False}, wait=False)
        await car.send("tbox/ecall", car.header(streams_pb2.ECall()))
        await clients.backend.wait_for(lambda: bool(clients.backend.on("/tbox/ecall")), 5)
        metrics = await http.get(f"{url}/metrics", headers=control.auth("viewer"))
        assert metrics.status == 200
        assert "gateway_store_writable 0.0" in await metrics.text()
    finally:
        with store._lock:
            store._db.execute("PRAGMA query_only = OFF")
    # Space is back: the held settings are applied, readiness returns.
    while (await asyncio.wait_for(car.applied.get(), 15)).revision != 2:
        pass
    ready = await http.get(f"{url}/readyz", headers=control.auth("viewer"))
    assert ready.status == 200
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus()))
    await car.barrier()
    assert clients.backend.on("/tbox/status") == []  # the withdrawal took effect


async def test_probe_listener_serves_only_health_without_token(
    gateways: GatewayHarness, tmp_path: Path
) -> None:
    service = await gateways.start()
    plane = ControlPlane(
        service,
        ControlConfig(listen="127.0.0.1:0", probe_listen="127.0.0.1:0"),
    )
    await plane.start()
    try:
        base = f"http://127.0.0.1:{plane.probe_port}"
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{base}/healthz")).status == 200
            ready = await http.get(f"{base}/readyz")
            assert ready.status == 200 and (await ready.json())["ready"] is True
            for path in ("/metrics", "/v1/policy", "/v1/dead-letters", f"/v1/vehicles/{VIN}"):
                assert (await http.get(f"{base}{path}")).status == 404
            # The main listener still wants a token for readiness.
            assert (await http.get(f"http://127.0.0.1:{plane.port}/readyz")).status == 401
    finally:
        await plane.stop()
    with pytest.raises(ValueError, match="not a loopback address"):
        ControlConfig(listen="0.0.0.0:8080", probe_listen="0.0.0.0:8081")
    assert ControlConfig(listen="127.0.0.1:8080", probe_listen="0.0.0.0:8081").probe_listen
