"""Contract rule 17 end to end: the real gateway between real Mosquitto
clients, on a gateway clock the test drives (an hour of polling in seconds)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.policy import load_policy
from gateway.service import GatewayService
from gateway.store import SqliteConsentStore
from telematics.v1 import command_pb2, common_pb2, streams_pb2

from .conftest import DEFAULT_POLICY, KEY, VIN, Clients, GatewayHarness, gateway_config

pytestmark = pytest.mark.integration

# Now: the test car stamps its records with the real time, and a record stamped
# before the car's first settings counts as captured before them (rule 11).
T0 = time.time()
CAP = load_policy(DEFAULT_POLICY).max_commands_per_hour


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def start(gateways: GatewayHarness, clock: FakeClock) -> GatewayService:
    """Like the harness's start, on the test's clock."""
    config = gateway_config(gateways.vehicle_url, gateways.backend_url, gateways.state_dir)
    service = GatewayService(
        config,
        load_policy(DEFAULT_POLICY),
        KEY,
        SqliteConsentStore.in_state_dir(gateways.state_dir),
        clock=clock,
    )
    await service.start()
    await asyncio.wait_for(service.ready.wait(), 10)
    gateways.running.append(service)
    return service


async def find(clients: Clients, request_id: str) -> command_pb2.CommandResult:
    cmd = command_pb2.Command(request_id=request_id, command="find_my_car")
    await clients.backend_client.publish(
        f"tsp/{VIN}/cmd/find_my_car", cmd.SerializeToString(), qos=1
    )

    def result() -> command_pb2.CommandResult | None:
        for m in clients.backend.on("/cmd/find_my_car/result"):
            r = command_pb2.CommandResult.FromString(m.payload)  # type: ignore[arg-type]
            if r.request_id == request_id:
                return r
        return None

    await clients.backend.wait_for(lambda: result() is not None)
    found = result()
    assert found is not None
    return found


async def answer(clients: Clients, request_id: str) -> streams_pb2.Location:
    msg = streams_pb2.Location(request_id=request_id)
    msg.position.latitude, msg.position.longitude = 48.137154, 11.576124
    clients.car.header(msg)
    await clients.car.send("tbox/location", msg)
    return msg


def forwarded(clients: Clients) -> list[streams_pb2.Location]:
    return [
        streams_pb2.Location.FromString(m.payload)  # type: ignore[arg-type]
        for m in clients.backend.on("/tbox/location")
    ]


async def test_polling_every_window_for_an_hour_yields_at_most_the_cap(
    gateways: GatewayHarness, clients: Clients
) -> None:
    clock = FakeClock()
    service = await start(gateways, clock)
    await clients.car.settings(
        1, features={"find_my_car": True}, location=common_pb2.LOCATION_PRECISE
    )
    window = service.ctx.policy.window_s
    results = []
    for i in range(int(3600 // window)):
        request_id = f"poll-{i}"
        results.append(await find(clients, request_id))
        clock.now += 5
        await answer(clients, request_id)  # the car answers ...
        await answer(clients, request_id)  # ... twice
        await answer(clients, "")  # a periodic report, no request id
        await answer(clients, f"stray-{i}")  # answers nothing
        await clients.car.barrier()  # decided before the clock moves on
        clock.now += window - 5
    await clients.car.barrier()
    accepted = [r.request_id for r in results if r.accepted]
    assert accepted == [f"poll-{i}" for i in range(CAP)]
    assert {r.reason for r in results if not r.accepted} == {"rate_limited"}
    fixes = forwarded(clients)
    assert len(fixes) == CAP == len(accepted)
    assert [f.request_id for f in fixes] == accepted
    # The car saw only the accepted commands.
    assert len(clients.car.commands) == CAP
    dropped = {
        reason: service.metrics.value(
            "gateway_messages_dropped_total", stream="tbox/location", reason=reason
        )
        for reason in ("find_my_car_fixes_spent", "unanswered_location", "no_find_my_car_window")
    }
    # Inside the open windows: the second answer is spent, the periodic report
    # too (the answer took the first fix), the stray answers nothing.
    assert dropped["find_my_car_fixes_spent"] == 2 * CAP
    assert dropped["unanswered_location"] == CAP
    assert dropped["no_find_my_car_window"] == 4 * (len(results) - CAP)


async def test_restart_resets_neither_the_cap_nor_spent_fixes(
    gateways: GatewayHarness, clients: Clients
) -> None:
    clock = FakeClock()
    service = await start(gateways, clock)
    await clients.car.settings(
        1, features={"find_my_car": True}, location=common_pb2.LOCATION_PRECISE
    )
    for i in range(CAP):
        assert (await find(clients, f"req-{i}")).accepted
        clock.now += 10
    await answer(clients, "req-0")
    await clients.car.barrier()
    assert [f.request_id for f in forwarded(clients)] == ["req-0"]

    await gateways.stop(service)
    service = await start(gateways, clock)
    clock.now += 10

    over = await find(clients, "req-over")
    assert (over.accepted, over.reason) == (False, "rate_limited")
    await answer(clients, "req-0")  # spent before the restart
    await answer(clients, f"req-{CAP - 1}")  # its window is still open
    await clients.car.barrier()
    assert [f.request_id for f in forwarded(clients)] == ["req-0", f"req-{CAP - 1}"]

    clock.now = T0 + 3600  # an hour after the first command
    assert (await find(clients, "req-later")).accepted
