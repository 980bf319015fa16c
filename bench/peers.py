"""`python -m bench peers`: the gateway against what its users would deploy instead.

The peer is a Node-RED 4 flow doing the equivalent work on JSON: mqtt in
(QoS 1) -> function (drop what the car's settings disable, snap GeoPoints to
the grid under approximate, delete speed/heading/altitude, drop location
streams under location off) -> mqtt out (QoS 1). Both run against the same
Mosquitto, fed by the same raw-socket load generator and read by the same
receiver, in alternating rounds, on two workloads:

- all-forward: every car known, every feature on, approximate location,
  VehicleStatus with a position (the path that decides capacity);
- mixed: the benchmark fleet's realistic mix (about half is dropped).

What the figures do not show: Node-RED acknowledges each message when it
arrives (no end-to-end guarantee: a crash loses what it holds), parses JSON
instead of protobuf, and does not pseudonymize, truncate addresses, keep
windows or write anything durable. Say so next to its numbers.

Node-RED is installed from npm into a cache directory on first use; without
npm (or the registry) the benchmark says so and stops.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from bench.procs import POLICY, Proc
from bench.report import Target
from bench.suite import (
    Context,
    Variant,
    encode,
    median,
    policy_version,
    run_once,
    stop_variants,
    throughput_figures,
)
from bench.workload import (
    Fleet,
    VehicleMessage,
    make_messages,
    populate_store,
    status_template,
)
from sim.model import ALL_FEATURES, Settings
from sim.scenario import DEFAULT_SIM_START_MS
from telematics.v1 import common_pb2

NODE_RED_SPEC = "node-red@4"
WARMUP = 3_000
READY_MARKER = "Connected to broker"


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or started (said plainly, not a crash)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vehicle-privacy-gateway" / "node-red"


def ensure_node_red(log: Any) -> Path:
    """Path of Node-RED's red.js, installing it into the cache on first use."""
    root = cache_dir()
    red = root / "node_modules" / "node-red" / "red.js"
    if red.exists():
        return red
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise PeerUnavailable("node and npm are needed for the Node-RED peer (Node 20 or later)")
    root.mkdir(parents=True, exist_ok=True)
    log(f"  installing {NODE_RED_SPEC} into {root} (once)")
    result = subprocess.run(
        [npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", NODE_RED_SPEC],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not red.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise PeerUnavailable(
            f"npm could not install {NODE_RED_SPEC} (registry unreachable?): " + " | ".join(tail)
        )
    return red


def node_red_version(red: Path) -> str:
    package = json.loads((red.parent / "package.json").read_text())
    return str(package.get("version", "?"))


# --------------------------------------------------------------------------
# The flow

_FUNCTION = """
const parts = msg.topic.split('/');
const vin = parts[1];
const stream = parts.slice(2).join('/');
if (stream === 'tbox/ecall') {  // legal obligation: untouched
    msg.topic = OUT + '/' + vin + '/' + stream;
    return msg;
}
const car = CARS[vin];
if (car === undefined || car[0]) return null;            // unknown car, privacy mode
let rule = STREAMS[stream];
let feature;
if (rule === undefined && stream.startsWith('avn/app/')) {
    rule = STREAMS['avn/app/{app_id}'];
    feature = 'third_party.' + stream.slice(8);
} else if (rule !== undefined) {
    feature = rule.feature;
}
if (rule === undefined || !car[2].includes(feature)) return null;
if (rule.window) {                                       // find-my-car window
    if (!car[3] || msg.payload.request_id) return null;    // the window answers no request id
    const spent = context.get('fixes') || {};
    if (spent[vin]) return null;                          // one fix per window (rule 17)
    spent[vin] = true;
    context.set('fixes', spent);
}
const mode = car[1];
if (rule.purpose && mode !== 2 && mode !== 3) return null; // location off
const p = msg.payload;
for (const name of rule.geo) {
    const g = p[name];
    if (g === undefined) continue;
    if (mode !== 2 && mode !== 3) { delete p[name]; continue; }
    if (mode === 2) {
        const dlat = CELL / 111320;
        const lat = Math.round(g.latitude / dlat) * dlat;
        const dlon = CELL / (111320 * Math.max(Math.cos(lat * Math.PI / 180), 0.01));
        g.latitude = lat;
        g.longitude = Math.round(g.longitude / dlon) * dlon;
        delete g.speed_kmh; delete g.heading_deg; delete g.altitude_m;
        g.horizontal_accuracy_m = CELL;
    }
}
for (const name of rule.remove) delete p[name];
msg.topic = OUT + '/' + vin + '/' + stream;
return msg;
"""


def _stream_rules() -> dict[str, dict[str, Any]]:
    from gateway.policy import load_policy

    policy = load_policy(POLICY)
    rules: dict[str, dict[str, Any]] = {}
    for stream in policy.streams:
        rules[stream.key] = {
            "feature": stream.feature,
            "geo": [g.name for g in stream.geo_fields],
            "purpose": stream.location_purpose,
            "window": stream.requires_window,
            "remove": [*stream.remove_fields, *stream.place_id_fields],
        }
    return rules


def _car_table(fleet: Fleet) -> dict[str, list[Any]]:
    """vin -> [privacy_mode, location mode, enabled features, window open], with the
    gateway's own reading of a snapshot (defaults included), so both enforce the same."""
    from gateway.core.decide import kept_features, state_from_snapshot
    from gateway.core.state import LocationMode, SettingsSnapshot
    from gateway.policy import load_policy

    policy = load_policy(POLICY)
    table: dict[str, list[Any]] = {}
    for vin, s in fleet.settings.items():
        snapshot = SettingsSnapshot(
            vin=vin,
            revision=s.revision,
            privacy_mode=s.privacy_mode,
            location=LocationMode.parse(s.location),
            features=kept_features(policy, s.features),
            applied_at=0.0,
            policy_version=policy.version,
        )
        state = state_from_snapshot(policy, snapshot)
        table[vin] = [
            state.privacy_mode,
            int(state.location.effective),
            sorted(state.enabled),
            vin in fleet.windows,
        ]
    return table


def write_flow(directory: Path, port: int, fleet: Fleet, in_prefix: str, out_prefix: str) -> None:
    from gateway.policy import load_policy

    cell = load_policy(POLICY).cell_size_m
    constants = (
        f"const OUT = {json.dumps(out_prefix)};\n"
        f"const CELL = {cell};\n"
        f"const STREAMS = {json.dumps(_stream_rules())};\n"
    )
    flow = [
        {"id": "peer-tab", "type": "tab", "label": "privacy"},
        {
            "id": "peer-broker",
            "type": "mqtt-broker",
            "name": "mosquitto",
            "broker": "127.0.0.1",
            "port": str(port),
            "clientid": f"peer-{in_prefix}",
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "5",
            "keepalive": "60",
            "cleansession": True,
            "autoUnsubscribe": True,
        },
        {
            "id": "peer-in",
            "type": "mqtt in",
            "z": "peer-tab",
            "topic": f"{in_prefix}/#",
            "qos": "1",
            "datatype": "json",
            "broker": "peer-broker",
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "wires": [["peer-fn"]],
        },
        {
            "id": "peer-fn",
            "type": "function",
            "z": "peer-tab",
            "name": "privacy rules",
            # The car table is large: a flow-context constant set once, not code per message.
            "initialize": "context.set('cars', " + json.dumps(_car_table(fleet)) + ");",
            "func": constants + "const CARS = context.get('cars');\n" + _FUNCTION,
            "outputs": 1,
            "wires": [["peer-out"]],
        },
        {
            "id": "peer-out",
            "type": "mqtt out",
            "z": "peer-tab",
            "topic": "",
            "qos": "1",
            "retain": "false",
            "broker": "peer-broker",
            "wires": [],
        },
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "flows.json").write_text(json.dumps(flow))
    settings = {
        "uiPort": 0,
        "uiHost": "127.0.0.1",
        "httpAdminRoot": False,
        "httpNodeRoot": False,
        "flowFile": "flows.json",
        "userDir": str(directory),
        "credentialSecret": False,
        "logging": {"console": {"level": "info", "metrics": False, "audit": False}},
    }
    (directory / "settings.js").write_text("module.exports = " + json.dumps(settings) + ";\n")


def start_node_red(red: Path, directory: Path, name: str) -> Proc:
    node = shutil.which("node") or "node"
    # Proc reads stderr for the ready line; Node-RED logs to stdout.
    command = f"exec {node} {red} --settings {directory / 'settings.js'} --userDir {directory} 1>&2"
    return Proc(name, ["sh", "-c", command], READY_MARKER)


# --------------------------------------------------------------------------
# Workloads


def all_forward_fleet(size: int, seed: int = 3) -> Fleet:
    """Every car known, every feature on, approximate location: everything forwards."""
    from sim.vin import make_fleet_vins

    rng = random.Random(f"peers-fleet:{seed}:{size}")
    vins = make_fleet_vins(rng, size, first_serial=200_000)
    on = {feature: True for feature in ALL_FEATURES}
    settings = {vin: Settings(1, False, common_pb2.LOCATION_APPROXIMATE, dict(on)) for vin in vins}
    return Fleet(vins, settings)


def all_forward_messages(fleet: Fleet, count: int, seed: int = 4) -> list[VehicleMessage]:
    """VehicleStatus with a position, one per car-minute. Every one is forwarded,
    so the last proves the backlog is through."""
    rng = random.Random(f"peers-messages:{seed}:{count}")
    status = status_template()
    ms_per_message = 60_000 / max(1, len(fleet.vins))
    out: list[VehicleMessage] = []
    for index in range(count):
        vin = fleet.vins[rng.randrange(len(fleet.vins))]
        message: Any = type(status)()
        message.CopyFrom(status)
        message.position.latitude += rng.uniform(-0.2, 0.2)
        message.position.longitude += rng.uniform(-0.2, 0.2)
        message.header.vin = vin
        message.header.seq = index + 1
        message.header.timestamp_ms = DEFAULT_SIM_START_MS + int(index * ms_per_message)
        out.append(VehicleMessage(vin, "tbox/status", message.SerializeToString()))
    return out


def as_json(messages: list[VehicleMessage]) -> list[VehicleMessage]:
    """The same messages as the peer reads them: proto3 JSON with the .proto field names."""
    from gateway.policy import load_policy

    policy = load_policy(POLICY)
    out = []
    for m in messages:
        route = policy.route(m.stream)
        assert route is not None, m.stream
        message = route[0].message_cls.FromString(m.payload)
        body = json_format.MessageToDict(message, preserving_proto_field_name=True)
        out.append(
            VehicleMessage(m.vin, m.stream, json.dumps(body, separators=(",", ":")).encode())
        )
    return out


# --------------------------------------------------------------------------
# The benchmark


@dataclass
class PeerOptions:
    messages: int = 20_000
    rounds: int = 3
    fleet_size: int = 2_000
    # The gateway's store holds this many days of every car's egress counts
    # (0: a store in its first day, the targets' setting; see
    # bench/egress_store.py for what the days kept cost).
    counts_kept_days: int = 0


def counted_streams() -> list[tuple[str, str]]:
    """(stream, feature) of every stream whose counts a store keeps, app
    streams left out (their features are per app)."""
    from gateway.policy import load_policy

    return [(s.key, s.feature) for s in load_policy(POLICY).streams if "{" not in s.key]


def _start(
    ctx: Context, red: Path, fleet: Fleet, tag: str, floor: bool, counts_kept_days: int = 0
) -> tuple[Variant, Variant, Variant | None]:
    from bench.procs import start_gateway, start_relay, write_gateway_config

    url = ctx.broker.url
    state = ctx.tmp / f"{tag}-gateway-state"
    populate_store(
        state, fleet, policy_version(), counts_kept=(counts_kept_days, counted_streams())
    )
    gvp, gbp = f"{tag}gv", f"{tag}gb"
    config = write_gateway_config(ctx.tmp / "configs", f"{tag}-gateway", gvp, gbp)
    gateway = Variant("gateway", gvp, gbp, start_gateway(f"{tag}-gateway", config, url, state))
    pvp, pbp = f"{tag}pv", f"{tag}pb"
    flow_dir = ctx.tmp / f"{tag}-node-red"
    write_flow(flow_dir, ctx.broker.port, fleet, pvp, pbp)
    peer = Variant("node-red", pvp, pbp, start_node_red(red, flow_dir, f"{tag}-node-red"))
    edge = None
    if floor:
        evp, ebp = f"{tag}ev", f"{tag}eb"
        edge = Variant("edge", evp, ebp, start_relay("edge", f"{tag}-edge", url, evp, ebp))
    started = [v for v in (gateway, peer, edge) if v is not None]
    try:
        for v in started:
            assert v.proc is not None
            v.proc.wait_ready(90)
    except BaseException:
        stop_variants(started)  # none left running behind a failed start
        raise
    time.sleep(0.5)  # Node-RED subscribes just after it logs the connection
    return gateway, peer, edge


def run_workload(
    ctx: Context,
    red: Path,
    name: str,
    fleet: Fleet,
    messages: list[VehicleMessage],
    warmup: list[VehicleMessage],
    rounds: int,
    floor: bool = False,
    counts_kept_days: int = 0,
) -> dict[str, Any]:
    """`floor`: also the gateway's MQTT edge relaying alone (bench/relays.py)."""
    gateway, peer, edge = _start(ctx, red, fleet, name[:2], floor, counts_kept_days)
    variants = [v for v in (gateway, peer, edge) if v is not None]
    json_messages = as_json(messages)
    json_warmup = as_json(warmup)
    raw: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    try:
        packets = {
            v.name: encode(json_messages if v is peer else messages, v.in_prefix) for v in variants
        }
        warm = {v.name: encode(json_warmup if v is peer else warmup, v.in_prefix) for v in variants}
        for v in variants:
            run_once(ctx, v, warm[v.name], rate=None, label=f"warm-{name}-{v.name}")
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                res = run_once(ctx, v, packets[v.name], rate=None, label=f"{name}-{v.name}-{r}")
                fig = throughput_figures(res, len(messages))
                fig["forwarded"] = sum(1 for s in res.seqs if s > 0)
                raw[v.name].append(fig)
                cpu = fig["cpu_us_per_msg"]
                ctx.log(
                    f"  {name} round {r + 1} {v.name:8s} {fig['msg_s']:>8,.0f} msg/s;"
                    f" CPU µs/msg: {v.name} {cpu['system']:.1f}"
                    f" (main thread {cpu['system_main_thread']:.1f}), broker {cpu['broker']:.1f},"
                    f" generator {cpu['generator']:.1f}; forwarded {fig['forwarded']:,}"
                )
                time.sleep(0.3)
    finally:
        stop_variants(variants)

    def med(variant: str, key: str, sub: str | None = None) -> float:
        return median([f[key][sub] if sub else f[key] for f in raw[variant]])

    summary = {
        v: {
            "msg_s": med(v, "msg_s"),
            "cpu_us_per_msg": {
                k: med(v, "cpu_us_per_msg", k)
                for k in ("system", "system_main_thread", "broker", "generator")
            },
            "forwarded": med(v, "forwarded"),
        }
        for v in raw
    }
    ratios = [g["msg_s"] / p["msg_s"] for g, p in zip(raw["gateway"], raw["node-red"], strict=True)]
    return {
        "messages": len(messages),
        "vehicles": len(fleet.vins),
        "raw": raw,
        "median": summary,
        "throughput_gateway_vs_peer": ratios,
        "median_throughput_gateway_vs_peer": median(ratios),
    }


def bench_peers(ctx: Context, options: PeerOptions) -> dict[str, Any]:
    from bench.workload import make_fleet

    red = ensure_node_red(ctx.log)
    result: dict[str, Any] = {
        "peer": f"node-red {node_red_version(red)}",
        "counts_kept_days": options.counts_kept_days,
    }
    fleet = all_forward_fleet(options.fleet_size)
    result["all_forward"] = run_workload(
        ctx,
        red,
        "all_forward",
        fleet,
        all_forward_messages(fleet, options.messages),
        all_forward_messages(fleet, WARMUP, seed=9),
        options.rounds,
        floor=True,
        counts_kept_days=options.counts_kept_days,
    )
    mixed = make_fleet(options.fleet_size)
    result["mixed"] = run_workload(
        ctx,
        red,
        "mixed",
        mixed,
        make_messages(mixed, options.messages, seed=5),
        make_messages(mixed, WARMUP, seed=6),
        options.rounds,
        counts_kept_days=options.counts_kept_days,
    )
    return result


def peer_targets(result: dict[str, Any]) -> list[Target]:
    fwd = result["all_forward"]["median"]
    g, p = fwd["gateway"], fwd["node-red"]
    detail = (
        f"gateway {g['msg_s']:,.0f} msg/s, {g['cpu_us_per_msg']['system']:.1f} µs/msg"
        f" (main thread {g['cpu_us_per_msg']['system_main_thread']:.1f});"
        f" {result['peer']} {p['msg_s']:,.0f} msg/s, {p['cpu_us_per_msg']['system']:.1f} µs/msg"
        " (acknowledges on arrival, no end-to-end guarantee, JSON);"
        f" broker {g['cpu_us_per_msg']['broker']:.1f} µs/msg"
    )
    if "edge" in fwd:  # the gateway's MQTT edge relaying, nothing else: the floor
        e = fwd["edge"]
        detail += (
            f"; MQTT edge alone {e['msg_s']:,.0f} msg/s, {e['cpu_us_per_msg']['system']:.1f} µs/msg"
        )
    if result.get("counts_kept_days"):
        detail += f"; the gateway's store holding {result['counts_kept_days']} days of counts"
    mixed = result["mixed"]["median"]
    # The same CPU figure against what ran beside it: the machine's speed moves
    # 1.5-3x between phases, these ratios much less.
    rounds = result["all_forward"]["raw"]
    per_round = {
        "broker": [
            r["cpu_us_per_msg"]["system"] / r["cpu_us_per_msg"]["broker"] for r in rounds["gateway"]
        ],
        "node-red": [
            g_r["cpu_us_per_msg"]["system"] / p_r["cpu_us_per_msg"]["system"]
            for g_r, p_r in zip(rounds["gateway"], rounds["node-red"], strict=True)
        ],
    }
    if "edge" in rounds:
        per_round["edge"] = [
            g_r["cpu_us_per_msg"]["system"] / e_r["cpu_us_per_msg"]["system"]
            for g_r, e_r in zip(rounds["gateway"], rounds["edge"], strict=True)
        ]
    relative = [
        Target(
            f"gateway CPU per message / {name}'s, all-forward, same rounds (info)",
            median(ratios),
            ">=",
            0.0,
            "x",
            "rounds "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + (
                " (the broker's CPU per message in the gateway's own rounds: the target's"
                " 30 µs was the broker's cost when it was set)"
                if name == "broker"
                else ""
            ),
        )
        for name, ratios in per_round.items()
    ]
    return [
        Target(
            "gateway CPU per forwarded message, all-forward approximate",
            g["cpu_us_per_msg"]["system"],
            "<=",
            30.0,
            "µs",
            detail,
        ),
        Target(
            "throughput gateway / Node-RED, all-forward",
            result["all_forward"]["median_throughput_gateway_vs_peer"],
            ">=",
            1.2,
            "x",
        ),
        Target(
            "throughput gateway / Node-RED, mixed fleet (info)",
            result["mixed"]["median_throughput_gateway_vs_peer"],
            ">=",
            0.0,
            "x",
            f"gateway {mixed['gateway']['msg_s']:,.0f}, Node-RED {mixed['node-red']['msg_s']:,.0f}"
            " msg/s",
        ),
        *relative,
    ]
