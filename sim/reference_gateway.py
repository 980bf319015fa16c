"""A small, slow, obviously-correct model of the wire contract, for testing the sim.

It is *not* the product: it exists so the simulator, recorder and checker can be
tested end to end (in memory or over real Mosquitto) independently of the real
gateway, and so the checker's verdict on a contract-following gateway is known to
be "clean". `python -m sim demo --gateway-command "python -m sim.reference_gateway"`
runs the demo against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError, Message
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sim.checker import geopoint_fields, message_class, pseudonym, truncate_ip
from sim.contract import ACCEPT, PASS, decide_command, decide_message
from sim.geo import METRES_PER_DEGREE
from sim.model import Settings
from sim.mqtt import ClientFactory, ClientLike, MessageLike, aiomqtt_factory
from sim.policy import APP_STREAM_PREFIX, DEFAULT_POLICY_PATH, Policy, load_policy
from telematics.v1 import command_pb2, common_pb2, privacy_pb2


@dataclass
class CarState:
    settings: Settings | None = None
    window_opened: float | None = None
    cached_position: tuple[int, common_pb2.GeoPoint] | None = None  # (vehicle ts, coarse)
    offset: tuple[float, float] = (0.0, 0.0)  # sticky secret shift, cell fractions [0, 1)


@dataclass
class ReferenceGateway:
    policy: Policy
    key: bytes
    vehicle_url: str
    backend_url: str
    client_factory: ClientFactory = aiomqtt_factory
    vehicle_prefix: str = "vehicle"
    backend_prefix: str = "tsp"
    now: Callable[[], float] = time.time
    cars: dict[str, CarState] = field(default_factory=dict)
    dropped: int = 0
    forwarded: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    announce: bool = False
    _vehicle: ClientLike | None = None
    _backend: ClientLike | None = None

    def car(self, vin: str) -> CarState:
        if vin not in self.cars:
            digest = hmac.new(self.key, b"offset\x00" + vin.encode(), hashlib.sha256).digest()
            self.cars[vin] = CarState(offset=(digest[0] / 256, digest[1] / 256))
        return self.cars[vin]

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            vehicle = await stack.enter_async_context(
                self.client_factory(self.vehicle_url, "reference-gateway-vehicle", True)
            )
            backend = await stack.enter_async_context(
                self.client_factory(self.backend_url, "reference-gateway-backend", True)
            )
            self._vehicle, self._backend = vehicle, backend
            await vehicle.subscribe(f"{self.vehicle_prefix}/+/tbox/#", qos=1)
            await vehicle.subscribe(f"{self.vehicle_prefix}/+/avn/#", qos=1)
            await backend.subscribe(f"{self.backend_prefix}/+/cmd/+", qos=1)
            self.ready.set()
            if self.announce:
                # The demo waits for a line containing "gateway ready", like the real gateway's.
                print("reference gateway ready", file=sys.stderr, flush=True)
            await asyncio.gather(
                self._pump(vehicle, self.on_vehicle), self._pump(backend, self.on_backend)
            )

    async def _pump(self, client: ClientLike, handler: Callable[[MessageLike], object]) -> None:
        async for message in client.messages:
            await handler(message)  # type: ignore[misc]

    # --- vehicle side ----------------------------------------------------------------
    async def on_vehicle(self, message: MessageLike) -> None:
        assert self._vehicle is not None and self._backend is not None
        parts = str(message.topic.value).split("/")
        payload = bytes(message.payload)
        if len(parts) < 4:
            return
        vin, stream = parts[1], "/".join(parts[2:])
        if stream == "avn/privacy":
            await self._on_settings(vin, payload)
            return
        if stream == "avn/privacy/applied":
            return
        cls = message_class(self.policy, stream)
        if cls is None:
            self.dropped += 1
            return
        decoded = cls()
        try:
            decoded.ParseFromString(payload)
        except DecodeError:
            self.dropped += 1
            return
        if decoded.header.vin != vin:  # type: ignore[attr-defined]
            self.dropped += 1
            return
        car = self.car(vin)
        window = car.window_opened is not None and (
            self.now() - car.window_opened < self.policy.find_my_car_window_s
        )
        if decide_message(self.policy, stream, car.settings, window) != PASS:
            self.dropped += 1
            return
        out_payload, ref, transforms = self.transform(vin, stream, decoded, payload, car)
        feature = self.policy.feature_for(stream)
        rule = self.policy.rule_for(stream)
        assert rule is not None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [
            ("policy-version", self.policy.version),
            ("feature", feature),
            ("legal-basis", self.policy.legal_basis_for(feature)),
            ("retention-days", str(rule.retention_days)),
            ("transforms", ",".join(transforms)),
        ]
        await self._backend.publish(
            f"{self.backend_prefix}/{ref}/{stream}", out_payload, qos=1, properties=properties
        )
        self.forwarded += 1

    async def _on_settings(self, vin: str, payload: bytes) -> None:
        assert self._vehicle is not None
        settings = privacy_pb2.PrivacySettings()
        try:
            settings.ParseFromString(payload)
        except DecodeError:
            return
        if settings.header.vin != vin:
            return
        car = self.car(vin)
        if car.settings is not None and settings.revision <= car.settings.revision:
            return
        car.settings = Settings(
            settings.revision, settings.privacy_mode, settings.location, dict(settings.features)
        )
        if settings.privacy_mode or not car.settings.enabled("find_my_car"):
            car.window_opened = None
        applied = privacy_pb2.PrivacyApplied(
            vin=vin, revision=settings.revision, policy_version=self.policy.version
        )
        await self._vehicle.publish(
            f"{self.vehicle_prefix}/{vin}/avn/privacy/applied", applied.SerializeToString(), qos=1
        )

    def transform(
        self, vin: str, stream: str, message: Message, payload: bytes, car: CarState
    ) -> tuple[bytes, str, list[str]]:
        if self.policy.is_legal_obligation(stream):
            return payload, vin, []
        rule = self.policy.rule_for(stream)
        assert rule is not None and car.settings is not None
        mode = car.settings.location
        transforms: list[str] = []
        ts_ms = int(message.header.timestamp_ms)  # type: ignore[attr-defined]
        for name in geopoint_fields(message):
            if not message.HasField(name):
                continue
            if mode == common_pb2.LOCATION_PRECISE:
                continue
            if mode != common_pb2.LOCATION_APPROXIMATE:
                message.ClearField(name)
                transforms.append(f"{name}:removed")
                continue
            action = rule.fields.get(name, "place")
            point = getattr(message, name)
            if action == "position":
                cached = car.cached_position
                refresh_ms = self.policy.refresh_interval_s * 1000
                if cached is None or not 0 <= ts_ms - cached[0] < refresh_ms:
                    cached = (ts_ms, self.coarsen(point, car))
                    car.cached_position = cached
                coarse = cached[1]
            else:
                coarse = self.coarsen(point, car)
            point.CopyFrom(coarse)
            transforms.append(f"{name}:approximate")
        for name, action in rule.fields.items():
            value = getattr(message, name, None)
            if not isinstance(value, str) or not value:
                continue
            if (action == "place_id" and mode != common_pb2.LOCATION_PRECISE) or action == "remove":
                setattr(message, name, "")
                transforms.append(f"{name}:removed")
            elif action == "truncate_ip":
                with contextlib.suppress(ValueError):
                    setattr(message, name, truncate_ip(value))
                    transforms.append(f"{name}:truncated")
            elif action == "pseudonymize":
                purpose = f"bluetooth_mac/{vin}" if name == "bluetooth_mac" else "voice_session"
                normalised = value.upper() if name == "bluetooth_mac" else value
                setattr(message, name, pseudonym(self.key, purpose, normalised))
                transforms.append(f"{name}:pseudonymized")
        ref = vin
        if stream.startswith(APP_STREAM_PREFIX):
            ref = pseudonym(self.key, f"vin/{stream[len(APP_STREAM_PREFIX) :]}", vin)
            header = message.header  # type: ignore[attr-defined]
            seq_mac = hmac.new(
                self.key,
                b"header-seq\x00" + ref.encode() + b"\x00" + int(header.seq).to_bytes(8, "big"),
                hashlib.sha256,
            )
            header.vin = ref
            header.seq = int.from_bytes(seq_mac.digest()[:8], "big")
            header.timestamp_ms -= header.timestamp_ms % 60_000
            transforms.append("vin:pseudonymized")
        return message.SerializeToString(deterministic=True), ref, transforms

    def coarsen(self, point: common_pb2.GeoPoint, car: CarState) -> common_pb2.GeoPoint:
        """The global-grid point nearest to (truth + the car's secret shift of up to
        half a cell per axis); latitude first."""
        cell = self.policy.cell_size_m
        lat_step = cell / METRES_PER_DEGREE
        row = math.floor((point.latitude + (car.offset[0] - 0.5) * lat_step + 90.0) / lat_step)
        lat = (row + 0.5) * lat_step - 90.0
        lon_step = cell / (METRES_PER_DEGREE * math.cos(math.radians(lat)))
        column = math.floor((point.longitude + (car.offset[1] - 0.5) * lon_step + 180) / lon_step)
        lon = (column + 0.5) * lon_step - 180.0
        return common_pb2.GeoPoint(latitude=lat, longitude=lon, horizontal_accuracy_m=cell)

    # --- backend side ----------------------------------------------------------------
    async def on_backend(self, message: MessageLike) -> None:
        assert self._vehicle is not None and self._backend is not None
        parts = str(message.topic.value).split("/")
        if len(parts) != 4 or parts[2] != "cmd":
            return
        vin, name = parts[1], parts[3]
        command = command_pb2.Command()
        try:
            command.ParseFromString(bytes(message.payload))
        except DecodeError:
            return
        car = self.car(vin)
        verdict = decide_command(self.policy, name, car.settings)
        if verdict == ACCEPT:
            if name == "find_my_car":
                car.window_opened = self.now()
            await self._vehicle.publish(
                f"{self.vehicle_prefix}/{vin}/cmd/{name}", bytes(message.payload), qos=1
            )
        result = command_pb2.CommandResult(
            request_id=command.request_id,
            command=name,
            accepted=verdict == ACCEPT,
            reason="" if verdict == ACCEPT else verdict,
        )
        await self._backend.publish(
            f"{self.backend_prefix}/{vin}/cmd/{name}/result", result.SerializeToString(), qos=1
        )


def load_or_create_key(state_dir: Path) -> bytes:
    path = state_dir / "pseudonym.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(32))
    return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.reference_gateway", description=__doc__)
    parser.add_argument("run", nargs="?", help="(accepted for command-line compatibility)")
    parser.add_argument("--config", default=None, help="(ignored)")
    parser.add_argument("--vehicle-broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--backend-broker", default=None)
    parser.add_argument("--state-dir", type=Path, default=Path(".state-reference"))
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY_PATH)
    args = parser.parse_args(argv)
    gateway = ReferenceGateway(
        load_policy(args.policy),
        load_or_create_key(args.state_dir),
        args.vehicle_broker,
        args.backend_broker or args.vehicle_broker,
        announce=True,
    )

    async def serve() -> None:
        task = asyncio.create_task(gateway.run())
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(serve())
    print(
        f"reference gateway stopped: forwarded {gateway.forwarded}, dropped {gateway.dropped}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
