"""Recipients and transfers (issue 14, item 1; notice L563-587, L931-934).

The policy names who receives each stream, where (an egress prefix per
recipient) and under which transfer basis; validation refuses a third-country
route without a basis and a stream keyed by VIN for one recipient and by
pseudonym for another unless they are separate controllers (rules 15-16).
On real Mosquitto and SQLite: each recipient gets its own copy, a refused
copy becomes a dead letter of that recipient alone, and a re-drive sends only
that copy again.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gateway.core import DecisionContext, Forward, LocationMode, VehicleState, decide
from gateway.core.identity import subject
from gateway.policy import (
    PolicyError,
    check_egress,
    load_policy,
    parse_policy,
    widened_streams,
)
from gateway.store import SqliteConsentStore
from gateway.store.sqlite import SCHEMA_VERSION
from sim.broker import MosquittoBroker
from telematics.v1 import common_pb2, streams_pb2

from .conftest import KEY, VIN, Clients, GatewayHarness, user_properties
from .test_fault_isolation import OPEN_ACL, running

DEFAULT = Path(__file__).resolve().parents[1] / "config" / "policy.yaml"
NOW = 1_800_000_000.0


def document() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def problems(doc: dict) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as err:
        parse_policy(yaml.safe_dump(doc))
    return err.value.problems


# ------------------------------------------------------------------ validation


def test_default_policy_declares_the_notices_recipients() -> None:
    policy = load_policy(DEFAULT)
    recipients = policy.document.recipients
    assert recipients["developer"].region == "CN"
    assert recipients["developer"].transfer_basis == "scc"
    assert recipients["developer"].role == "processor"
    assert recipients["map_provider"].role == "controller"
    assert recipients["app_providers"].transfer_basis == "explicit_consent"
    routes = {s.key: [r.recipient for r in s.routes] for s in policy.streams}
    assert routes["tbox/status"] == ["developer"]
    assert routes["avn/nav"] == ["developer", "map_provider"]
    assert routes["avn/app/{app_id}"] == ["app_providers"]


def test_third_country_without_a_basis_is_refused() -> None:
    doc = document()
    doc["recipients"]["developer"]["transfer_basis"] = "none"
    assert any(
        path == "recipients.developer.transfer_basis" and "third country" in msg
        for path, msg in problems(doc)
    )


def test_adequacy_only_where_a_decision_exists() -> None:
    doc = document()
    doc["recipients"]["developer"]["transfer_basis"] = "adequacy"
    assert any("no adequacy decision covers CN" in msg for _, msg in problems(doc))
    doc["recipients"]["developer"]["region"] = "JP"
    parse_policy(yaml.safe_dump(doc))  # Japan has one


def test_an_eea_recipient_is_no_transfer() -> None:
    doc = document()
    doc["recipients"]["map_provider"]["transfer_basis"] = "scc"
    assert any("in the EEA" in msg for _, msg in problems(doc))


def test_explicit_consent_derogation_needs_a_consent_based_stream() -> None:
    doc = document()
    doc["streams"]["tbox/status"]["recipients"] = {"app_providers": {}}
    assert any(
        path == "streams.tbox/status.recipients.app_providers" and "Art. 49(1)(a)" in msg
        for path, msg in problems(doc)
    )


def test_vin_and_pseudonym_to_one_controller_are_refused() -> None:
    """Rules 15-16: the developer (a processor of the operator) and a second
    processor of the operator get the same search at the same moment, one by
    VIN and one by pseudonym: the operator could pair them."""
    doc = document()
    doc["recipients"]["map_provider"] = {
        "name": "a processor",
        "role": "processor",
        "region": "DE",
        "egress_prefix": "map",
    }
    found = problems(doc)
    assert any(
        path == "streams.avn/search.recipients" and "could pair the two" in msg
        for path, msg in found
    ), found
    # The same keying for both is fine.
    doc["streams"]["avn/search"]["recipients"]["map_provider"] = {}
    doc["streams"]["avn/nav"]["recipients"]["map_provider"] = {"remove": ["route_id"]}
    parse_policy(yaml.safe_dump(doc))


def test_a_processor_serves_a_declared_controller() -> None:
    doc = document()
    doc["recipients"]["developer"]["controller"] = "nobody"
    assert any("neither 'operator' nor a declared controller" in m for _, m in problems(doc))


def test_unknown_recipients_duplicate_prefixes_and_legal_obligation() -> None:
    doc = document()
    doc["streams"]["tbox/status"]["recipients"] = {"nobody": {}}
    doc["recipients"]["app_providers"]["egress_prefix"] = "map"
    doc["streams"]["tbox/ecall"]["recipients"] = {"developer": {}, "map_provider": {}}
    found = problems(doc)
    assert any("unknown recipient 'nobody'" in m for _, m in found)
    assert any(p.endswith(".egress_prefix") and "map is also" in m for p, m in found)
    assert any("exactly one recipient" in m for _, m in found)


def test_a_recipient_on_the_gateways_own_prefix_is_refused() -> None:
    policy = load_policy(DEFAULT)
    assert check_egress(policy, "vehicle", "tsp") == []
    assert check_egress(policy, "map", "tsp")[0][0] == "recipients.map_provider.egress_prefix"


def test_a_policy_without_recipients_keeps_one_backend() -> None:
    """Policies stored before recipients existed still load and route as before."""
    doc = document()
    del doc["recipients"]
    for spec in doc["streams"].values():
        spec.pop("recipients", None)
    policy = parse_policy(yaml.safe_dump(doc))
    assert {tuple(r.recipient for r in s.routes) for s in policy.streams} == {("backend",)}


def test_a_new_recipient_widens_the_consent() -> None:
    """A consent given for online search covers the recipients of that version."""
    doc = document()
    older = parse_policy(yaml.safe_dump(doc))
    del doc["streams"]["avn/search"]["recipients"]["map_provider"]
    narrower = parse_policy(yaml.safe_dump(doc))
    assert "avn/search" in widened_streams(older, narrower)
    assert "avn/search" not in widened_streams(narrower, older)
    doc = document()
    doc["streams"]["avn/nav"]["recipients"]["map_provider"]["remove"] = []
    assert "avn/nav" in widened_streams(parse_policy(yaml.safe_dump(doc)), older)


# ------------------------------------------------------------------ decisions


def _nav(vin: str = VIN) -> bytes:
    msg = streams_pb2.NavRequest(route_id="r1", traffic_requested=True)
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    msg.destination.latitude, msg.destination.longitude = 48.2, 11.6
    msg.header.vin, msg.header.seq, msg.header.timestamp_ms = vin, 7, int(NOW * 1000) + 12_345
    return msg.SerializeToString()


def test_each_recipient_gets_its_own_copy() -> None:
    ctx = DecisionContext(load_policy(DEFAULT), KEY)
    state = VehicleState(
        revision=1,
        privacy_mode=False,
        location=LocationMode.PRECISE,
        enabled=frozenset({"online_navigation"}),
    )
    d = decide(ctx, f"vehicle/{VIN}/avn/nav", _nav(), {VIN: state}, {}, NOW)
    assert isinstance(d, Forward)
    assert d.topic == f"tsp/{VIN}/avn/nav" and d.recipient == "developer"
    props = dict(d.user_properties)
    assert props["recipient"] == "developer" and props["transfer-basis"] == "scc"
    developer = streams_pb2.NavRequest.FromString(d.payload)
    assert developer.route_id == "r1" and developer.header.vin == VIN
    (other,) = d.also
    ref = other.topic.split("/")[1]
    assert other.topic == f"map/{ref}/avn/nav" and other.recipient == "map_provider"
    assert VIN not in other.topic and VIN.encode() not in other.payload
    got = streams_pb2.NavRequest.FromString(other.payload)
    assert got.route_id == "" and got.header.vin == ref  # less than the developer
    assert got.header.seq != 7 and got.header.timestamp_ms % 60_000 == 0
    assert got.destination == developer.destination
    other_props = dict(other.user_properties)
    assert other_props["recipient"] == "map_provider"
    assert other_props["transfer-basis"] == "none"
    assert "remove:route_id" in other_props["transforms"].split(",")
    assert "pseudonymize:vin" in other_props["transforms"].split(",")
    assert "remove:route_id" not in props["transforms"]


# ------------------------------------------------------- on Mosquitto and SQLite


async def test_recipients_on_the_wire(gateways: GatewayHarness, clients: Clients) -> None:
    await gateways.start()
    car = clients.car
    features = {"online_navigation": True, "third_party.music": True}
    await car.settings(1, features=features, location=common_pb2.LOCATION_PRECISE)
    msg = streams_pb2.NavRequest(route_id="r9")
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    await car.send("avn/nav", car.header(msg))
    await car.send("avn/app/music", car.header(streams_pb2.AppTraffic(app_id="music")))
    await car.barrier()
    await clients.backend.wait_for(lambda: len(clients.backend.on("/avn/nav")) == 2)
    (developer,) = clients.backend.on("/avn/nav", "tsp/")
    (mapped,) = clients.backend.on("/avn/nav", "map/")
    assert str(developer.topic) == f"tsp/{VIN}/avn/nav"
    assert user_properties(developer)["recipient"] == "developer"
    assert user_properties(mapped)["transfer-basis"] == "none"
    assert streams_pb2.NavRequest.FromString(mapped.payload).route_id == ""  # type: ignore[arg-type]
    (app,) = clients.backend.on("/avn/app/music")
    assert str(app.topic).startswith("apps/") and VIN not in str(app.topic)
    assert user_properties(app)["transfer-basis"] == "explicit_consent"


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_refused_recipient_is_a_dead_letter_of_its_own(tmp_path: Path) -> None:
    """The backend broker refuses the map provider's copy (its ACL): the
    developer still gets its copy, the map provider's becomes a dead letter
    naming it; re-driven once the ACL allows it, only the map provider's copy
    is sent again (the developer gets no duplicate)."""
    with MosquittoBroker(acl=OPEN_ACL + "topic deny map/+/avn/nav\n") as broker:
        async with running(broker, tmp_path) as (harness, clients):
            service = await harness.start()
            car, backend = clients.car, clients.backend
            features = {"online_navigation": True}
            await car.settings(1, features=features, location=common_pb2.LOCATION_PRECISE)
            msg = streams_pb2.NavRequest(route_id="r1")
            msg.position.latitude, msg.position.longitude = 48.1, 11.5
            await car.send("avn/nav", car.header(msg))
            await car.barrier()
            await backend.wait_for(lambda: len(backend.on("/avn/nav")) == 1)
            await _until(lambda: service.store.dead_letter_count() == 1)
            (letter,) = service.store.dead_letters()
            assert (letter.recipient, letter.stream, letter.reason) == (
                "map_provider",
                "avn/nav",
                "not_authorized",
            )
            assert [str(m.topic).split("/")[0] for m in backend.on("/avn/nav")] == ["tsp"]
            broker.reload(OPEN_ACL)
            await asyncio.sleep(0.5)  # the broker re-reads its ACL on SIGHUP
            assert (await service.redrive_dead_letters(None))["redriven"] == 1
            await backend.wait_for(lambda: len(backend.on("/avn/nav")) == 2)
            await _until(lambda: service.store.dead_letter_count() == 0)
            await asyncio.sleep(0.3)  # a duplicate for the developer would arrive now
            assert sorted(str(m.topic).split("/")[0] for m in backend.on("/avn/nav")) == [
                "map",
                "tsp",
            ]


def test_dead_letters_of_schema_11_gain_a_recipient(tmp_path: Path) -> None:
    """A store the previous release wrote (schema 11, a dead letter in it)
    opens with the recipient column; its letter is for every recipient."""

    path = tmp_path / SqliteConsentStore.FILENAME
    shutil.copy(Path(__file__).parent / "data" / "consent-schema11.sqlite3", path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("11",)
    db.close()
    store = SqliteConsentStore(path)
    try:
        key = bytes(range(32))
        store.attach_key(key, functools.partial(subject, key))
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
        (letter,) = store.dead_letters()
        assert letter.recipient == "" and letter.stream == "tbox/status"
    finally:
        store.close()


async def test_erasure_reaches_every_recipient_and_pairs_nothing(
    gateways: GatewayHarness, clients: Clients
) -> None:
    """Art. 17(2) for every recipient: the VIN event where the VIN went, each
    pseudonym's event at the recipient that holds that pseudonym, and no
    recipient learns another's pseudonym (the developer gets no app or map
    ref). Restriction reaches the VIN-keyed recipients."""
    from gateway.config import ErasureConfig

    service = await gateways.start()
    service.config.erasure = ErasureConfig(app_event_min_delay_s=0.3, app_event_max_delay_s=0.6)
    car, backend = clients.car, clients.backend
    features = {"online_navigation": True, "third_party.music": True, "remote_control": True}
    await car.settings(1, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    msg = streams_pb2.NavRequest(route_id="r1")
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    await car.send("avn/nav", car.header(msg))
    await car.send("avn/app/music", car.header(streams_pb2.AppTraffic(app_id="music")))
    await car.barrier()
    await backend.wait_for(lambda: len(backend.on("/avn/nav")) == 2)
    (mapped,) = backend.on("/avn/nav", "map/")
    (app,) = backend.on("/avn/app/music")
    map_ref, app_ref = str(mapped.topic).split("/")[1], str(app.topic).split("/")[1]
    assert await service.set_restriction(VIN, True, "dpo-test")
    await backend.wait_for(lambda: bool(backend.on(f"{VIN}/restriction")))
    assert [str(m.topic) for m in backend.on("/restriction")] == [f"tsp/{VIN}/restriction"]
    result = await service.erase_vehicle(VIN, "dpo-test")
    assert result["erasure_event"] == "delivered"
    await backend.wait_for(lambda: len(backend.on("/erasure")) == 3)
    topics = sorted(str(m.topic) for m in backend.on("/erasure"))
    assert topics == sorted(
        [
            f"tsp/{VIN}/erasure",
            f"map/{map_ref}/avn/nav/erasure",
            f"apps/{app_ref}/avn/app/music/erasure",
        ]
    )
    developer_view = " ".join(
        str(m.topic) + m.payload.hex()  # type: ignore[union-attr]
        for m in backend.messages
        if str(m.topic).startswith("tsp/")
    )
    assert map_ref not in developer_view and app_ref not in developer_view


def test_recipient_order_does_not_move_pseudonyms() -> None:
    """The pseudonym of a recipient depends on who it is, not where it is listed."""
    doc = document()
    doc["recipients"]["ads"] = {
        "name": "an advertiser",
        "role": "controller",
        "region": "DE",
        "egress_prefix": "ads",
    }
    doc["streams"]["avn/search"]["recipients"]["ads"] = {"pseudonymize_vin": True}
    first = parse_policy(yaml.safe_dump(doc, sort_keys=False))
    routes = doc["streams"]["avn/search"]["recipients"]
    doc["streams"]["avn/search"]["recipients"] = dict(reversed(list(routes.items())))
    second = parse_policy(yaml.safe_dump(doc, sort_keys=False))

    def suffixes(policy: object) -> dict[str, str]:
        (stream,) = [s for s in policy.streams if s.key == "avn/search"]  # type: ignore[attr-defined]
        return {r.recipient: r.scope_suffix for r in stream.routes}

    assert suffixes(first) == suffixes(second)
    assert len(set(suffixes(first).values())) == 3


def test_widening_sees_per_app_streams_and_recipient_identity() -> None:
    older = parse_policy(yaml.safe_dump(document()))
    doc = document()
    doc["streams"]["avn/app/{app_id}"]["recipients"] = {"developer": {}}
    doc["streams"]["avn/app/{app_id}"].pop("pseudonymize_vin")
    assert "avn/app/{app_id}" in widened_streams(parse_policy(yaml.safe_dump(doc)), older)
    for change in ({"name": "another company"}, {"egress_prefix": "elsewhere"}):
        doc = document()
        doc["recipients"]["map_provider"].update(change)
        assert "avn/nav" in widened_streams(parse_policy(yaml.safe_dump(doc)), older), change


def test_a_recipient_needs_a_name_for_the_export() -> None:
    doc = document()
    del doc["recipients"]["app_providers"]["name"]
    assert any(p == "recipients.app_providers.name" for p, _ in problems(doc))


def test_a_prefix_that_starts_the_gateways_own_is_refused() -> None:
    policy = load_policy(DEFAULT)
    assert (
        check_egress(policy, "vehicle", "map/eu")[0][0] == "recipients.map_provider.egress_prefix"
    )


def test_vin_and_located_pseudonym_to_one_recipient_is_refused() -> None:
    """Rule 15 across streams: the map provider gets its pseudonymized
    navigation with coarse positions and the car's status by VIN with the same
    coarse position at the same moment."""
    doc = document()
    doc["streams"]["tbox/status"]["recipients"] = {"developer": {}, "map_provider": {}}
    assert any(
        p == "recipients.map_provider" and "pairs the pseudonym with the VIN" in m
        for p, m in problems(doc)
    )
