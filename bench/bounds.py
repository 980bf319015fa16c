"""`python -m bench bounds`: contract rule 20 ("bounded everything") under attack.

Two floods against the real gateway (a subprocess, its own state directory on
the real disk, one private Mosquitto), each run twice:

* `capped`: the default `[limits]`;
* `uncapped`: limits so high they never trigger (what the gateway did before
  the limits existed: every first settings of a VIN and every revision is a
  history row and an audit entry).

1. Fake-VIN flood: first settings (revision 1) of N made-up valid VINs, as fast
   as the load generator publishes them (or paced: `--flood-rate`).
2. Revision flood: one known car sends N revisions, alternating a feature; the
   last revision must be what is enforced afterwards.

A flood not processed by its deadline (`--flood-timeout`) is measured as it
stands: the real car's messages still waiting count with their wait so far.

Throughout, a real car (settings applied before, `remote_control` on) publishes
a status message every 50 ms and the backend receiver timestamps each arrival:
its latency before, during and after the flood shows what the flood costs the
cars that are not attacking. Also measured: gateway RSS (/proc), consent-store
growth (bytes and rows) and the gateway's own counters (/metrics).
"""

from __future__ import annotations

import json
import random
import re
import secrets
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.procs import Proc, rss_bytes, start_gateway, write_gateway_config
from bench.suite import Context, pct
from bench.wire import Publisher, Receiver, publish_packet
from sim.broker import free_port
from sim.vin import make_vin
from telematics.v1 import common_pb2, privacy_pb2, streams_pb2

FEATURE = "remote_control"  # what tbox/status needs; the feature the revision flood flips
STATUS_STREAM = "tbox/status"
SETTINGS_STREAM = "avn/privacy"
PROBE_SERIAL = 999_999  # VIN serials: fakes count from 0, the two real cars sit at the top
CAR_SERIAL = 999_998
CAR_STATUS_SEQ = 50_000_000  # the flooding car's status after its flood (not a probe seq)
BIG = 1_000_000_000

# Limits that never trigger: the behaviour before [limits] existed.
UNCAPPED_LIMITS: dict[str, float | int] = {
    "new_vehicles_per_s": 1e9,
    "new_vehicles_burst": BIG,
    "settings_per_vehicle": BIG,
    "history_per_vehicle": BIG,
}
VARIANTS: dict[str, dict[str, float | int]] = {"capped": {}, "uncapped": UNCAPPED_LIMITS}


@dataclass
class BoundsOptions:
    vins: int = 100_000
    revisions: int = 100_000
    probe_interval_s: float = 0.05
    idle_s: float = 3.0  # probe alone before the flood (reference latency)
    after_s: float = 5.0  # probe after the flood was processed
    rate: float | None = None  # flood pace (msg/s); None: as fast as the generator can
    # Deadline of one flood, first publish to processed (then measured as it is);
    # None: 180 s, plus the publishing time of a paced flood.
    timeout_s: float | None = None

    def deadline_s(self, messages: int) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return 180.0 + (messages / self.rate if self.rate else 0.0)


# --------------------------------------------------------------------------
# The gateway under test


@dataclass
class Gateway:
    name: str
    proc: Proc
    state: Path
    control_port: int
    token: str
    vehicle_prefix: str
    backend_prefix: str

    @property
    def db(self) -> Path:
        return self.state / "consent.sqlite3"

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body: bytes = response.read()
            return body

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_prometheus(self.get("/metrics").decode())

    def db_bytes(self) -> dict[str, int]:
        sizes = {}
        for suffix in ("", "-wal"):
            path = self.db.with_name(self.db.name + suffix)
            sizes["db" if not suffix else "wal"] = path.stat().st_size if path.exists() else 0
        return sizes

    def query(self, sql: str, params: tuple[object, ...] = ()) -> int:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return int(db.execute(sql, params).fetchone()[0])
        finally:
            db.close()

    def audit_subject(self, vin: str) -> str:
        from gateway.core.transforms import pseudonym
        from gateway.keys import read_key

        return pseudonym(read_key(self.state / "pseudonym.key"), "audit-subject", vin)


def start(ctx: Context, name: str, limits: dict[str, float | int]) -> Gateway:
    from gateway.control.api import hash_token

    token, port = secrets.token_urlsafe(32), free_port()
    vp, bp = f"{name}v", f"{name}b"
    config = write_gateway_config(
        ctx.tmp / "configs", name, vp, bp, limits=limits, control=(port, hash_token(token))
    )
    state = ctx.tmp / f"{name}-state"
    proc = start_gateway(name, config, ctx.broker.url, state)
    proc.wait_ready()
    return Gateway(name, proc, state, port, token, vp, bp)


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counters(gw: Gateway) -> dict[str, float]:
    s = gw.metrics()
    return {
        "received_vehicle": metric(s, "gateway_messages_received_total", source="vehicle"),
        "settings_applied": metric(s, "gateway_settings_applied_total"),
        "settings_merged": metric(s, "gateway_settings_merged_total"),
        "refused_new_vehicle_rate": metric(
            s, "gateway_messages_dropped_total", stream=SETTINGS_STREAM, reason="new_vehicle_rate"
        ),
        "status_feature_disabled": metric(
            s, "gateway_messages_dropped_total", stream=STATUS_STREAM, reason="feature_disabled"
        ),
        "known_vehicles": metric(s, "gateway_known_vehicles"),
    }


def hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM) of a process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------
# Payloads


def settings_payload(vin: str, revision: int, enabled: bool) -> bytes:
    msg = privacy_pb2.PrivacySettings(
        revision=revision, privacy_mode=False, location=common_pb2.LOCATION_OFF
    )
    msg.header.vin = vin
    msg.header.seq = revision
    msg.header.timestamp_ms = int(time.time() * 1000)
    msg.features[FEATURE] = enabled
    return msg.SerializeToString()


def status_payload(vin: str, seq: int) -> bytes:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0, engine_on=False)
    msg.header.vin = vin
    msg.header.seq = seq
    msg.header.timestamp_ms = int(time.time() * 1000)
    return msg.SerializeToString()


def fake_vins(count: int, seed: int = 20) -> list[str]:
    """Valid, made-up VINs (ISO 3779 alphabet, check digit right), all distinct."""
    rng = random.Random(f"bench-bounds:{seed}")
    return [make_vin(rng, serial) for serial in range(count)]


# --------------------------------------------------------------------------
# The real car: a status message every 50 ms


class Probe:
    """Publishes a status message of one known car every `interval` seconds
    (QoS 1, header.seq = 1, 2, ...), recording when each left."""

    def __init__(
        self, host: str, port: int, client_id: str, topic: str, vin: str, interval: float
    ) -> None:
        self.publisher = Publisher(host, port, client_id)
        self.topic, self.vin, self.interval = topic, vin, interval
        self.sent: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def _run(self) -> None:
        sock, clock, seq = self.publisher.conn.sock, time.perf_counter, 0
        due = clock()
        while not self._stop.is_set():
            seq += 1
            packet = publish_packet(
                self.topic, status_payload(self.vin, seq), Publisher.packet_id(seq)
            )
            now = clock()
            sock.sendall(packet)
            self.sent[seq] = now
            due += self.interval
            self._stop.wait(max(0.0, due - clock()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.publisher.close()


def arrivals(receiver: Receiver) -> dict[int, float]:
    n = min(len(receiver.seqs), len(receiver.times))
    out: dict[int, float] = {}
    for seq, t in zip(receiver.seqs[:n], receiver.times[:n], strict=True):
        out.setdefault(seq, t)
    return out


def latency(
    probe: Probe, arrived: dict[int, float], lo: float, hi: float, now: float
) -> dict[str, Any]:
    """Probe messages sent in [lo, hi): arrival - send. One not arrived by `now`
    counts with its wait so far (a lower bound), and is counted as pending."""
    sent = [(seq, t) for seq, t in list(probe.sent.items()) if lo <= t < hi]
    lat = [arrived.get(seq, now) - t for seq, t in sent]
    ms = 1e3
    return {
        "sent": len(sent),
        "pending": sum(seq not in arrived for seq, _t in sent),
        "p50_ms": pct(lat, 50) * ms,
        "p99_ms": pct(lat, 99) * ms,
        "max_ms": max(lat, default=float("nan")) * ms,
    }


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


class AppliedWatch:
    """PrivacyApplied confirmations the receiver got, decoded incrementally."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.seen: dict[tuple[str, int], float] = {}
        self._pos = 0

    def poll(self) -> None:
        side = self.receiver.side
        while self._pos < len(side):
            _topic, payload, t = side[self._pos]
            applied = privacy_pb2.PrivacyApplied.FromString(payload)
            self.seen.setdefault((applied.vin, applied.revision), t)
            self._pos += 1

    def wait(self, vin: str, revision: int, timeout: float) -> float | None:
        def got() -> bool:
            self.poll()
            return (vin, revision) in self.seen

        return self.seen[(vin, revision)] if wait_for(got, timeout, 0.1) else None


# --------------------------------------------------------------------------
# One flood against one variant


@dataclass
class Snapshot:
    rss_bytes: int
    hwm_bytes: int
    db_bytes: int
    wal_bytes: int
    rows: dict[str, int]
    counters: dict[str, float]


RowQueries = dict[str, tuple[str, tuple[object, ...]]]


class FloodRun:
    """A fresh gateway with two known cars (the probe car and `car`, both with
    `remote_control` on), the backend receiver, and the probe car publishing."""

    def __init__(self, ctx: Context, opts: BoundsOptions, kind: str, variant: str) -> None:
        self.ctx, self.opts, self.kind, self.variant = ctx, opts, kind, variant
        self.limits = VARIANTS[variant]
        self.name = f"{kind[:1]}{variant[:1]}"
        self.probe_vin = make_vin(random.Random(1), PROBE_SERIAL)
        self.car_vin = make_vin(random.Random(2), CAR_SERIAL)
        self.gw = start(ctx, f"b{self.name}", self.limits)
        host, port = ctx.host_port
        vp, bp = self.gw.vehicle_prefix, self.gw.backend_prefix
        self.receiver = Receiver(
            host,
            port,
            f"bounds-recv-{self.name}",
            [f"{bp}/#", *(f"{vp}/{v}/avn/privacy/applied" for v in (self.probe_vin, self.car_vin))],
            side_suffix=b"/applied",
        )
        self.applied = AppliedWatch(self.receiver)
        self.probe: Probe | None = None
        self.t_idle = self.t0 = self.t_done = self.deadline = 0.0

    def __enter__(self) -> FloodRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.probe is not None:
            self.probe.stop()
        self.receiver.close()
        self.gw.proc.stop()

    def topic(self, vin: str, stream: str) -> str:
        return f"{self.gw.vehicle_prefix}/{vin}/{stream}"

    def begin(self, rows: RowQueries) -> Snapshot:
        """Make both cars known, start the probe, let it run alone; measure."""
        for vin in (self.probe_vin, self.car_vin):
            self.publish([settings_payload(vin, 1, True)], self.topic(vin, SETTINGS_STREAM))
            if self.applied.wait(vin, 1, 30) is None:
                raise RuntimeError(f"{self.name}: a known car's settings were not applied")
        host, port = self.ctx.host_port
        self.probe = Probe(
            host,
            port,
            f"bounds-probe-{self.name}",
            self.topic(self.probe_vin, STATUS_STREAM),
            self.probe_vin,
            self.opts.probe_interval_s,
        ).start()
        self.t_idle = time.perf_counter()
        time.sleep(self.opts.idle_s)
        return snapshot(self.gw, rows)

    def publish(
        self, payloads: list[bytes], topic: str | None = None, rate: float | None = None
    ) -> float:
        """QoS 1, paced or as fast as the window allows; `topic` None: payloads
        are packets. Returns when the broker has acknowledged every one."""
        host, port = self.ctx.host_port
        packets = (
            payloads
            if topic is None
            else [publish_packet(topic, p, Publisher.packet_id(i)) for i, p in enumerate(payloads)]
        )
        publisher = Publisher(host, port, f"bounds-gen-{self.name}-{secrets.token_hex(3)}")
        try:
            publisher.send(packets, [0.0] * len(packets), rate=rate)
        finally:
            publisher.close()
        return time.perf_counter()

    def flood(self, packets: list[bytes]) -> float:
        self.deadline = self.opts.deadline_s(len(packets))
        self.t0 = time.perf_counter()
        published = self.publish(packets, rate=self.opts.rate)
        self.ctx.log(
            f"  {self.kind} {self.variant}: {len(packets):,} published in"
            f" {published - self.t0:.1f}s"
        )
        return published

    def remaining(self) -> float:
        """Seconds left of this flood's deadline, counted from the first publish."""
        return max(0.0, self.t0 + self.deadline - time.perf_counter())

    def wait_probe_after(self, t: float) -> float | None:
        """Arrival of the first probe message published after `t` (None: not by the
        deadline): the gateway decides vehicle messages in arrival order, so
        everything published before it has been decided."""
        assert self.probe is not None
        probe = self.probe
        found: list[float] = []
        next_log = time.perf_counter() + 30

        def arrived() -> bool:
            nonlocal next_log
            later = [seq for seq, sent in list(probe.sent.items()) if sent > t]
            got = arrivals(self.receiver).get(min(later)) if later else None
            if got is not None:
                found.append(got)
            elif time.perf_counter() > next_log:
                next_log += 30
                c = counters(self.gw)
                self.ctx.log(
                    f"  {self.kind} {self.variant}: waiting,"
                    f" {time.perf_counter() - self.t0:.0f}s: received"
                    f" {c['received_vehicle']:,.0f}, applied {c['settings_applied']:,.0f},"
                    f" refused {c['refused_new_vehicle_rate']:,.0f}"
                )
            return got is not None

        return found[-1] if wait_for(arrived, self.remaining(), 0.1) else None

    def end(self, rows: RowQueries, before: Snapshot, t_done: float | None) -> dict[str, Any]:
        """Probe on after the flood (or its deadline), then measure; every figure."""
        assert self.probe is not None
        completed = t_done is not None
        if t_done is None:
            t_done = time.perf_counter()
            self.ctx.log(
                f"  {self.kind} {self.variant}: [red]not processed[/] within"
                f" {self.deadline:.0f}s; measured as it is"
            )
        else:
            self.ctx.log(
                f"  {self.kind} {self.variant}: processed {t_done - self.t0:.1f}s after the"
                " first publish"
            )
        self.t_done = t_done
        time.sleep(self.opts.after_s)
        t_end = time.perf_counter()
        probe, self.probe = self.probe, None
        probe.stop()
        time.sleep(0.5)  # the last probe messages in flight
        after = snapshot(self.gw, rows)
        arrived, now = arrivals(self.receiver), time.perf_counter()
        return {
            "limits": self.limits or "defaults",
            "completed": completed,
            "deadline_s": self.deadline,
            "processed_s": t_done - self.t0 if completed else float("nan"),
            "before": asdict(before),
            "after": asdict(after),
            "rss_growth_bytes": after.rss_bytes - before.rss_bytes,
            "peak_rss_bytes": after.hwm_bytes,
            "db_wal_growth_bytes": (after.db_bytes + after.wal_bytes)
            - (before.db_bytes + before.wal_bytes),
            "rows_added": {k: after.rows[k] - before.rows[k] for k in after.rows},
            "counters_delta": {k: after.counters[k] - before.counters[k] for k in after.counters},
            "probe": {
                "before": latency(probe, arrived, self.t_idle, self.t0, now),
                "during": latency(probe, arrived, self.t0, t_done, now),
                "after": latency(probe, arrived, t_done, t_end, now),
            },
        }

    def closed_db_bytes(self) -> int:
        """After the gateway stopped: its store closed, the WAL checkpointed."""
        return self.gw.db.stat().st_size


def snapshot(gw: Gateway, rows: RowQueries) -> Snapshot:
    sizes = gw.db_bytes()
    pid = gw.proc.process.pid
    return Snapshot(
        rss_bytes(pid),
        hwm_bytes(pid),
        sizes["db"],
        sizes["wal"],
        {name: gw.query(sql, params) for name, (sql, params) in rows.items()},
        counters(gw),
    )


def bench_vin_flood(
    ctx: Context, opts: BoundsOptions, variant: str, vins: list[str]
) -> dict[str, Any]:
    rows: RowQueries = {
        "vehicle_settings": ("SELECT count(*) FROM vehicle_settings", ()),
        "settings_history": ("SELECT count(*) FROM settings_history", ()),
        "audit_log": ("SELECT count(*) FROM audit_log", ()),
    }
    with FloodRun(ctx, opts, "vin-flood", variant) as run:
        packets = [
            publish_packet(
                run.topic(vin, SETTINGS_STREAM),
                settings_payload(vin, 1, True),
                Publisher.packet_id(i),
            )
            for i, vin in enumerate(vins)
        ]
        before = run.begin(rows)
        published = run.flood(packets)
        t_done = run.wait_probe_after(published)

        def all_counted() -> bool:
            c = counters(run.gw)
            decided = (c["settings_applied"] - before.counters["settings_applied"]) + (
                c["refused_new_vehicle_rate"] - before.counters["refused_new_vehicle_rate"]
            )
            return decided >= len(vins)

        counted = t_done is not None and wait_for(all_counted, 60, 0.5)
        result = run.end(rows, before, t_done)
        result.update({"vins": len(vins), "publish_s": published - run.t0, "all_counted": counted})
    result["db_bytes_closed"] = run.closed_db_bytes()
    delta = result["counters_delta"]
    result["accepted"] = delta["settings_applied"]
    result["refused"] = delta["refused_new_vehicle_rate"]
    return result


def bench_revision_flood(ctx: Context, opts: BoundsOptions, variant: str) -> dict[str, Any]:
    n = opts.revisions
    last = n + 1

    def enabled(revision: int) -> bool:
        # Alternating; the last revision turns the feature off (a gateway that
        # lost track would forward, the privacy-relevant failure).
        return (last - revision) % 2 == 1

    with FloodRun(ctx, opts, "revision-flood", variant) as run:
        car = run.car_vin
        subject = run.gw.audit_subject(car)
        rows: RowQueries = {
            "settings_history": ("SELECT count(*) FROM settings_history WHERE vin=?", (car,)),
            "audit_log": ("SELECT count(*) FROM audit_log WHERE subject=?", (subject,)),
        }
        topic = run.topic(car, SETTINGS_STREAM)
        packets = [
            publish_packet(topic, settings_payload(car, r, enabled(r)), Publisher.packet_id(i))
            for i, r in enumerate(range(2, last + 1))
        ]
        before = run.begin(rows)
        published = run.flood(packets)
        applied_at = run.applied.wait(car, last, run.remaining())
        t_done = run.wait_probe_after(published) if applied_at is not None else None
        result = run.end(rows, before, t_done)
        enforcement: dict[str, Any] = {}
        if t_done is not None:  # after the measurements: the history read costs memory
            # The car's status after the flood must follow the last revision.
            dropped_before = counters(run.gw)["status_feature_disabled"]
            run.publish([status_payload(car, CAR_STATUS_SEQ)], run.topic(car, STATUS_STREAM))
            dropped = wait_for(
                lambda: counters(run.gw)["status_feature_disabled"] > dropped_before, 10, 0.2
            )
            privacy = json.loads(run.gw.get(f"/v1/vehicles/{car}/privacy"))
            enforcement = {
                "status_dropped_feature_disabled": dropped,
                "status_forwarded": CAR_STATUS_SEQ in arrivals(run.receiver),
                "store_revision": (privacy.get("settings") or {}).get("revision"),
                "enforced_features": privacy.get("enforced_features"),
            }
        run.applied.poll()
        confirmations = sorted(t for (vin, _r), t in run.applied.seen.items() if vin == car)
    result["db_bytes_closed"] = run.closed_db_bytes()
    applied_s = applied_at - run.t0 if applied_at is not None else float("nan")
    result.update(
        {
            "revisions": n,
            "last_revision": last,
            "last_revision_enables": enabled(last),
            "applied_s": applied_s,
            "settings_per_s": n / applied_s,
            "confirmations": len(confirmations) - 1,  # minus revision 1
            "enforcement": enforcement,
            # None: the flood was not processed by the deadline, nothing to check yet
            "last_revision_enforced": None
            if not enforcement
            else (
                enforcement["status_dropped_feature_disabled"]
                and not enforcement["status_forwarded"]
                and enforcement["store_revision"] == last
                and FEATURE not in (enforcement["enforced_features"] or [])
            ),
        }
    )
    return result


# --------------------------------------------------------------------------
# Both variants, ratios, the table


def bench_bounds(ctx: Context, opts: BoundsOptions) -> dict[str, Any]:
    vins = fake_vins(opts.vins)
    out: dict[str, Any] = {"options": asdict(opts), "uncapped_limits": UNCAPPED_LIMITS}
    out["vin_flood"] = {v: bench_vin_flood(ctx, opts, v, vins) for v in VARIANTS}
    out["revision_flood"] = {v: bench_revision_flood(ctx, opts, v) for v in VARIANTS}
    for kind in ("vin_flood", "revision_flood"):
        out[kind]["ratios"] = {
            label: ratio(get(out[kind]["capped"]), get(out[kind]["uncapped"]))
            for label, _unit, get in rows_of(kind)
        }
    return out


def ratio(a: float, b: float) -> float:
    if isinstance(a, bool) or isinstance(b, bool):
        return float("nan")
    try:
        return a / b
    except (TypeError, ZeroDivisionError):
        return float("nan")


Getter = Callable[[dict[str, Any]], Any]


def _delta(counter: str) -> Getter:
    return lambda r: r["counters_delta"][counter]


def _probe(phase: str, q: str) -> Getter:
    return lambda r: r["probe"][phase][q]


def rows_of(kind: str) -> list[tuple[str, str, Getter]]:
    """(label, unit, getter) of each table row."""
    common: list[tuple[str, str, Getter]] = [
        ("processed by the deadline", "", lambda r: r["completed"]),
        ("processed (first publish -> done)", "s", lambda r: r["processed_s"]),
        ("gateway RSS growth", "MB", lambda r: r["rss_growth_bytes"] / 1e6),
        ("gateway peak RSS", "MB", lambda r: r["peak_rss_bytes"] / 1e6),
        ("store growth (db + wal, live)", "MB", lambda r: r["db_wal_growth_bytes"] / 1e6),
        ("store after stop (db)", "MB", lambda r: r["db_bytes_closed"] / 1e6),
    ]
    probe: list[tuple[str, str, Getter]] = [
        (f"real car latency {phase} {q}", "ms", _probe(phase, f"{q}_ms"))
        for phase in ("before", "during", "after")
        for q in ("p50", "p99", "max")
    ]
    probe.append(
        (
            "real car messages not arrived by the end",
            "",
            lambda r: sum(p["pending"] for p in r["probe"].values()),
        )
    )
    if kind == "vin_flood":
        return [
            ("fake VINs published", "", lambda r: r["vins"]),
            ("accepted (settings applied)", "", lambda r: r["accepted"]),
            ("refused (new_vehicle_rate)", "", lambda r: r["refused"]),
            ("vehicle_settings rows added", "", lambda r: r["rows_added"]["vehicle_settings"]),
            ("settings_history rows added", "", lambda r: r["rows_added"]["settings_history"]),
            ("audit_log rows added", "", lambda r: r["rows_added"]["audit_log"]),
            *common,
            *probe,
        ]
    return [
        ("revisions published", "", lambda r: r["revisions"]),
        ("applied (PrivacyApplied received)", "", lambda r: r["confirmations"]),
        ("merged (over settings_per_vehicle)", "", _delta("settings_merged")),
        ("settings applied per second", "/s", lambda r: r["settings_per_s"]),
        ("settings_history rows added (car)", "", lambda r: r["rows_added"]["settings_history"]),
        ("audit_log rows added (car)", "", lambda r: r["rows_added"]["audit_log"]),
        ("last revision enforced", "", lambda r: r["last_revision_enforced"]),
        *common,
        *probe,
    ]


def _cell(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "[red]NO[/]"
    if isinstance(value, float) and value != value:
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and unit == "" and value.is_integer()):
        return f"{value:,.0f}"
    if unit in ("MB", "s") or abs(value) < 100:
        return f"{value:,.2f} {unit}".strip()
    return f"{value:,.0f} {unit}".strip()


def print_bounds_table(results: dict[str, Any], console: Console) -> None:
    opts = results["options"]
    pace = "as fast as possible" if opts["rate"] is None else f"{opts['rate']:,.0f} msg/s"
    titles = {
        "vin_flood": f"fake-VIN flood ({opts['vins']:,} made-up VINs, {pace})",
        "revision_flood": f"revision flood (one car, {opts['revisions']:,} revisions, {pace})",
    }
    for kind, title in titles.items():
        table = Table(title=f"bounded everything: {title}")
        table.add_column("measure")
        table.add_column("capped (default limits)", justify="right")
        table.add_column("uncapped", justify="right")
        table.add_column("capped / uncapped", justify="right")
        res = results[kind]
        for label, unit, get in rows_of(kind):
            capped, uncapped = get(res["capped"]), get(res["uncapped"])
            r = res["ratios"][label]
            shown = "" if isinstance(capped, bool) or r is None or r != r else f"{r:.3g}x"
            table.add_row(label, _cell(capped, unit), _cell(uncapped, unit), shown)
        console.print(table)
