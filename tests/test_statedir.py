"""The state directory: one gateway per directory, a stable identity, damaged
state refused at start-up, the pseudonymization key bound to its store, and
state written by the previous release still working."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.control.audit import AuditRecord
from gateway.core.state import LocationMode, SettingsSnapshot
from gateway.edges.mqtt import BrokerEndpoint, MqttEdge
from gateway.keys import load_or_create_key
from gateway.policy import load_policy
from gateway.statedir import StateDir, StateDirError, open_state
from gateway.store import SqliteConsentStore, StoredPolicy, StoreError
from gateway.store import sqlite as store_module
from sim.broker import MosquittoBroker, find_mosquitto
from telematics.v1 import common_pb2, streams_pb2

from .conftest import (
    DEFAULT_POLICY,
    VIN,
    Car,
    GatewayHarness,
    GatewayProcess,
    Recorder,
    subscribe_backend,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "gateway.toml"
UNREACHABLE = "mqtt://127.0.0.1:1"
VEHICLE_ID = "privacy-gateway-vehicle"  # client ids in config/gateway.toml
BACKEND_ID = "privacy-gateway-backend"


def run_gateway(
    state: Path, *extra: str, url: str = UNREACHABLE
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway run` expected to refuse before connecting anywhere.

    A gateway that does not refuse keeps retrying the unreachable broker, so
    the timeout turns "started anyway" into a test failure.
    """
    return subprocess.run(
        [
            sys.executable, "-m", "gateway", "run", "--config", str(CONFIG),
            "--vehicle-broker", url, "--backend-broker", url,
            "--state-dir", str(state), "--control-listen", "", *extra,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess[str], *needles: str | Path) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert str(needle) in result.stderr, result.stderr
    return result.stderr


def snapshot(vin: str = VIN, **features: bool) -> SettingsSnapshot:
    return SettingsSnapshot(
        vin=vin,
        revision=4,
        privacy_mode=False,
        location=LocationMode.PRECISE,
        features=features or {"remote_control": True},
        applied_at=time.time(),
        policy_version="2026.12.1",
    )


def previous_release_state(state: Path, *vins: str) -> bytes:
    """A state directory as the previous release leaves it: its store (with
    the given vehicles) and its key, nothing else, with its file modes."""
    key = load_or_create_key(state / "pseudonym.key")
    store = SqliteConsentStore.in_state_dir(state)
    policy = load_policy(DEFAULT_POLICY)  # recorded by the service at its first start
    now = time.time()
    store.save_policy(
        StoredPolicy(policy.version, policy.digest, policy.text, "config", now, now, True),
        AuditRecord("gateway", "policy_loaded", policy.version, {"version": policy.version}, now),
    )
    for vin in vins:
        store.apply_settings(snapshot(vin))
    store.close()
    db = state / SqliteConsentStore.FILENAME
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key != 'schema_version'")
    for name in ("instance.id", "gateway.lock"):
        (state / name).unlink(missing_ok=True)
    state.chmod(0o755)
    db.chmod(0o644)
    return key


def fingerprint(key: bytes) -> str:
    return hmac.new(key, b"key-fingerprint", hashlib.sha256).hexdigest()[:16]


def stored_meta(state: Path, key: str) -> str | None:
    db = state / SqliteConsentStore.FILENAME
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(state: Path, key: str, value: str) -> None:
    db = state / SqliteConsentStore.FILENAME
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def connected_ids(broker: MosquittoBroker) -> Counter[str]:
    """Client ids the broker accepted, with how many connections each."""
    text = broker.log_path.read_text()
    return Counter(re.findall(r"New client connected from \S+ as (\S+) \(", text))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make `path` unwritable for this process, root included (the immutable
    attribute; permission bits do not stop root)."""
    if os.geteuid() != 0:
        before = mode(path)
        path.chmod(before & ~0o222)
        try:
            yield
        finally:
            path.chmod(before)
        return
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make {path} immutable here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ------------------------------------------------------------ A: one per dir


def test_second_gateway_on_the_same_state_dir_exits_2_naming_the_holder(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = GatewayProcess(broker.url, broker.url, state)
    try:
        second = run_gateway(state, url=broker.url)
        refused(second, f"state directory {state} is in use by pid {first.proc.pid}")
        assert first.proc.poll() is None
        assert (state / "gateway.lock").read_text().strip() == str(first.proc.pid)
        # The refused one never connected: each identity connected exactly once.
        assert set(connected_ids(broker).values()) == {1}
        # Readers need no lock.
        audit = subprocess.run(
            [sys.executable, "-m", "gateway", "audit", "verify", "--state-dir", str(state)],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert audit.returncode == 0, audit.stderr
    finally:
        assert first.terminate() == 0


def test_restart_after_kill_9_takes_the_state_dir_over(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = GatewayProcess(broker.url, broker.url, state)
    first.kill()
    second = GatewayProcess(broker.url, broker.url, state)  # the kernel dropped the lock
    try:
        assert (state / "gateway.lock").read_text().strip() == str(second.proc.pid)
    finally:
        assert second.terminate() == 0


# ------------------------------------------------------- B: stable identity


def test_client_ids_carry_an_instance_id_that_survives_restarts(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    assert GatewayProcess(broker.url, broker.url, state).terminate() == 0
    instance = (state / "instance.id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", instance)
    assert mode(state / "instance.id") == 0o600
    proc = GatewayProcess(broker.url, broker.url, state)
    assert proc.terminate() == 0
    # Same ids after the restart: the persistent session is resumed, never orphaned.
    assert connected_ids(broker) == {
        f"{client}-{instance}{lane}": 2
        for client in (VEHICLE_ID, BACKEND_ID)
        for lane in ("", "-ecall")  # the eCall lane has its own connections
    }
    assert any(f"{VEHICLE_ID}-{instance}" in line for line in proc.lines)


def test_two_state_dirs_on_one_broker_never_collide(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    one = GatewayProcess(broker.url, broker.url, tmp_path / "one")
    try:
        two = GatewayProcess(broker.url, broker.url, tmp_path / "two")
        try:
            time.sleep(1.0)  # a takeover would bounce the connections meanwhile
            assert one.proc.poll() is None and two.proc.poll() is None
        finally:
            assert two.terminate() == 0
    finally:
        assert one.terminate() == 0
    ids = (
        (tmp_path / "one" / "instance.id").read_text(),
        (tmp_path / "two" / "instance.id").read_text(),
    )
    assert ids[0] != ids[1]
    assert "already connected" not in broker.log_path.read_text()
    assert set(connected_ids(broker).values()) == {1}
    for proc in (one, two):
        assert not [line for line in proc.lines if "taken over" in line]


def test_instance_id_flag_names_the_identity_and_is_remembered(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    assert GatewayProcess(broker.url, broker.url, state, "--instance-id", "blue").terminate() == 0
    assert (state / "instance.id").read_text().strip() == "blue"
    assert GatewayProcess(broker.url, broker.url, state).terminate() == 0  # flag dropped
    assert connected_ids(broker) == {
        f"{client}-blue{lane}": 2 for client in (VEHICLE_ID, BACKEND_ID) for lane in ("", "-ecall")
    }


def test_instance_id_config_key(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('instance_id = "edge-7"\n')
    config = load_config(path)
    assert config.instance_id == "edge-7"
    assert config.client_id(config.vehicle_broker) == f"{VEHICLE_ID}-edge-7"
    assert config.client_id(config.backend_broker) == f"{BACKEND_ID}-edge-7"
    path.write_text('instance_id = "two words"\n')
    with pytest.raises(ConfigError, match="instance_id"):
        load_config(path)


def test_legacy_instance_id_keeps_the_configured_client_ids() -> None:
    config = GatewayConfig(instance_id="legacy")
    assert config.client_id(config.vehicle_broker) == VEHICLE_ID
    assert GatewayConfig().client_id(GatewayConfig().backend_broker) == BACKEND_ID


# ------------------------------------------------------ C: session takeover


def takeover_message(client_id: str) -> str:
    return (
        f"vehicle session taken over by another client with id {client_id}: "
        "another gateway instance is using this identity"
    )


async def wait_logged(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    for _ in range(100):
        records = [r for r in caplog.records if r.getMessage() == message]
        if records:
            return records
        await asyncio.sleep(0.05)
    return []


def _mosquitto_version() -> tuple[int, ...]:
    out = subprocess.run(
        [find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    found = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in found.groups()) if found else (0,)


@pytest.mark.skipif(
    _mosquitto_version() < (2, 0, 15),
    reason="mosquitto < 2.0.15 closes a taken-over connection without DISCONNECT 0x8E"
    " (eclipse-mosquitto/mosquitto#2607)",
)
async def test_session_taken_over_at_mosquitto_is_logged(
    gateways: GatewayHarness, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    service = await gateways.start()
    client_id = service.vehicle_edge.client_id
    with (
        caplog.at_level(logging.ERROR, logger="gateway.mqtt"),
        contextlib.suppress(aiomqtt.MqttError),
    ):
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5
        ):
            records = await wait_logged(caplog, takeover_message(client_id))
    assert records and records[0].levelno == logging.ERROR


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = shift = 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return first & 0xF0, await reader.readexactly(length)
        shift += 7


async def test_session_taken_over_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's own MQTT stack against a server that, as MQTT v5 requires
    (and mosquitto >= 2.0.15 does), tells a taken-over client why it goes."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            assert (await _read_packet(reader))[0] == 0x10  # CONNECT
            writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK: accepted, no properties
            kind, body = await _read_packet(reader)
            assert kind == 0x80  # SUBSCRIBE
            writer.write(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK: QoS 1
            if connections == 1:
                writer.write(b"\xe0\x02\x8e\x00")  # DISCONNECT: session taken over
                await writer.drain()
            else:
                while await reader.read(1024):
                    pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    edge = MqttEdge(
        name="vehicle",
        endpoint=BrokerEndpoint("127.0.0.1", port),
        client_id="gw-vehicle-0badcafe",
        subscriptions=["vehicle/#"],
        on_message=lambda message: None,
        clean_start=False,
        session_expiry_s=600,
    )
    task = asyncio.create_task(edge.run())
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.mqtt"):
            records = await wait_logged(caplog, takeover_message("gw-vehicle-0badcafe"))
            assert records and records[0].levelno == logging.ERROR
            # Told apart from a network failure: not also reported as a lost connection.
            assert not [r for r in caplog.records if "connection lost" in r.getMessage()]
    finally:
        await edge.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        await server.wait_closed()


# ---------------------------------------------------- D: damaged consent store


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        ("garbage", "not an SQLite database"),
        ("truncated", "damaged"),
        ("corrupted", "damaged"),
    ],
)
def test_damaged_consent_store_is_refused(tmp_path: Path, damage: str, what: str) -> None:
    state = tmp_path / "state"
    previous_release_state(state, *(f"WVWZZZ1JZXW{i:06d}" for i in range(400)))
    db = state / SqliteConsentStore.FILENAME
    data = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 200)
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 2])
    else:  # a page in the middle overwritten: only an integrity check sees it
        page = 4096
        middle = (len(data) // page // 2) * page
        db.write_bytes(data[:middle] + bytes([0x5A]) * page + data[middle + page :])
    refused(run_gateway(state), db, what)


def test_empty_consent_store_next_to_a_key_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    db = state / SqliteConsentStore.FILENAME
    db.write_bytes(b"")
    err = refused(run_gateway(state), db, state / "pseudonym.key", "empty")
    assert "lost" in err and "remove" in err  # says what happened and how to go on
    assert db.stat().st_size == 0  # nothing was written over the evidence


def test_read_only_consent_store_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    db = state / SqliteConsentStore.FILENAME
    with unwritable(db):
        refused(run_gateway(state), db, "not writable")


def test_read_only_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    with unwritable(state):
        refused(run_gateway(state), state, "not writable")


# ------------------------------------------------------- E: key and its store


def test_missing_key_next_to_a_store_with_vehicles_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    (state / "pseudonym.key").unlink()
    refused(run_gateway(state), state / "pseudonym.key", "missing")
    assert not (state / "pseudonym.key").exists()  # no silent new key


def test_missing_key_next_to_a_store_with_a_fingerprint_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = previous_release_state(state)  # no vehicles yet
    set_meta(state, "key_fingerprint", fingerprint(key))
    (state / "pseudonym.key").unlink()
    refused(run_gateway(state), state / "pseudonym.key", "missing")
    assert not (state / "pseudonym.key").exists()


def test_changed_key_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = previous_release_state(state, VIN)
    set_meta(state, "key_fingerprint", fingerprint(key))
    (state / "pseudonym.key").write_bytes(os.urandom(32))
    err = refused(run_gateway(state), state / "pseudonym.key", "does not match")
    assert fingerprint(key) in err


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (bytes(range(200, 232)) + b"\n", "newline"),
        (os.urandom(32).hex().encode() + b"\n", "hex"),
        (b"q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=", "base64"),
    ],
    ids=["trailing-newline", "hex", "base64"],
)
def test_key_file_in_text_form_is_refused(tmp_path: Path, content: bytes, what: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "pseudonym.key").write_bytes(content)
    err = refused(run_gateway(state), state / "pseudonym.key", what)
    assert "/dev/urandom" in err  # how to make a proper one


def test_a_fresh_state_dir_is_private_and_records_the_key_fingerprint(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = GatewayProcess(broker.url, broker.url, state)
    try:
        names = ["consent.sqlite3", "consent.sqlite3-wal", "consent.sqlite3-shm"]
        names += ["pseudonym.key", "instance.id", "gateway.lock"]
        assert {name: mode(state / name) for name in names} == dict.fromkeys(names, 0o600)
        assert mode(state) == 0o700
    finally:
        assert proc.terminate() == 0
    key = (state / "pseudonym.key").read_bytes()
    assert stored_meta(state, "key_fingerprint") == fingerprint(key)
    # The same key next time: accepted.
    assert GatewayProcess(broker.url, broker.url, state).terminate() == 0


# --------------------------------------------- F: state of the previous release


def _pre_upgrade_session(broker: MosquittoBroker) -> aiomqtt.Client:
    """The previous release's vehicle-side session: same id, same subscription."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=VEHICLE_ID,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=props,
    )


async def test_state_dir_of_the_previous_release_is_upgraded_in_place(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    key = previous_release_state(state)
    store = SqliteConsentStore.in_state_dir(state)
    store.apply_settings(snapshot(remote_control=True, online_navigation=False))
    store.close()
    async with _pre_upgrade_session(broker) as old_gateway:
        await old_gateway.subscribe("vehicle/#", qos=1)
    async with (
        aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="upgrade-backend",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as backend_client,
        aiomqtt.Client("127.0.0.1", broker.port, identifier=f"tbox-{VIN}") as car_client,
    ):  # fmt: skip
        await subscribe_backend(backend_client)
        recorder = Recorder(backend_client)
        car = Car(car_client, recorder)
        await car.subscribe()
        tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
        # Sent during the upgrade, while no gateway runs: queued in the old session.
        queued = car.header(streams_pb2.VehicleStatus(fuel_level_pct=30))
        queued.position.CopyFrom(common_pb2.GeoPoint(latitude=48.1, longitude=11.5))  # type: ignore[attr-defined]
        nav = car.header(streams_pb2.NavRequest(route_id="r1"))
        await car.send("tbox/status", queued)
        await car.send("avn/nav", nav)
        proc = GatewayProcess(broker.url, broker.url, state)
        try:
            await car.barrier()
            statuses = recorder.on("/tbox/status")
            assert [
                streams_pb2.VehicleStatus.FromString(m.payload).header.seq  # type: ignore[arg-type]
                for m in statuses
            ] == [queued.header.seq]  # type: ignore[attr-defined]
            assert recorder.on("/avn/nav") == []  # the stored settings are enforced
        finally:
            for task in tasks:
                task.cancel()
            assert proc.terminate() == 0
    # Exactly the old client ids: the session (and what it queued) was resumed.
    ids = connected_ids(broker)
    assert ids[VEHICLE_ID] == 2 and ids[BACKEND_ID] == 1, ids
    assert (state / "instance.id").read_text().strip() == "legacy"
    assert stored_meta(state, "key_fingerprint") == fingerprint(key)
    assert stored_meta(state, "schema_version") == str(store_module.SCHEMA_VERSION)
    assert mode(state / "consent.sqlite3") == 0o600
    # And it keeps its identity on the next start too.
    assert GatewayProcess(broker.url, broker.url, state).terminate() == 0
    assert connected_ids(broker)[VEHICLE_ID] == 3


# ------------------------------------------------------- open_state, in-process


def state_config(state: Path, instance_id: str | None = None) -> GatewayConfig:
    return GatewayConfig(state_dir=state, instance_id=instance_id)


def test_refusal_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    (state / "pseudonym.key").write_bytes(b"typed by hand, not a key\n")
    with pytest.raises(StateDirError, match="text"):
        open_state(state_config(state))
    assert not (state / "instance.id").exists()
    assert stored_meta(state, "key_fingerprint") is None
    open_state_again = StateDir(state)
    open_state_again.lock()  # and the lock was given back
    open_state_again.unlock()


def test_zero_length_store_without_a_key_is_a_first_start(tmp_path: Path) -> None:
    """A first start that died between creating the file and writing it."""
    state = tmp_path / "state"
    state.mkdir()
    (state / SqliteConsentStore.FILENAME).write_bytes(b"")
    opened = open_state(state_config(state))
    try:
        assert re.fullmatch(r"[0-9a-f]{8}", opened.instance_id)
        assert opened.store.meta("key_fingerprint") == fingerprint(opened.key)
    finally:
        opened.close()


def test_provisioned_key_on_a_fresh_state_dir_is_used(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    key = os.urandom(32)
    (state / "pseudonym.key").write_bytes(key)
    opened = open_state(state_config(state))
    opened.close()
    assert opened.key == key
    assert stored_meta(state, "key_fingerprint") == fingerprint(key)


def test_previous_release_store_without_vehicles_keeps_its_client_ids(tmp_path: Path) -> None:
    """It ran (its policy is recorded), so its session is under the bare ids."""
    state = tmp_path / "state"
    previous_release_state(state)
    opened = open_state(state_config(state))
    opened.close()
    assert opened.instance_id == "legacy"
    # Once upgraded, it stays what it is.
    again = open_state(state_config(state))
    again.close()
    assert again.instance_id == "legacy"


def test_configured_instance_id_wins_and_is_remembered(tmp_path: Path) -> None:
    state = tmp_path / "state"
    previous_release_state(state, VIN)
    opened = open_state(state_config(state, "green"))
    opened.close()
    assert opened.instance_id == "green"
    again = open_state(state_config(state))
    again.close()
    assert again.instance_id == "green"


def test_damaged_instance_id_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "instance.id").write_bytes(b"\x00\xff garbage")
    with pytest.raises(StateDirError, match=r"instance\.id"):
        open_state(state_config(state))


def test_older_schema_is_migrated_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / SqliteConsentStore.FILENAME
    store = SqliteConsentStore(db)
    store.apply_settings(snapshot())
    store.close()
    current = store_module.SCHEMA_VERSION
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(
        store_module,
        "MIGRATIONS",
        {
            **store_module.MIGRATIONS,
            current + 1: ("ALTER TABLE restrictions ADD COLUMN reason TEXT NOT NULL DEFAULT ''",),
        },
    )
    upgraded = SqliteConsentStore(db)
    try:
        assert upgraded.meta("schema_version") == str(current + 1)
        assert [v.snapshot.vin for v in upgraded.load_all()] == [VIN]
        assert upgraded.restriction(VIN) is None  # the new column is there, data kept
    finally:
        upgraded.close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", current)
    with pytest.raises(StoreError, match="newer gateway"):
        SqliteConsentStore(db)
