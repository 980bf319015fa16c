"""The privacy benchmark through the real gateway over Mosquitto.

`python -m bench privacy --wire`: a small fleet (20 cars, 1 day by default)
publishes on the vehicle side of a private Mosquitto; the gateway runs as its
own process (`python -m gateway run --simulated-clock FILE`: its clock is the
simulated one, compressed `speedup` times); a recorder subscribed to `tsp/#`
(MQTT v5, user properties kept) is the adversary. The recording goes through
the same attacks as the in-process run, and the in-process core decides the
same fleet for comparison: both rows should agree (the adapter keeps state as
the service does).
"""

from __future__ import annotations

import heapq
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.privacy.attacks import public_xy
from bench.privacy.driver import BENCH_KEY, POLICY, WireMessage, stamp_header
from bench.privacy.fleet import (
    DAY_MS,
    LATE_LOCATION_OFF,
    LIVE,
    START_MS,
    Car,
    build_car,
    fleet_vins,
    public_places,
)
from bench.privacy.run import (
    FIND_MY_CAR_POLLS,
    FIND_MY_CAR_STRAY_S,
    Options,
    Tally,
    _leaks_location,
    _score_car,
    policy_info,
    run,
    summarize,
    trip_steps,
)
from bench.procs import Proc, write_gateway_config
from gateway.clock import TimeMapping
from gateway.policy import load_policy
from sim.broker import MosquittoBroker
from sim.mqtt import user_properties
from telematics.v1 import command_pb2, common_pb2, streams_pb2


@dataclass(frozen=True)
class WireOptions:
    cars: int = 20
    days: int = 1
    seed: int = 1
    speedup: float = 1000.0
    find_my_car_cars: int = 3


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[float, str, bytes, tuple[tuple[str, str], ...]]] = []
        self.commands: list[tuple[float, str, bytes]] = []

    def on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        with self.lock:
            if message.topic.startswith("tsp/"):
                props = tuple(user_properties(getattr(message, "properties", None)))
                self.messages.append((now, message.topic, bytes(message.payload), props))
            else:
                self.commands.append((now, message.topic, bytes(message.payload)))


def _client(port: int, name: str, recorder: _Recorder | None = None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    if recorder is not None:
        client.on_message = recorder.on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def run_wire(options: WireOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    policy = load_policy(POLICY)
    places = public_places(options.seed)
    vins = fleet_vins(options.seed, options.cars)
    cars = [build_car(options.seed, i, vin, places, options.days) for i, vin in enumerate(vins)]
    by_vin = {car.truth.vin: car for car in cars}
    polled = [c for c in cars if c.truth.location != common_pb2.LOCATION_OFF][
        : options.find_my_car_cars
    ]
    fmc_start = START_MS + options.days * DAY_MS + 10 * 60_000
    # (sim ms, order, kind, vin, relative or request id, payload)
    queue: list[tuple[int, int, str, str, str, bytes]] = []
    order = 0
    for car in cars:
        for event in car.events:
            order += 1
            queue.append(
                (event.arrival_ms, order, "pub", car.truth.vin, event.relative, event.payload)
            )
    for car in polled:
        for k in range(FIND_MY_CAR_POLLS):
            order += 1
            t = fmc_start + 60_000 * k
            queue.append((t, order, "cmd", car.truth.vin, f"req-{k:03d}", b""))
        for s in range(0, FIND_MY_CAR_POLLS * 60, FIND_MY_CAR_STRAY_S):
            order += 1
            queue.append((fmc_start + s * 1000, order, "fix", car.truth.vin, "", b""))
    heapq.heapify(queue)
    end_ms = max(item[0] for item in queue) + 60_000
    recorder = _Recorder()
    seqs: dict[str, int] = defaultdict(lambda: 20_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(max_inflight=1000).start()
        gateway: Proc | None = None
        clients: list[mqtt.Client] = []
        try:
            config = write_gateway_config(directory, "privacy", "vehicle", "tsp")
            # The bench's operator key, so both runs give each car the same shift.
            state = directory / "state"
            state.mkdir(mode=0o700)
            key_file = state / "pseudonym.key"
            key_file.write_bytes(BENCH_KEY)
            key_file.chmod(0o600)
            clock_file = directory / "clock.json"
            # Far in the future until the fleet starts: the gateway sees time before START.
            TimeMapping(START_MS, time.time() + 3600, options.speedup).write(clock_file)
            gateway = Proc(
                "gateway",
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "run",
                    "--config",
                    str(config),
                    "--vehicle-broker",
                    broker.url,
                    "--backend-broker",
                    broker.url,
                    "--state-dir",
                    str(directory / "state"),
                    "--simulated-clock",
                    str(clock_file),
                ],
                "gateway ready",
            )
            gateway.wait_ready()
            backend = _client(broker.port, "privacy-backend", recorder)
            backend.subscribe("tsp/#", qos=1)
            cars_side = _client(broker.port, "privacy-cars", recorder)
            cars_side.subscribe("vehicle/+/cmd/#", qos=1)
            clients = [backend, cars_side]
            time.sleep(0.5)
            wall_start = time.time() + 0.5
            TimeMapping(START_MS, wall_start, options.speedup).write(clock_file)

            def wall(sim_ms: int) -> float:
                return wall_start + (sim_ms - START_MS) / 1000 / options.speedup

            answered = 0
            log(
                f"  {len(queue):,} events over {(end_ms - START_MS) / 1000 / options.speedup:.0f} s"
            )
            while queue or answered < len(recorder.commands):
                # The car answers each command it received, 3 s later.
                with recorder.lock:
                    fresh = recorder.commands[answered:]
                for received, topic, payload in fresh:
                    answered += 1
                    vin = topic.split("/")[1]
                    command = command_pb2.Command.FromString(payload)
                    sim_ms = START_MS + int((received - wall_start) * options.speedup * 1000)
                    order += 1
                    heapq.heappush(
                        queue, (sim_ms + 3_000, order, "fix", vin, command.request_id, b"")
                    )
                if not queue:
                    time.sleep(0.01)
                    continue
                sim_ms, _order, kind, vin, what, payload = queue[0]
                delay = wall(sim_ms) - time.time()
                if delay > 0:
                    time.sleep(min(delay, 0.005))
                    continue
                heapq.heappop(queue)
                if kind == "pub":
                    cars_side.publish(f"vehicle/{vin}/{what}", payload, qos=1)
                elif kind == "cmd":
                    body = command_pb2.Command(request_id=what, command="find_my_car")
                    backend.publish(f"tsp/{vin}/cmd/find_my_car", body.SerializeToString(), qos=1)
                else:
                    home = by_vin[vin].truth.home
                    fix = streams_pb2.Location(
                        position=common_pb2.GeoPoint(latitude=home.lat, longitude=home.lon)
                    )
                    if what and "request_id" in streams_pb2.Location.DESCRIPTOR.fields_by_name:
                        setattr(fix, "request_id", what)  # noqa: B010
                    seqs[vin] += 1
                    stamp_header(fix, vin, seqs[vin], sim_ms, 0)
                    cars_side.publish(
                        f"vehicle/{vin}/tbox/location", fix.SerializeToString(), qos=1
                    )
            time.sleep(max(0.0, wall(end_ms) - time.time()) + 2.0)
        finally:
            for client in clients:
                client.loop_stop()
                client.disconnect()
            if gateway is not None:
                gateway.stop()
                if gateway.process.stderr is not None:
                    gateway.process.stderr.close()
            broker.stop()
    # What the backend recorded, per car, on the gateway's (simulated) clock.
    wires: dict[str, list[WireMessage]] = defaultdict(list)
    fixes: dict[str, int] = defaultdict(int)
    for received, topic, payload, props in recorder.messages:
        parts = topic.split("/")
        if len(parts) < 3 or parts[2] == "cmd":
            continue
        arrival = START_MS / 1000 + (received - wall_start) * options.speedup
        wires[parts[1]].append(WireMessage(arrival, topic, payload, props))
        if topic.endswith("/tbox/location"):
            fixes[parts[1]] += 1
    tally = Tally()
    for car in cars:
        _count(car, wires.get(car.truth.vin, []), tally)
        _score_car(
            "real",
            car,
            wires.get(car.truth.vin, []),
            tally,
            public_xy(places),
            policy.cell_size_m,
            policy.refresh_interval_ms,
            trip_steps(policy),
        )
    tally.fixes_per_hour = [fixes.get(c.truth.vin, 0) for c in polled]
    wire_options = Options(options.cars, options.days, options.seed, options.find_my_car_cars)
    log("  the same fleet in process")
    in_process = run(wire_options, lambda _text: None)
    through = summarize(
        wire_options,
        policy_info(policy),
        {"cars": len(cars)},
        {"real": tally, "v1": Tally(), "noise": Tally()},
    )
    return {
        "options": vars(options) | {"mode": "wire"},
        "policy": in_process["policy"],
        "attacks": [
            {
                "id": a["id"],
                "title": a["title"],
                "unit": a["unit"],
                "op": a["op"],
                "target": a["target"],
                "in_process": a["real"],
                "through_mosquitto": w["real"],
            }
            for a, w in zip(in_process["attacks"], through["attacks"], strict=True)
            # Scoring a linkage needs which car a pseudonym belongs to: only the
            # in-process adapter knows (the values come from the same code).
            if a["id"] not in IN_PROCESS_ONLY
        ],
        "recorded": len(recorder.messages),
        "seconds": time.perf_counter() - started,
    }


IN_PROCESS_ONLY = ("app_linkage",)


def _count(car: Car, wire: list[WireMessage], tally: Tally) -> None:
    """Utility and late data by matching recorded VIN-stream messages to events."""
    seen: dict[tuple[str, int], bytes] = {}
    for w in wire:
        relative = w.topic.split("/", 2)[2]
        cls = _CLASSES.get(relative)
        if cls is not None:
            seen[(relative, cls.FromString(w.payload).header.seq)] = w.payload
    for event in car.events:
        cls = _CLASSES.get(event.relative)
        if cls is None:
            continue
        payload = seen.get((event.relative, cls.FromString(event.payload).header.seq))
        if event.kind == LIVE and event.allowed:
            tally.counts["allowed"] += 1
            tally.counts["allowed_delivered"] += 1 if payload is not None else 0
        elif event.kind.startswith("late:"):
            tally.counts[f"captured:{event.kind}"] += 1
            leaked = payload is not None and (
                event.kind != LATE_LOCATION_OFF or _leaks_location(event.relative, payload)
            )
            tally.counts[f"leaked:{event.kind}"] += 1 if leaked else 0


_CLASSES: dict[str, Any] = {
    "tbox/status": streams_pb2.VehicleStatus,
    "tbox/trip": streams_pb2.Trip,
    "tbox/battery": streams_pb2.BatteryStatus,
    "tbox/connectivity": streams_pb2.Connectivity,
    "tbox/digital_key": streams_pb2.DigitalKeyEvent,
    "avn/nav": streams_pb2.NavRequest,
}
