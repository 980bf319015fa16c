"""`python -m bench scale-out`: one gateway on SQLite against 1, 2 and 3
instances of one shared group on PostgreSQL (issue 12, item 5).

Every variant decides the same all-forward workload (status reports of known
cars, each forwarded: the path that decides capacity) published at
saturation by one raw-MQTT generator; variants alternate round by round and
medians are quoted. Per variant: messages per second end to end, CPU
microseconds per message of the gateway instances together, of PostgreSQL
(every server process of its database) and of Mosquitto, and PostgreSQL
transactions per message (each statement outside an explicit transaction is
one: the round trips the instances make). On a 2-core machine several
instances share the cores with the broker and the generator: this measures
contention and cost per message, not scaling; capacity is derived from the
CPU per message (docs/scaling.md).

Then the cross-instance probe: with 3 instances, a car's toggle is switched
off, the car's next status report is sent as soon as the gateway confirmed
the change (PrivacyApplied, from whichever instance applied it), and it must
not arrive (whichever instance decides it). Reported: confirmation latency
p50/p99 and the probes that leaked (target 0).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from bench.procs import POLICY, Proc, control_section, cpu_seconds, start_gateway
from bench.suite import Context, encode, median, pct, policy_version
from bench.wire import Publisher, Receiver
from bench.workload import Fleet, VehicleMessage, marker_vin, populate_store, status_template
from gateway.core.identity import subject
from gateway.keys import load_or_create_key, write_key
from gateway.store.postgres import PostgresConsentStore
from sim.model import Settings
from sim.postgres import PrivatePostgres
from sim.scenario import DEFAULT_SIM_START_MS
from telematics.v1 import privacy_pb2, streams_pb2

VARIANTS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3))


@dataclass
class Deployment:
    name: str
    backend: str
    instances: int
    in_prefix: str
    out_prefix: str
    procs: list[Proc] = field(default_factory=list)
    database: str = ""
    url: str = ""
    xacts: int | None = None  # the database's transactions at the end of its last run


def forward_messages(fleet: Fleet, count: int, vins: list[str]) -> list[VehicleMessage]:
    """`count` status reports of cars that have remote_control on and no
    privacy mode (each one forwarded), header.seq = index + 1."""
    template = status_template()
    out = []
    for index in range(count):
        vin = vins[index % len(vins)]
        message = streams_pb2.VehicleStatus()
        message.MergeFromString(template.SerializeToString())
        message.header.vin = vin
        message.header.seq = index + 1
        message.header.timestamp_ms = DEFAULT_SIM_START_MS + index
        message.header.settings_revision = fleet.settings[vin].revision
        out.append(VehicleMessage(vin, "tbox/status", message.SerializeToString()))
    return out


def forwarding_vins(fleet: Fleet) -> list[str]:
    vins = [
        vin
        for vin, s in fleet.settings.items()
        if not s.privacy_mode and s.enabled("remote_control") and vin not in fleet.windows
    ]
    if not vins:
        vins = [marker_vin(fleet)]
    return vins


def populate_postgres(url: str, fleet: Fleet, key: bytes, version: str) -> None:
    """The fleet's applied settings in the shared store (setup, not measured)."""
    store = PostgresConsentStore(url)
    # Applied a day before the workload's first capture time (header timestamps
    # start at DEFAULT_SIM_START_MS): every message was captured under them
    # (contract rule 11; settings applied after the capture would drop it).
    now = DEFAULT_SIM_START_MS / 1000 - 86_400
    try:
        rows = [
            (
                subject(key, vin),
                s.revision,
                int(s.privacy_mode),
                s.location,
                json.dumps(s.features, sort_keys=True, separators=(",", ":")),
                now,
                version,
                "vehicle",
                0.0,
            )
            for vin, s in fleet.settings.items()
        ]
        store._write(
            lambda db: db.executemany(
                "INSERT INTO vehicle_settings (vin, revision, privacy_mode, location, features,"
                " applied_at, policy_version, source, window_until) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
        )
    finally:
        store.close()


def _config(
    directory: Path, name: str, vp: str, bp: str, url: str, instance: str, shared: bool
) -> Path:
    path = directory / f"{name}.toml"
    store = f'\n[store]\nurl = "{url}"\n' if url else ""
    group = f'shared_group = "bench-{name.rsplit("-", 1)[0]}"\n' if shared else ""
    path.write_text(
        f"""policy = "{POLICY}"
state_dir = "{directory / name}"
instance_id = "{instance}"

[vehicle_broker]
client_id = "bench-{name}-{os.getpid()}-vehicle"
topic_prefix = "{vp}"
session_expiry_s = 600
{group}
[backend_broker]
client_id = "bench-{name}-{os.getpid()}-backend"
topic_prefix = "{bp}"

[pipeline]
inflight = 512
{store}
[logging]
level = "INFO"
{control_section()}"""
    )
    return path


def start_deployment(
    ctx: Context, postgres: PrivatePostgres, fleet: Fleet, backend: str, instances: int
) -> Deployment:
    tag = f"so{backend[0]}{instances}"
    deployment = Deployment(f"{backend}-{instances}", backend, instances, f"{tag}v", f"{tag}b")
    base = ctx.tmp / tag
    base.mkdir(parents=True, exist_ok=True)
    version = policy_version()
    if backend == "sqlite":
        state = base / f"{tag}-a"
        populate_store(state, fleet, version)
        config = _config(
            base, f"{tag}-a", deployment.in_prefix, deployment.out_prefix, "", "a", False
        )
        deployment.procs.append(start_gateway(f"{tag}-a", config, ctx.broker.url, state))
    else:
        deployment.url = postgres.new_database()
        deployment.database = deployment.url.rsplit("/", 1)[1]
        key = load_or_create_key(base / "pseudonym.key")
        populate_postgres(deployment.url, fleet, key, version)
        for i in range(instances):
            name = f"{tag}-{chr(ord('a') + i)}"
            state = base / name
            state.mkdir(mode=0o700, exist_ok=True)
            write_key(state / "pseudonym.key", key)
            config = _config(
                base,
                name,
                deployment.in_prefix,
                deployment.out_prefix,
                deployment.url,
                chr(ord("a") + i),
                True,
            )
            deployment.procs.append(start_gateway(name, config, ctx.broker.url, state))
    for proc in deployment.procs:
        proc.wait_ready(120)
    return deployment


# Backends report their transaction counts at most once a second, an idle one
# after up to 10 s: a count read sooner than this after a run misses some.
STATS_FLUSH_S = 11.0


def _postgres_pids(url: str) -> tuple[list[int], int]:
    """Every server process of the private cluster (connections, WAL writer,
    checkpointer, autovacuum) and the database's transactions so far."""
    database = url.rsplit("/", 1)[1]
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        pids = [
            int(r[0])
            for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            ).fetchall()
        ]
        admin.execute("SELECT pg_stat_clear_snapshot()")
        row = admin.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    return pids, int(row[0]) if row else 0


def run_deployment(
    ctx: Context, deployment: Deployment, packets: list[bytes], label: str
) -> dict[str, Any]:
    host, port = ctx.host_port
    total = len(packets)
    receiver = Receiver(host, port, f"recv-{label}", [f"{deployment.out_prefix}/#"])
    publisher = Publisher(host, port, f"gen-{label}")
    receiver.expect(-2)  # count-based: arrival order differs between instances
    pg_pids: list[int] = []
    xacts0 = 0
    if deployment.url:
        # The count as of the end of this database's previous run (read after
        # the backends reported it), or read now.
        pg_pids, xacts_now = _postgres_pids(deployment.url)
        xacts0 = deployment.xacts if deployment.xacts is not None else xacts_now
    broker_pid = ctx.broker.process.pid if ctx.broker.process else 0
    pg0 = {pid: cpu_seconds(pid) for pid in pg_pids}
    cpu0 = {
        "gateways": sum(cpu_seconds(p.process.pid) for p in deployment.procs),
        "broker": cpu_seconds(broker_pid),
    }
    sent_at = [0.0] * total
    started = time.perf_counter()
    publisher.send(packets, sent_at, rate=None)
    deadline = time.monotonic() + 60
    while len(set(receiver.seqs)) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    last = max(receiver.times) if receiver.times else float("nan")
    wall = last - started
    # Processes present at both ends (one that ended mid-run is left out).
    pg1 = {pid: cpu_seconds(pid) for pid in pg0}
    cpu = {
        "gateways": sum(cpu_seconds(p.process.pid) for p in deployment.procs) - cpu0["gateways"],
        "postgresql": sum(max(0.0, pg1[p] - pg0[p]) for p in pg0 if pg1[p] > 0),
        "broker": cpu_seconds(broker_pid) - cpu0["broker"],
    }
    xacts = 0
    if deployment.url:
        time.sleep(STATS_FLUSH_S)
        deployment.xacts = _postgres_pids(deployment.url)[1]
        xacts = deployment.xacts - xacts0
    received = len(set(receiver.seqs))
    publisher.close()
    receiver.close()
    return {
        "received": received,
        "completed": received >= total,
        "msg_s": received / wall if wall > 0 else float("nan"),
        "cpu_us_per_msg": {k: v / total * 1e6 for k, v in cpu.items()},
        "postgresql_transactions_per_msg": xacts / total,
    }


def probe_cross_instance(
    ctx: Context, deployment: Deployment, fleet: Fleet, probes: int
) -> dict[str, Any]:
    """A toggle switched off, the car's next message sent once the gateway
    confirmed it: it must not arrive, whichever instance decides it."""
    host, port = ctx.host_port
    candidates = forwarding_vins(fleet)
    vins = candidates[:probes]
    # Positive control: a car left alone sends at the same moments; its
    # messages must arrive (else "0 leaked" could mean "nothing arrives").
    controls = candidates[probes : 2 * probes] or candidates[:1]
    applied: dict[tuple[str, int], float] = {}
    changed = threading.Condition()
    forwarded: set[int] = set()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if msg.topic.endswith("/avn/privacy/applied"):
            done = privacy_pb2.PrivacyApplied.FromString(bytes(msg.payload))
            with changed:
                applied[(msg.topic.split("/")[1], done.revision)] = now
                changed.notify_all()
        elif msg.topic.endswith("/tbox/status"):
            seq = streams_pb2.VehicleStatus.FromString(bytes(msg.payload)).header.seq
            forwarded.add(seq)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    client.on_message = on_message
    client.connect(host, port)
    sock = client.socket()
    if isinstance(sock, socket.socket):  # no Nagle delay in the measured round trip
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    client.subscribe(
        [
            (f"{deployment.in_prefix}/+/avn/privacy/applied", 1),
            (f"{deployment.out_prefix}/+/tbox/status", 1),
        ]
    )
    time.sleep(0.5)
    latencies: list[float] = []
    probe_seqs: list[int] = []
    control_seqs: list[int] = []
    template = status_template()

    def status_of(vin: str, seq: int) -> bytes:
        message = streams_pb2.VehicleStatus()
        message.MergeFromString(template.SerializeToString())
        message.header.vin = vin
        message.header.seq = seq
        message.header.timestamp_ms = int(time.time() * 1000)
        # A v1 car: no causal token; only the shared store tells the other instances.
        message.header.settings_revision = 0
        return message.SerializeToString()

    try:
        for i, vin in enumerate(vins):
            known = fleet.settings[vin]
            revision = known.revision + 1
            features = dict(known.features, remote_control=False)
            off = Settings(revision, known.privacy_mode, known.location, features)
            payload = off.to_proto(vin, 900_000 + i, DEFAULT_SIM_START_MS).SerializeToString()
            sent = time.perf_counter()
            client.publish(f"{deployment.in_prefix}/{vin}/avn/privacy", payload, qos=1)
            with changed:
                wanted = (vin, revision)
                if not changed.wait_for(lambda w=wanted: w in applied, timeout=10):  # type: ignore[misc]
                    continue
            latencies.append((applied[(vin, revision)] - sent) * 1000)
            probe_seqs.append(800_000 + i)
            client.publish(
                f"{deployment.in_prefix}/{vin}/tbox/status", status_of(vin, 800_000 + i), qos=1
            )
            control = controls[i % len(controls)]
            control_seqs.append(850_000 + i)
            client.publish(
                f"{deployment.in_prefix}/{control}/tbox/status",
                status_of(control, 850_000 + i),
                qos=1,
            )
        time.sleep(2.0)
    finally:
        client.loop_stop()
        client.disconnect()
    return {
        "probes": len(probe_seqs),
        "confirmation_ms_p50": pct(latencies, 50),
        "confirmation_ms_p99": pct(latencies, 99),
        "leaked": len(forwarded & set(probe_seqs)),
        "controls": len(control_seqs),
        "controls_arrived": len(forwarded & set(control_seqs)),
    }


def bench_scale_out(ctx: Context) -> dict[str, Any]:
    opts = ctx.options
    fleet = ctx.fleet(opts.fleet_size)
    vins = forwarding_vins(fleet)
    messages = forward_messages(fleet, opts.flood_messages, vins)
    warmup = forward_messages(fleet, 2_000, vins)
    postgres = PrivatePostgres()
    postgres.start()
    deployments: list[Deployment] = []
    raw: dict[str, list[dict[str, Any]]] = {}
    probe: dict[str, Any] = {}
    try:
        for backend, instances in VARIANTS:
            deployments.append(start_deployment(ctx, postgres, fleet, backend, instances))
        for d in deployments:
            raw[d.name] = []
            run_deployment(ctx, d, encode(warmup, d.in_prefix, 500_000), f"warm-{d.name}")
        packets = {d.name: encode(messages, d.in_prefix) for d in deployments}
        for r in range(opts.rounds):
            for d in deployments:
                fig = run_deployment(ctx, d, packets[d.name], f"so-{d.name}-{r}")
                raw[d.name].append(fig)
                ctx.log(
                    f"  scale-out round {r + 1} {d.name:13s} {fig['msg_s']:>8,.0f} msg/s,"
                    f" gateways {fig['cpu_us_per_msg']['gateways']:5.1f} us/msg,"
                    f" postgresql {fig['cpu_us_per_msg']['postgresql']:5.1f} us/msg,"
                    f" {fig['postgresql_transactions_per_msg']:.3f} tx/msg"
                )
                time.sleep(0.3)
        probe = probe_cross_instance(ctx, deployments[-1], fleet, 40)
        ctx.log(
            f"  cross-instance probes: {probe['probes']}, leaked {probe['leaked']}"
            f" (controls arrived {probe['controls_arrived']}/{probe['controls']});"
            f" confirmation p50 {probe['confirmation_ms_p50']:.1f} ms,"
            f" p99 {probe['confirmation_ms_p99']:.1f} ms"
        )
    finally:
        for d in deployments:
            for proc in d.procs:
                proc.stop()
        postgres.stop()

    def med(name: str, *path: str) -> float:
        """Median over the runs in which every message arrived."""
        values = []
        for fig in raw[name]:
            if not fig["completed"]:
                continue
            value: Any = fig
            for key in path:
                value = value[key]
            values.append(float(value))
        return median(values)

    summary = {
        name: {
            "complete_runs": sum(1 for fig in raw[name] if fig["completed"]),
            "msg_s": med(name, "msg_s"),
            "gateway_cpu_us_per_msg": med(name, "cpu_us_per_msg", "gateways"),
            "postgresql_cpu_us_per_msg": med(name, "cpu_us_per_msg", "postgresql"),
            "broker_cpu_us_per_msg": med(name, "cpu_us_per_msg", "broker"),
            "postgresql_transactions_per_msg": med(name, "postgresql_transactions_per_msg"),
        }
        for name in raw
    }
    base = summary.get("sqlite-1", {}).get("gateway_cpu_us_per_msg", float("nan"))
    return {
        "messages": len(messages),
        "fleet": fleet.coverage(),
        "raw": raw,
        "median": summary,
        "gateway_cpu_vs_sqlite": {
            name: s["gateway_cpu_us_per_msg"] / base if base == base and base else float("nan")
            for name, s in summary.items()
        },
        "probe": probe,
    }


def print_scale_out_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"scale-out: {results['messages']:,} forwarded messages per run (medians)")
    for column in (
        "deployment",
        "msg/s",
        "gateways us/msg",
        "vs SQLite",
        "PostgreSQL us/msg",
        "broker us/msg",
        "PostgreSQL tx/msg",
    ):
        table.add_column(column, justify="right")
    for name, s in results["median"].items():
        table.add_row(
            name,
            f"{s['msg_s']:,.0f}",
            f"{s['gateway_cpu_us_per_msg']:.1f}",
            f"{results['gateway_cpu_vs_sqlite'][name]:.2f}x",
            f"{s['postgresql_cpu_us_per_msg']:.1f}",
            f"{s['broker_cpu_us_per_msg']:.1f}",
            f"{s['postgresql_transactions_per_msg']:.3f}",
        )
    console.print(table)
    probe = results["probe"]
    if probe:
        console.print(
            f"cross-instance probes (3 instances, v1 car, toggle off then its next message):"
            f" {probe['probes']} sent, {probe['leaked']} leaked (target 0), untouched cars'"
            f" messages arrived {probe['controls_arrived']}/{probe['controls']}; confirmation"
            f" p50 {probe['confirmation_ms_p50']:.1f} ms, p99 {probe['confirmation_ms_p99']:.1f} ms"
        )
