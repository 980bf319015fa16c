"""The benchmark workload: the simulator's realistic message mix, spread over a large fleet.

The simulator (sim.scenario) generates a day in the life of a small fleet:
status, location, battery, trip, digital key, connectivity, eCall, nav,
search, voice and app traffic at their natural frequencies, and the privacy
screens drivers actually set (every location mode, features on and off,
privacy mode). We reuse those messages and settings as templates and deal
them out over a fleet of thousands (or a million) of VINs, re-stamping each
header, so the gateway sees the realistic mix over a realistic number of
distinct vehicles.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

from google.protobuf.message import Message

from gateway.core.identity import subject
from gateway.keys import load_or_create_key
from gateway.store import SqliteConsentStore
from sim.model import (
    ALL_FEATURES,
    MUST_NOT_ARRIVE,
    PublishEvent,
    Settings,
    SettingsEvent,
)
from sim.scenario import DEFAULT_SIM_START_MS, build_scenario
from sim.vin import make_fleet_vins
from telematics.v1 import common_pb2

TEMPLATE_VEHICLES = 150
TEMPLATE_DURATION_S = 24 * 3600
UNKNOWN_SHARE = 0.02  # vehicles that never sent settings (everything off)
WINDOW_SHARE = 0.05  # vehicles with an open find-my-car window (tbox/location passes)


@dataclass(frozen=True)
class Templates:
    messages: tuple[tuple[str, Message], ...]  # (stream, message without header)
    settings: tuple[Settings, ...]  # every privacy screen the drivers set

    def mix(self) -> dict[str, int]:
        counts = Counter(_stream_family(stream) for stream, _ in self.messages)
        return dict(counts.most_common())


def _stream_family(stream: str) -> str:
    return "avn/app/*" if stream.startswith("avn/app/") else stream


@lru_cache(maxsize=2)
def templates(seed: int = 1) -> Templates:
    scenario = build_scenario(seed, TEMPLATE_VEHICLES, TEMPLATE_DURATION_S)
    messages: list[tuple[str, Message]] = []
    settings: list[Settings] = []
    for vehicle in scenario.vehicles:
        for event in vehicle.events:
            if isinstance(event, SettingsEvent):
                settings.append(event.settings)
            elif (
                isinstance(event, PublishEvent)
                and event.message is not None
                and event.purpose not in MUST_NOT_ARRIVE
            ):
                messages.append((event.stream, event.message))
    return Templates(tuple(messages), tuple(settings))


@dataclass
class Fleet:
    vins: list[str]
    settings: dict[str, Settings]  # vehicles without an entry are unknown to the gateway
    windows: set[str] = field(default_factory=set)

    def coverage(self) -> dict[str, object]:
        modes = Counter(common_pb2.LocationMode.Name(s.location) for s in self.settings.values())
        on = Counter(f for s in self.settings.values() for f, v in s.features.items() if v)
        return {
            "vehicles": len(self.vins),
            "with_settings": len(self.settings),
            "unknown": len(self.vins) - len(self.settings),
            "privacy_mode": sum(s.privacy_mode for s in self.settings.values()),
            "find_my_car_window_open": len(self.windows),
            "location_modes": dict(modes),
            "features_on_share": {
                f: round(on[f] / max(1, len(self.settings)), 3) for f in ALL_FEATURES
            },
        }


def make_fleet(size: int, seed: int = 1) -> Fleet:
    rng = random.Random(f"bench-fleet:{seed}:{size}")
    pool = templates(seed).settings
    vins = make_fleet_vins(rng, size, first_serial=0 if size > 900_000 else 100_000)
    settings: dict[str, Settings] = {}
    windows: set[str] = set()
    for vin in vins:
        roll = rng.random()
        if roll < UNKNOWN_SHARE:
            continue
        settings[vin] = rng.choice(pool)
        if roll > 1 - WINDOW_SHARE:
            windows.add(vin)
    return Fleet(vins, settings, windows)


def populate_store(
    state_dir: Path,
    fleet: Fleet,
    policy_version: str,
    *,
    counts_kept: tuple[int, Sequence[tuple[str, str]]] = (0, ()),
) -> Path:
    """Write the fleet's applied settings (and their history) straight into the
    gateway's SQLite store.

    `counts_kept` = (days, [(stream, feature), ...]): also every car's egress
    counts of those streams for that many days before today, as a store in
    service holds them for the streams' retention (the day's counts then go
    in among them; see bench/egress_store.py).

    The schema comes from SqliteConsentStore itself; rows go in with one
    executemany in one transaction (the benchmark's setup, not a measurement).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    # Settings come with the key they were pseudonymized under: the gateway
    # refuses a store with vehicles whose key is missing.
    key = load_or_create_key(state_dir / "pseudonym.key")
    SqliteConsentStore.in_state_dir(state_dir).close()
    path = state_dir / SqliteConsentStore.FILENAME
    # Applied a day before the workload's first capture time (header timestamps
    # start at DEFAULT_SIM_START_MS): every message was captured under them
    # (contract rule 11; settings applied after the capture would drop it).
    now = DEFAULT_SIM_START_MS / 1000 - 86_400
    window_until = time.time() + 4 * 3600  # the gateway runs on the real clock
    encoded: dict[int, str] = {}

    def features_json(settings: Settings) -> str:
        key = id(settings)
        if key not in encoded:
            encoded[key] = json.dumps(settings.features, sort_keys=True, separators=(",", ":"))
        return encoded[key]

    # The store names cars by a keyed hash of the VIN (schema 8), never the VIN.
    rows = sorted(
        (
            subject(key, vin),
            s.revision,
            int(s.privacy_mode),
            s.location,
            features_json(s),
            now,
            policy_version,
            "vehicle",
            window_until if vin in fleet.windows else 0.0,
        )
        for vin, s in fleet.settings.items()
        # Key order: appends to the WITHOUT ROWID b-tree instead of random inserts.
    )
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR REPLACE INTO vehicle_settings (vin, revision, privacy_mode, location,"
            " features, applied_at, policy_version, source, window_until)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
        # And its history row, as the gateway writes with every applied
        # snapshot (contract v2, rule 11): a restart reads both.
        db.execute(
            "INSERT INTO settings_history (vin, revision, privacy_mode, location, features,"
            " applied_at, policy_version, source) SELECT vin, revision, privacy_mode, location,"
            " features, applied_at, policy_version, source FROM vehicle_settings ORDER BY vin"
        )
        days, streams = counts_kept
        today = datetime.now(UTC).date()
        db.executemany(
            "INSERT INTO egress_counts VALUES (?,?,?,?,?,?)",
            sorted(
                (
                    row[0],
                    (today - timedelta(days=d)).isoformat(),
                    stream,
                    feature,
                    policy_version,
                    5,
                )
                for row in rows
                for d in range(1, days + 1)
                for stream, feature in streams
            ),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path


@dataclass(frozen=True)
class VehicleMessage:
    vin: str
    stream: str  # relative topic, e.g. "tbox/status"
    payload: bytes


def make_messages(
    fleet: Fleet, count: int, *, seed: int = 1, vins: list[str] | None = None
) -> list[VehicleMessage]:
    """`count` messages of the realistic mix; header.seq = index + 1 (the receiver's key).

    Each vehicle sends about one message per simulated minute, so header
    timestamps advance like a fleet of this size would make them. The last
    message is a status report of a car whose settings let it through, which
    every variant forwards: its arrival proves everything before it was
    processed (the gateway's ordinary lane keeps arrival order). Not an
    eCall: the gateway sends those on their own lane, ahead of the backlog.
    """
    rng = random.Random(f"bench-messages:{seed}:{count}:{len(fleet.vins)}")
    pool = templates(seed).messages
    vins = vins or fleet.vins
    ms_per_message = 60_000 / max(1, len(vins))
    marker = marker_vin(fleet, vins)
    out: list[VehicleMessage] = []
    for index in range(count):
        stream, template = pool[rng.randrange(len(pool))]
        vin = vins[rng.randrange(len(vins))]
        if index == count - 1:
            stream, template, vin = "tbox/status", status_template(), marker
        message = type(template)()
        message.CopyFrom(template)
        header = message.header  # type: ignore[attr-defined]
        header.vin = vin
        header.seq = index + 1
        header.timestamp_ms = DEFAULT_SIM_START_MS + int(index * ms_per_message)
        # Contract v2 cars state the settings revision they captured under.
        known = fleet.settings.get(vin)
        header.settings_revision = known.revision if known is not None else 0
        out.append(VehicleMessage(vin, stream, message.SerializeToString()))
    return out


def status_template() -> Message:
    """A VehicleStatus with a position, from the simulator's fleet."""
    return next(
        m
        for stream, m in templates().messages
        if stream == "tbox/status" and m.HasField("position")
    )


def marker_vin(fleet: Fleet, vins: list[str] | None = None) -> str:
    """A car whose tbox/status every variant forwards (known, not in privacy mode,
    remote_control on): the run's last message, proving the backlog is through."""
    for vin in vins or fleet.vins:
        settings = fleet.settings.get(vin)
        if settings is None or settings.privacy_mode:
            continue
        if settings.enabled("remote_control"):
            return vin
    raise ValueError("no car of the fleet forwards tbox/status: cannot mark the end of a run")


def settings_payload(vin: str, settings: Settings, revision: int, seq: int) -> bytes:
    changed = Settings(revision, settings.privacy_mode, settings.location, settings.features)
    return changed.to_proto(vin, seq, DEFAULT_SIM_START_MS).SerializeToString()
