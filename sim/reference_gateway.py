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
from typing import Any

from google.protobuf.message import DecodeError, Message
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sim.checker import geopoint_fields, message_class, pseudonym, truncate_ip
from sim.contract import ACCEPT, PASS, decide_command, decide_message
from sim.geo import METRES_PER_DEGREE
from sim.model import OWNERSHIP_CHANGE, Settings
from sim.mqtt import ClientFactory, ClientLike, MessageLike, aiomqtt_factory
from sim.policy import APP_STREAM_PREFIX, DEFAULT_POLICY_PATH, Policy, Route, load_policy
from telematics.v1 import command_pb2, common_pb2, privacy_pb2

_LOCATION_RANK: dict[int, int] = {
    common_pb2.LOCATION_APPROXIMATE: 1,
    common_pb2.LOCATION_PRECISE: 2,
}


@dataclass
class CarState:
    settings: Settings | None = None
    window_opened: float | None = None
    # The location anchor: (gateway time it refreshed, coarse point, odometer then).
    anchor: tuple[float, common_pb2.GeoPoint, float | None] | None = None
    # Accepted find_my_car commands of the last hour: [request_id, accepted, until, fixes].
    fmc_commands: list[list[Any]] = field(default_factory=list)
    offset: tuple[float, float] = (0.0, 0.0)  # sticky secret shift, cell fractions [0, 1)
    history: dict[int, Settings] = field(default_factory=dict)  # applied, by revision
    # Messages stating a revision not applied yet (rule 12): (revision, stream, message).
    parked: list[tuple[int, str, Message]] = field(default_factory=list)
    epoch: int = 0  # one more per ownership change: new pseudonyms, a new offset
    floor: int = 0  # settings must be newer than this (the previous owner's last)
    objected: set[str] = field(default_factory=set)  # Art. 21, per feature


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
            await backend.subscribe(f"{self.backend_prefix}/+/msg/+", qos=1)
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
        revision = int(decoded.header.settings_revision)  # type: ignore[attr-defined]
        applied = car.settings.revision if car.settings is not None else 0
        if revision > applied and not self.policy.is_legal_obligation(stream):
            car.parked.append((revision, stream, decoded))
            return
        await self._decide(vin, stream, decoded, payload, car)

    async def _decide(
        self, vin: str, stream: str, decoded: Message, payload: bytes, car: CarState
    ) -> None:
        assert self._backend is not None
        now = self.now()
        window = any(now < c[2] for c in car.fmc_commands)
        if decide_message(self.policy, stream, car.settings, window) != PASS:
            self.dropped += 1
            return
        mode = None
        revision = int(decoded.header.settings_revision)  # type: ignore[attr-defined]
        if revision > 0 and not self.policy.is_legal_obligation(stream):
            # Consent at capture time (rule 11): allowed when captured too, under
            # the stricter location mode of the two (a revision never seen: refused).
            captured = car.history.get(revision)
            if decide_message(self.policy, stream, captured, True) != PASS:
                self.dropped += 1
                return
            assert captured is not None and car.settings is not None
            modes = (car.settings.location, captured.location)
            mode = min(modes, key=lambda m: _LOCATION_RANK.get(m, 0))
            if _LOCATION_RANK.get(mode, 0) == 0:
                mode = common_pb2.LOCATION_OFF
        rule = self.policy.rule_for(stream)
        if rule is not None and rule.requires_window and not self._answer(car, decoded, now):
            self.dropped += 1
            return
        out_payload, ref, transforms = self.transform(vin, stream, decoded, payload, car, mode)
        feature = self.policy.feature_for(stream)
        rule = self.policy.rule_for(stream)
        assert rule is not None
        routes = list(rule.routes.items()) or [("backend", Route())]
        for n, (recipient, route) in enumerate(routes):
            body, to, done = out_payload, ref, list(transforms)
            if n:
                # Another recipient's copy: less than the first one gets.
                copy = type(decoded).FromString(out_payload)
                for name in sorted(route.remove):
                    copy.ClearField(name)
                    done.append(f"{name}:removed")
                if route.pseudonymize_vin and to == vin:
                    to = pseudonym(self.key, f"vin/{stream}|{recipient}", vin)
                    self._pseudonymize_header(copy, to)
                    done.append("vin:pseudonymized")
                body = copy.SerializeToString(deterministic=True)
            declared = self.policy.recipients.get(recipient)
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = [
                ("policy-version", self.policy.version),
                ("feature", feature),
                ("legal-basis", self.policy.legal_basis_for(feature)),
                ("retention-days", str(rule.retention_days)),
                ("transforms", ",".join(done)),
                ("recipient", recipient),
                ("transfer-basis", declared.transfer_basis if declared else "none"),
            ]
            prefix = declared.prefix if declared is not None and declared.prefix else None
            await self._backend.publish(
                f"{prefix or self.backend_prefix}/{to}/{stream}", body, qos=1, properties=properties
            )
        self.forwarded += 1

    def _pseudonymize_header(self, message: Message, ref: str) -> None:
        header = message.header  # type: ignore[attr-defined]
        seq_mac = hmac.new(
            self.key,
            b"header-seq\x00" + ref.encode() + b"\x00" + int(header.seq).to_bytes(8, "big"),
            hashlib.sha256,
        )
        header.vin = ref
        header.seq = int.from_bytes(seq_mac.digest()[:8], "big")
        header.timestamp_ms -= header.timestamp_ms % 60_000

    def _answer(self, car: CarState, fix: Message, now: float) -> bool:
        """Contract rule 17: whether the fix answers an open command with
        budget left (and spend it). No request id (contract v1): the first
        fix of the oldest open command that has had none."""
        request_id = str(getattr(fix, "request_id", ""))
        for command in car.fmc_commands:
            if now >= command[2]:
                continue
            if request_id:
                if command[0] == request_id and command[3] < self.policy.fixes_per_command:
                    command[3] += 1
                    return True
            elif command[3] == 0:
                command[3] = 1
                return True
        return False

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
        if settings.revision <= car.floor or (
            car.settings is not None and settings.revision <= car.settings.revision
        ):
            return
        car.settings = Settings(
            settings.revision, settings.privacy_mode, settings.location, dict(settings.features)
        )
        car.history[settings.revision] = car.settings
        if settings.privacy_mode or not car.settings.enabled("find_my_car"):
            car.window_opened = None
            for command in car.fmc_commands:  # windows close; the cap still counts them
                command[2] = min(command[2], self.now())
        applied = privacy_pb2.PrivacyApplied(
            vin=vin, revision=settings.revision, policy_version=self.policy.version
        )
        await self._vehicle.publish(
            f"{self.vehicle_prefix}/{vin}/avn/privacy/applied", applied.SerializeToString(), qos=1
        )
        ready = [p for p in car.parked if p[0] <= settings.revision]
        car.parked = [p for p in car.parked if p[0] > settings.revision]
        for _, stream, message in ready:
            await self._decide(vin, stream, message, message.SerializeToString(), car)

    def transform(
        self,
        vin: str,
        stream: str,
        message: Message,
        payload: bytes,
        car: CarState,
        mode: int | None = None,
    ) -> tuple[bytes, str, list[str]]:
        if self.policy.is_legal_obligation(stream):
            return payload, vin, []
        rule = self.policy.rule_for(stream)
        assert rule is not None and car.settings is not None
        if mode is None:
            mode = car.settings.location
        transforms: list[str] = []
        approximate = mode == common_pb2.LOCATION_APPROXIMATE
        present: list[tuple[str, str]] = []  # (field, action) of valid points
        for name in geopoint_fields(message):
            if not message.HasField(name):
                continue
            if rule.fields.get(name) == "remove":  # never sent, whatever the mode
                message.ClearField(name)
                transforms.append(f"{name}:removed")
                continue
            point = getattr(message, name)
            if not (math.isfinite(point.latitude) and math.isfinite(point.longitude)) or not (
                -90 <= point.latitude <= 90 and -180 <= point.longitude <= 180
            ):
                message.ClearField(name)  # GPS without a fix
                transforms.append(f"{name}:no_fix")
                continue
            if mode == common_pb2.LOCATION_PRECISE:
                continue
            if not approximate:
                message.ClearField(name)
                transforms.append(f"{name}:removed")
                continue
            present.append((name, rule.fields.get(name, "place")))
        if present:
            self.locate(message, present, car, rule.fields)
            transforms += [f"{name}:approximate" for name, _ in present]
        for name, action in rule.fields.items():
            value = getattr(message, name, None)
            if action in ("odometer", "generalize", "place_text") and value:
                if mode == common_pb2.LOCATION_PRECISE:
                    continue
                if (
                    not approximate
                    or action == "place_text"
                    or (action == "odometer" and (not car.anchor or car.anchor[2] is None))
                ):
                    message.ClearField(name)
                    transforms.append(f"{name}:removed")
                elif action == "odometer":
                    assert car.anchor is not None
                    setattr(message, name, car.anchor[2])
                    transforms.append(f"{name}:anchored")
                elif action == "generalize":
                    step = rule.steps[name]
                    rounded = math.floor(abs(value) / step + 0.5) * step
                    rounded = math.copysign(rounded, value)
                    setattr(message, name, int(rounded) if isinstance(value, int) else rounded)
                    transforms.append(f"{name}:generalized")
                continue
            if action == "enum" and value and value not in rule.enums.get(name, ()):
                message.ClearField(name)
                transforms.append(f"{name}:removed")
                continue
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
            epoch = f"@{car.epoch}" if car.epoch else ""
            scope = stream[len(APP_STREAM_PREFIX) :] + self.policy.app_scope_suffix(stream)
            ref = pseudonym(self.key, f"vin/{scope}{epoch}", vin)
            self._pseudonymize_header(message, ref)
            transforms.append("vin:pseudonymized")
        return message.SerializeToString(deterministic=True), ref, transforms

    def locate(
        self,
        message: Message,
        present: list[tuple[str, str]],
        car: CarState,
        fields: dict[str, str],
    ) -> None:
        """One anchor per car on this gateway's clock: positions show it (and
        refresh it once the interval is over), places the one before this
        message, destinations are coarsened on their own."""
        now = self.now()
        before = car.anchor
        if before is None or now - before[0] >= self.policy.refresh_interval_s:
            source = next((n for n, a in present if a == "position"), None) or next(
                (n for n, a in present if a == "place"), None
            )
            if source is not None:
                odometer = next(
                    (
                        float(getattr(message, n))
                        for n, a in fields.items()
                        if a == "odometer" and getattr(message, n)
                    ),
                    before[2] if before is not None else None,
                )
                car.anchor = (now, self.coarsen(getattr(message, source), car), odometer)
        for name, action in present:
            point = getattr(message, name)
            if action == "destination":
                point.CopyFrom(self.coarsen(point, car))
                continue
            value = car.anchor if action == "position" or before is None else before
            assert value is not None
            point.CopyFrom(value[1])

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
    async def operate(self, vin: str, action: str, feature: str) -> tuple[int, str]:
        """What the control API does for the scenario's DPO: an ownership change
        (consent unknown, new pseudonyms and offset, the car asked again) or an
        objection to a legitimate-interest feature."""
        assert self._vehicle is not None
        car = self.car(vin)
        if action != OWNERSHIP_CHANGE:
            car.objected.add(feature)
            return 200, ""
        floor = max(car.floor, car.settings.revision if car.settings is not None else 0)
        epoch = car.epoch + 1
        digest = hmac.new(
            self.key, f"offset@{epoch}\x00{vin}".encode(), hashlib.sha256
        ).digest()
        self.cars[vin] = CarState(
            offset=(digest[0] / 256, digest[1] / 256), epoch=epoch, floor=floor
        )
        applied = privacy_pb2.PrivacyApplied(
            vin=vin, revision=floor, policy_version=self.policy.version, reprompt=True
        )
        await self._vehicle.publish(
            f"{self.vehicle_prefix}/{vin}/avn/privacy/applied", applied.SerializeToString(), qos=1
        )
        return 200, ""

    async def _on_message_centre(self, vin: str, category: str, payload: bytes) -> None:
        assert self._vehicle is not None and self._backend is not None
        command = command_pb2.Command()
        try:
            command.ParseFromString(payload)
        except DecodeError:
            return
        car = self.car(vin)
        feature = self.policy.messages.get(category)
        settings = car.settings
        if feature is None:
            verdict = "unknown_category"
        elif settings is None:
            verdict = "unknown_vehicle"
        elif settings.privacy_mode:
            verdict = "privacy_mode"
        elif feature in car.objected:
            verdict = f"objected:{feature}"
        elif not self.policy.feature_on(settings, feature):
            verdict = f"feature_disabled:{feature}"
        else:
            verdict = ACCEPT
            await self._vehicle.publish(
                f"{self.vehicle_prefix}/{vin}/avn/msg/{category}", payload, qos=1
            )
        result = command_pb2.CommandResult(
            request_id=command.request_id,
            command=category,
            accepted=verdict == ACCEPT,
            reason="" if verdict == ACCEPT else verdict,
        )
        await self._backend.publish(
            f"{self.backend_prefix}/{vin}/msg/{category}/result", result.SerializeToString(), qos=1
        )

    async def on_backend(self, message: MessageLike) -> None:
        assert self._vehicle is not None and self._backend is not None
        parts = str(message.topic.value).split("/")
        if len(parts) == 4 and parts[2] == "msg":
            await self._on_message_centre(parts[1], parts[3], bytes(message.payload))
            return
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
        if verdict == ACCEPT and name == "find_my_car":
            now = self.now()
            car.fmc_commands = [c for c in car.fmc_commands if now - c[1] < 3600 or now < c[2]]
            if len(car.fmc_commands) >= self.policy.max_commands_per_hour:
                verdict = "rate_limited"
            else:
                car.window_opened = now
                car.fmc_commands.append(
                    [command.request_id, now, now + self.policy.find_my_car_window_s, 0]
                )
        if verdict == ACCEPT:
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
    parser.add_argument(
        "--simulated-clock",
        type=Path,
        default=None,
        help="run time-based rules on the simulator's clock (like the gateway's flag)",
    )
    args = parser.parse_args(argv)
    now: Callable[[], float] = time.time
    if args.simulated_clock is not None:
        from gateway.clock import SimulatedClock

        now = SimulatedClock(args.simulated_clock)
    gateway = ReferenceGateway(
        load_policy(args.policy),
        load_or_create_key(args.state_dir),
        args.vehicle_broker,
        args.backend_broker or args.vehicle_broker,
        announce=True,
        now=now,
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
