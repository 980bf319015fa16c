"""No VIN (in any letter case) and no precise position reaches any log line,
at DEBUG, through a run that touches every logging path a car can trigger:
settings, forwarded and dropped messages, commands, a restriction, an erasure."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import JsonLinesFormatter, TextFormatter
from telematics.v1 import command_pb2, common_pb2, streams_pb2

from .conftest import VIN, Clients, GatewayHarness

LAT, LON = 48.1371549, 11.5761249  # precise digits no coarse value has


@pytest.mark.integration
async def test_no_vin_and_no_precise_position_in_any_log_line(
    gateways: GatewayHarness, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = await gateways.start()
    car = clients.car
    features = {"remote_control": True, "find_my_car": True, "third_party.music": True}
    await car.settings(1, features=features)
    position = common_pb2.GeoPoint(latitude=LAT, longitude=LON)
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus(position=position)))
    await car.send("tbox/alarm", car.header(streams_pb2.Alarm(detail=VIN, position=position)))
    leaky = streams_pb2.AppTraffic(app_id="music", payload=VIN.lower().encode())
    await car.send("avn/app/music", car.header(leaky))
    await car.send("tbox/status", b"\xff\xff not protobuf " + VIN.encode())
    # A topic whose vehicle segment is the VIN in lower case (not a valid VIN).
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus()), vin=VIN.lower())
    await car.send("tbox/unknown", car.header(streams_pb2.VehicleStatus()))
    for name in ("find_my_car", "lock", "nonsense"):
        cmd = command_pb2.Command(request_id=f"r-{VIN}", command=name)
        await clients.backend_client.publish(f"tsp/{VIN}/cmd/{name}", cmd.SerializeToString(), 1)
    await car.send("tbox/location", car.header(streams_pb2.Location(position=position)))
    await car.settings(2, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    await car.barrier()
    await service.set_restriction(VIN, True, "dpo-test")
    await service.erase_vehicle(VIN, "dpo-test")
    await gateways.stop(service)

    lines = [
        fmt.format(record)
        for record in caplog.records
        for fmt in (TextFormatter(), JsonLinesFormatter())
    ]
    assert len(lines) > 10
    for line in lines:
        assert VIN.lower() not in line.lower(), line
        assert "48.13715" not in line and "11.57612" not in line, line
