"""Several gateway instances on one shared subscription and one PostgreSQL
store (issue 12, items 2 and 3), on real Mosquitto and a private PostgreSQL:
whatever one instance commits before the broker sends a message is enforced
on that message by whichever instance decides it (contract rule 21), one
coarse location per refresh interval and one fix per find-my-car command hold
across instances, and an instance that stops leaves the group first, so the
others take its share and nothing is stranded.

Each test shows that both instances decided some of the car's messages (the
broker shares them round robin), so a leak on either would be seen, and the
weakened variants (no catch-up, no leave) are run to show the tests can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.config import StoreConfig
from gateway.core.state import LocationAnchor
from gateway.policy import load_policy
from gateway.service import VEHICLE, GatewayService
from gateway.store import StoreError
from gateway.store.postgres import PostgresConsentStore
from sim.broker import MosquittoBroker
from sim.postgres import PrivatePostgres
from telematics.v1 import streams_pb2

from .conftest import DEFAULT_POLICY, KEY, VIN, Car, Clients, gateway_config

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Group:
    """In-process instances of one shared group (separate MQTT connections,
    client ids, store connections and change-log origins: what separate
    processes have; tests/test_shared_kill.py runs processes)."""

    broker: MosquittoBroker
    url: str
    root: Path
    running: list[GatewayService] = dataclasses.field(default_factory=list)

    async def start(self, name: str) -> GatewayService:
        config = gateway_config(self.broker.url, self.broker.url, self.root / name)
        config.vehicle_broker.shared_group = "gateways"
        config.instance_id = name
        config.store = StoreConfig(url=self.url)
        store = PostgresConsentStore(
            self.url, config.limits.history_per_vehicle, exclusive=True, instance=name
        )
        service = GatewayService(config, load_policy(DEFAULT_POLICY), KEY, store)
        await service.start()
        await asyncio.wait_for(service.ready.wait(), 10)
        self.running.append(service)
        return service

    async def stop(self, service: GatewayService) -> None:
        self.running.remove(service)
        await service.stop()


@pytest.fixture
async def group(
    postgres: PrivatePostgres, broker: MosquittoBroker, tmp_path: Path
) -> AsyncIterator[Group]:
    harness = Group(broker, postgres.new_database(), tmp_path)
    yield harness
    for service in list(harness.running):
        await harness.stop(service)


def vehicle_received(service: GatewayService) -> float:
    return service.metrics.value("gateway_messages_received_total", source=VEHICLE)


async def settled(services: list[GatewayService], total: float, timeout: float = 15.0) -> None:
    """Until the instances together received `total` vehicle messages and
    every one of them is final (forwarded and acknowledged, or dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(vehicle_received(s) for s in services) >= total and all(
            len(w) == 0 for s in services for w in s._windows.values()
        ):
            await asyncio.sleep(0.1)  # the backend client's copies arrive
            return
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"received {[vehicle_received(s) for s in services]} of {total} in {timeout}s"
    )


def status(car: Car, latitude: float = 48.1, longitude: float = 11.5, v1: bool = False) -> bytes:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0)
    msg.position.latitude, msg.position.longitude = latitude, longitude
    car.header(msg)
    if v1:  # a contract v1 car states no settings revision (no causal token)
        msg.header.settings_revision = 0
    return msg.SerializeToString()


async def both_decide(
    services: list[GatewayService], car: Car, count: int, **kwargs: object
) -> list[float]:
    """Send `count` status messages; how many each instance decided."""
    before = [vehicle_received(s) for s in services]
    for _ in range(count):
        await car.send("tbox/status", status(car, **kwargs))  # type: ignore[arg-type]
    await settled(services, sum(before) + count)
    shares = [vehicle_received(s) - b for s, b in zip(services, before, strict=True)]
    assert all(share > 0 for share in shares), f"one instance decided nothing: {shares}"
    return shares


@contextlib.contextmanager
def no_catch_up(services: list[GatewayService]) -> Iterator[None]:
    """The weakened variant: instances never read each other's changes."""

    async def skip() -> None:
        return None

    saved = [s._catch_up for s in services]
    for service in services:
        service._catch_up = skip  # type: ignore[method-assign]
    try:
        yield
    finally:
        for service, method in zip(services, saved, strict=True):
            service._catch_up = method  # type: ignore[method-assign]


# ------------------------------------------------------------------ rule 21


@pytest.mark.parametrize("weakened", [False, True], ids=["shared", "no-catch-up"])
async def test_a_toggle_applied_on_one_instance_holds_on_the_other_for_a_v1_car(
    group: Group, clients: Clients, weakened: bool
) -> None:
    """A v1 car states no settings revision, so nothing in its messages tells
    the instance that did not apply the change that it is out of date: the
    change log read before deciding is what does. Weakened, it leaks."""
    a, b = await group.start("a"), await group.start("b")
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    await both_decide([a, b], car, 10, v1=True)
    forwarded = len(clients.backend.on("/tbox/status"))
    assert forwarded == 10  # both instances know the car (a loss otherwise)
    with no_catch_up([a, b]) if weakened else contextlib.nullcontext():
        await car.settings(2, features={"remote_control": False})
        await both_decide([a, b], car, 20, v1=True)
    leaked = len(clients.backend.on("/tbox/status")) - forwarded
    if weakened:
        assert leaked > 0  # the instance that did not apply revision 2 forwarded
    else:
        assert leaked == 0


async def test_a_restriction_set_on_one_instance_holds_on_the_other(
    group: Group, clients: Clients
) -> None:
    """An operator's restriction (Art. 18) carries no token in the car's
    messages: whichever instance decides them after it was committed drops
    them; eCall still passes."""
    a, b = await group.start("a"), await group.start("b")
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    await both_decide([a, b], car, 6)
    forwarded = len(clients.backend.on("/tbox/status"))
    assert forwarded == 6
    assert await a.set_restriction(VIN, True, "dpo")
    await both_decide([a, b], car, 20)
    assert len(clients.backend.on("/tbox/status")) == forwarded
    await car.send("tbox/ecall", car.header(streams_pb2.ECall()))
    await clients.backend.wait_for(lambda: bool(clients.backend.on("/tbox/ecall")))
    assert await b.set_restriction(VIN, False, "dpo")  # lifted on the other one
    await asyncio.sleep(1.2)  # past the capture-time margin (rule 11): captured after it
    await both_decide([a, b], car, 6)
    assert len(clients.backend.on("/tbox/status")) == forwarded + 6


async def test_an_erasure_on_one_instance_holds_on_the_other(
    group: Group, clients: Clients
) -> None:
    a, b = await group.start("a"), await group.start("b")
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    await both_decide([a, b], car, 6)
    await a.erase_vehicle(VIN, "dpo")
    await both_decide([a, b], car, 20)  # the car's settings are gone: unknown
    assert len(clients.backend.on("/tbox/status")) == 6
    assert b.state_of(VIN) is None


async def test_one_coarse_location_per_interval_across_instances(
    group: Group, clients: Clients
) -> None:
    """Rule 13: a moving car's approximate position refreshes once per
    interval. Each instance deciding with an anchor of its own would publish
    two coarse values in one interval (the first message on each instance);
    claimed against each other, every copy in the interval is the same."""
    a, b = await group.start("a"), await group.start("b")
    car = clients.car
    await car.settings(1, features={"remote_control": True}, location=2)  # approximate
    before = [vehicle_received(a), vehicle_received(b)]
    for i in range(30):
        # Across grid cells: ~1.1 km apart.
        await car.send("tbox/status", status(car, 48.1 + 0.01 * i, 11.5 + 0.01 * i))
    await settled([a, b], sum(before) + 30)
    assert vehicle_received(a) > before[0] and vehicle_received(b) > before[1]
    values = {
        (m.position.latitude, m.position.longitude)
        for m in (
            streams_pb2.VehicleStatus.FromString(bytes(x.payload))  # type: ignore[arg-type]
            for x in clients.backend.on("/tbox/status")
        )
    }
    assert len(clients.backend.on("/tbox/status")) == 30
    assert len(values) == 1, values


# --------------------------------------------------------------- scale-in


@pytest.mark.parametrize("leave", [True, False], ids=["leaves-first", "no-leave"])
async def test_an_instance_that_stops_strands_nothing(
    group: Group, clients: Clients, leave: bool
) -> None:
    """Scale-in while the car publishes: the stopping instance UNSUBSCRIBEs
    first, decides what it already had, then goes, and the other takes the
    rest. Without leaving first, Mosquitto keeps giving the stopped member's
    persistent session its share (#1747): those messages wait for it to
    come back (here: never), i.e. they are late or lost."""
    await group.start("a")
    b = await group.start("b")
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    if not leave:

        async def stay() -> None:
            return None

        b._leave_share_group = stay  # type: ignore[method-assign]

    async def publish() -> None:
        for _ in range(200):
            await car.send("tbox/status", status(car))
            await asyncio.sleep(0.004)

    before = vehicle_received(b)
    sender = asyncio.create_task(publish())
    await asyncio.sleep(0.3)
    await group.stop(b)
    assert vehicle_received(b) > before  # b had its share when it stopped
    await sender
    if leave:
        await clients.backend.wait_for(
            lambda: len(clients.backend.on("/tbox/status")) >= 200, timeout=15
        )
        assert len(clients.backend.on("/tbox/status")) == 200
    else:
        await asyncio.sleep(2)
        assert len(clients.backend.on("/tbox/status")) < 200


# ------------------------------------------------------------------ store


def test_the_change_log_names_other_instances_changes_in_commit_order(
    postgres: PrivatePostgres,
) -> None:
    from .test_store import snap

    url = postgres.new_database()
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        start = b.change_position()
        a.apply_settings(snap(1, vin="s1"))
        a.save_anchors({"s2": LocationAnchor(1.0, 48.0, 11.0)})
        b.apply_settings(snap(1, vin="s3"))  # b's own: not reported to b
        seen = b.changes_since(start)
        assert seen.states == {"s1"} and seen.anchors == {"s2"}
        assert seen.seq == b.change_position() and not seen.resync
        assert b.changes_since(seen.seq).states == frozenset()
        assert a.changes_since(start).states == {"s3"}
        # Pruned past an instance's position: it reloads everything.
        assert a.prune_changes(kept_s=-1) >= 3
        assert b.changes_since(start).resync
        assert not b.changes_since(b.change_position()).resync
    finally:
        a.close()
        b.close()


def test_anchor_and_find_my_car_claims_fail_when_another_instance_came_first(
    postgres: PrivatePostgres,
) -> None:
    from gateway.core.state import FindMyCarCommand

    url = postgres.new_database()
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        first, second = LocationAnchor(10.0, 48.0, 11.0), LocationAnchor(11.0, 48.5, 11.5)
        assert a.claim_anchor("s1", None, first) is None
        assert b.claim_anchor("s1", None, second) == first  # came second: told a's
        assert b.claim_anchor("s1", 10.0, second) is None  # after a's: its refresh
        position = b.change_position()
        spent = (FindMyCarCommand("r1", 1.0, 100.0, 1),)
        assert a.save_find_my_car("s1", spent, 100.0, a.change_position())
        other = (FindMyCarCommand("r1", 1.0, 100.0, 1),)
        assert not b.save_find_my_car("s1", other, 100.0, position)
        assert b.save_find_my_car("s1", spent, 100.0, b.change_position())
    finally:
        a.close()
        b.close()


def test_a_parked_message_is_refused_when_its_revision_is_applied(
    postgres: PrivatePostgres,
) -> None:
    from gateway.store import ParkedMessage

    from .test_store import snap

    url = postgres.new_database()
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        a.apply_settings(snap(3, vin="s1"))
        row = ParkedMessage("s1", 3, 0.0, 60.0, "tbox/status", 3, b"xyz")
        assert b.park(row, 1 << 20, 1 << 20).applied
        assert b.parked("s1") == []
        assert not b.park(dataclasses.replace(row, revision=4), 1 << 20, 1 << 20).applied
    finally:
        a.close()
        b.close()


def test_instance_leases(postgres: PrivatePostgres) -> None:
    """Two processes as one instance id would take each other's MQTT
    sessions; a gateway outside the group would decide without reading the
    change log: both refused while the other runs."""
    url = postgres.new_database()
    a = PostgresConsentStore(url, exclusive=True, instance="a")
    try:
        with pytest.raises(StoreError, match="instance 'a'"):
            PostgresConsentStore(url, exclusive=True, instance="a")
        with pytest.raises(StoreError, match=r"same vehicle_broker\.shared_group"):
            PostgresConsentStore(url, exclusive=True)
        PostgresConsentStore(url, exclusive=True, instance="b").close()
    finally:
        a.close()
    alone = PostgresConsentStore(url, exclusive=True)
    try:
        with pytest.raises(StoreError, match="without a shared group"):
            PostgresConsentStore(url, exclusive=True, instance="a")
    finally:
        alone.close()
    PostgresConsentStore(url, exclusive=True, instance="a").close()  # its lease ended with it


def test_a_closed_store_leaves_its_locks_before_close_returns(postgres: PrivatePostgres) -> None:
    """The server drops a session's locks when its backend process exits,
    after the client has gone: on a busy machine a successor that claims at
    once found them held ("another gateway is deciding"), which failed a CI
    run. A backend stopped for a second stands in for the busy server."""
    url = postgres.new_database()
    first = PostgresConsentStore(url, exclusive=True)
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    backend = int(row[0])
    os.kill(backend, signal.SIGSTOP)
    resume = threading.Timer(1.0, os.kill, (backend, signal.SIGCONT))
    resume.start()
    try:
        first.close()
        PostgresConsentStore(url, exclusive=True).close()
    finally:
        resume.cancel()
        with contextlib.suppress(ProcessLookupError):  # exited once resumed
            os.kill(backend, signal.SIGCONT)


def test_a_shared_group_needs_a_shared_store(tmp_path: Path) -> None:
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path)
    data = config.model_dump(by_alias=True)
    data["vehicle_broker"]["shared_group"] = "gateways"
    with pytest.raises(ValueError, match="needs \\[store\\] url"):
        type(config).model_validate(data)
    data["store"] = {"url": "postgresql://gw@127.0.0.1/gw"}
    assert type(config).model_validate(data).vehicle_broker.shared_group == "gateways"
    data["backend_broker"]["shared_group"] = "x"
    with pytest.raises(ValueError, match="vehicle_broker only"):
        type(config).model_validate(data)


def test_a_database_the_previous_release_wrote_gets_the_change_log(
    postgres: PrivatePostgres,
) -> None:
    """The previous release's PostgreSQL store had no change log: opening it
    adds the table and triggers (nothing else changes), and from then on a
    write by one store is seen by another."""
    from gateway.store.postgres import POSTGRES_SCHEMA_VERSION, schema_sql

    from .test_store import snap

    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as old:  # what the previous release created
        old.execute(schema_sql())  # type: ignore[arg-type]
        old.execute(
            "INSERT INTO meta VALUES ('schema_version', %s)", (str(POSTGRES_SCHEMA_VERSION),)
        )
        old.execute(
            "INSERT INTO vehicle_settings (vin, revision, privacy_mode, location, features,"
            " applied_at, policy_version, source) VALUES ('s0', 1, 0, 2, '{}', 0, 'v', 'vehicle')"
        )
        assert old.execute("SELECT to_regclass('changes')").fetchone() == (None,)
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        assert [s.snapshot.revision for s in b.load_all()] == [1]  # kept
        start = b.change_position()
        a.apply_settings(snap(2, vin="s0"))
        assert b.changes_since(start).states == {"s0"}
    finally:
        a.close()
        b.close()


# ------------------------------------------- found by review, fixed (kept)


async def test_a_message_parked_while_another_instance_applies_its_revision_is_decided(
    group: Group, clients: Clients
) -> None:
    """Another instance commits the car's first settings between this
    instance's look at the change log and its park: the park is refused (the
    revision is applied), the car is reloaded and claimed, the message goes
    out (it was dropped as settings_pending before the fix)."""
    from .test_store import snap

    a = await group.start("a")
    other = PostgresConsentStore(group.url)
    subject = a.audit_subject(VIN)
    real_park = a.store.park

    def park(row: object, *args: int) -> object:
        other.apply_settings(
            snap(1, vin=subject, features={"remote_control": True}, applied_at=time.time() - 100)
        )
        return real_park(row, *args)  # type: ignore[arg-type]

    a.store.park = park  # type: ignore[method-assign,assignment]
    try:
        car = clients.car
        car.revision = 1  # states revision 1, which nobody applied yet
        await car.send("tbox/status", status(car))
        await settled([a], 1)
        await clients.backend.wait_for(lambda: len(clients.backend.on("/tbox/status")) == 1)
    finally:
        other.close()


async def test_an_erasure_keeps_a_restriction_another_instance_set(
    group: Group, clients: Clients
) -> None:
    a, b = await group.start("a"), await group.start("b")
    await clients.car.settings(1, features={"remote_control": True})
    assert await b.set_restriction(VIN, True, "dpo")
    await a.erase_vehicle(VIN, "dpo")  # a decided no message since b's restriction
    row = a.store.identities()[a.audit_subject(VIN)]
    assert row.restricted  # the restriction outlives the erasure (Art. 18)


async def test_ownership_changes_on_two_instances_start_two_epochs(
    group: Group, clients: Clients
) -> None:
    a, b = await group.start("a"), await group.start("b")
    await clients.car.settings(1, features={"remote_control": True})
    await b.change_ownership(VIN, "dpo")
    await a.change_ownership(VIN, "dpo")
    row = a.store.identities()[a.audit_subject(VIN)]
    assert (row.epoch, row.ownership) == (2, 2)  # never a previous owner's epoch again


async def test_a_parked_message_no_instance_holds_is_released(
    group: Group, clients: Clients
) -> None:
    """A message parked for a revision that was then applied while no
    instance was there to release it (the one that would have stopped):
    the next instance that looks releases it, instead of it expiring."""
    from .test_store import snap

    a = await group.start("a")
    car = clients.car
    await car.settings(1, features={"remote_control": True})
    car.revision = 2  # states a revision nobody applied yet: parked
    await car.send("tbox/status", status(car))
    await settled([a], 2)
    assert a.store.parked(a.audit_subject(VIN))
    await group.stop(a)
    other = PostgresConsentStore(group.url)
    try:  # revision 2 applied (long ago) by an instance that is gone now
        other.apply_settings(
            snap(
                2,
                vin=a.audit_subject(VIN),
                features={"remote_control": True},
                applied_at=time.time() - 1000,
            )
        )
    finally:
        other.close()
    b = await group.start("b")
    await clients.backend.wait_for(lambda: len(clients.backend.on("/tbox/status")) == 1)
    deadline = time.monotonic() + 5
    while b.store.parked(b.audit_subject(VIN)):  # removed once the forward is final
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def test_one_instance_at_a_time_sweeps_orphaned_parked_messages(
    postgres: PrivatePostgres,
) -> None:
    """Two sweepers would each release the same orphan (a duplicate)."""
    url = postgres.new_database()
    a, b = PostgresConsentStore(url), PostgresConsentStore(url)
    try:
        assert a.sweep_lease() and a.sweep_lease()  # held, not stacked
        assert not b.sweep_lease()
        a.close()  # its connection ends: the lease with it
        assert b.sweep_lease()
    finally:
        a.close()
        b.close()


async def test_instances_started_together_on_an_empty_store_all_start(
    group: Group, clients: Clients
) -> None:
    """Each finds no policy recorded and records the configured one: the
    later ones find it active (a version conflict) and run it, not crash."""
    started = await asyncio.gather(*(group.start(name) for name in ("a", "b", "c")))
    versions = {s.ctx.policy.version for s in started}
    assert len(versions) == 1 and all(s.policy_record is not None for s in started)
    assert len(started[0].store.policies()) == 1


def test_rotating_the_key_while_an_instance_runs_is_refused_saying_what_to_do(
    postgres: PrivatePostgres, tmp_path: Path
) -> None:
    from gateway.statedir import StateDirError, rotate_key

    url = postgres.new_database()
    running = PostgresConsentStore(url, exclusive=True, instance="a")
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", tmp_path / "b")
    config.store = StoreConfig(url=url)
    (tmp_path / "b").mkdir(mode=0o700)
    try:
        with pytest.raises(StateDirError, match="Stop every gateway on this database first"):
            rotate_key(config, time.time())
    finally:
        running.close()
