"""The operator control plane over real HTTP, against a running gateway and mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import ControlConfig, TokenConfig
from gateway.control.api import (
    ROUTES,
    ControlPlane,
    authenticate,
    hash_token,
    openapi_document,
)
from gateway.control.audit import AuditRecord
from gateway.control.signing import generate_keypair, load_private_key, sign_policy
from gateway.service import GatewayService
from gateway.store import SqliteConsentStore
from sim.broker import MosquittoBroker
from telematics.v1 import command_pb2, common_pb2, privacy_pb2, streams_pb2

from .conftest import (
    DEFAULT_POLICY,
    KEY,
    REPO,
    VIN,
    Clients,
    GatewayHarness,
    GatewayProcess,
    user_properties,
)

pytestmark = pytest.mark.integration

TOKENS = {"operator": "op-secret", "dpo": "dpo-secret", "viewer": "view-secret"}
POLICY_TEXT = DEFAULT_POLICY.read_text()


def policy_text(version: str, cell_size: int = 2000) -> str:
    text = POLICY_TEXT.replace('version: "2026.12.1"', f'version: "{version}"')
    return text.replace("cell_size_m: 2000 ", f"cell_size_m: {cell_size} ")


@dataclass
class Control:
    url: str
    service: GatewayService
    plane: ControlPlane
    key: Ed25519PrivateKey
    http: aiohttp.ClientSession

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[role]}"}

    async def push(self, text: str, key: Ed25519PrivateKey | None = None) -> aiohttp.ClientResponse:
        return await self.put(sign_policy(text, key or self.key).to_json())

    async def put(self, bundle_json: str) -> aiohttp.ClientResponse:
        return await self.http.put(
            f"{self.url}/v1/policy", data=bundle_json, headers=self.auth("operator")
        )


@pytest.fixture
async def control(gateways: GatewayHarness, tmp_path: Path) -> AsyncIterator[Control]:
    generate_keypair(tmp_path / "op.key", tmp_path / "op.key.pub")
    config = ControlConfig(
        listen="127.0.0.1:0",
        trusted_keys=[tmp_path / "op.key.pub"],
        tokens=[
            TokenConfig(name=f"{role}-1", role=role, sha256=hash_token(t))
            for role, t in TOKENS.items()
        ],  # type: ignore[arg-type]
    )
    service = await gateways.start()
    plane = ControlPlane(service, config)
    await plane.start()
    async with aiohttp.ClientSession() as http:
        ctl = Control(
            f"http://127.0.0.1:{plane.port}",
            service,
            plane,
            load_private_key(tmp_path / "op.key"),
            http,
        )
        yield ctl
    await ctl.plane.stop()


async def restart(control: Control, gateways: GatewayHarness) -> None:
    """Stop the gateway and its control plane; start them again on the same state."""
    config = control.plane.config
    await control.plane.stop()
    await gateways.stop(control.service)
    control.service = await gateways.start()  # the configured file says 2026.12.1
    control.plane = ControlPlane(control.service, config)
    await control.plane.start()
    control.url = f"http://127.0.0.1:{control.plane.port}"


async def status_version(clients: Clients) -> str:
    """Send one status message and return the policy version that decided it."""
    car = clients.car
    msg = streams_pb2.VehicleStatus()
    msg.position.latitude, msg.position.longitude = 48.1, 11.5
    car.header(msg)
    await car.send("tbox/status", msg)
    await car.barrier()
    last = [m for m in clients.backend.on("/tbox/status")][-1]
    assert streams_pb2.VehicleStatus.FromString(last.payload).header.seq == msg.header.seq  # type: ignore[arg-type]
    return user_properties(last)["policy-version"]


async def test_roles_and_tokens(control: Control) -> None:
    http, url = control.http, control.url
    assert (await http.get(f"{url}/healthz")).status == 200
    assert (await http.get(f"{url}/v1/policy")).status == 401
    assert (
        await http.get(f"{url}/v1/policy", headers={"Authorization": "Bearer wrong"})
    ).status == 401
    assert (await http.get(f"{url}/v1/policy", headers=control.auth("viewer"))).status == 200
    assert (
        await http.put(f"{url}/v1/policy", data="{}", headers=control.auth("viewer"))
    ).status == 403
    assert (
        await http.put(f"{url}/v1/policy", data="{}", headers=control.auth("dpo"))
    ).status == 403
    assert (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("operator"))
    ).status == 403
    assert (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("viewer"))
    ).status == 403
    assert (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("dpo"))
    ).status == 200
    assert (
        await http.get(f"{url}/v1/vehicles/NOT-A-VIN/privacy", headers=control.auth("dpo"))
    ).status == 400
    ready = await http.get(f"{url}/readyz", headers=control.auth("viewer"))
    assert ready.status == 200 and (await ready.json())["ready"] is True
    metrics = await http.get(f"{url}/metrics", headers=control.auth("viewer"))
    assert "gateway_messages_received_total" in await metrics.text()
    # Client IPs are recorded as protocol data, with who called; a VIN in a
    # path only as the ledger's keyed hash of it.
    log = control.service.store.access_log()
    assert any(row[1] == "127.0.0.1" and row[2] == "dpo-1" for row in log)
    assert VIN not in repr(log)
    subject = control.service.audit_subject(VIN)
    assert any(row[4] == f"/v1/vehicles/{subject}/export" for row in log)


async def test_refused_pushes_leave_the_active_policy_enforced(
    control: Control, clients: Clients, tmp_path: Path
) -> None:
    await clients.car.settings(1, features={"remote_control": True})
    stranger = Ed25519PrivateKey.generate()
    tampered = sign_policy(policy_text("2027.1.1"), control.key)
    tampered_json = tampered.to_json().replace("cell_size_m: 2000", "cell_size_m: 5000")
    broken = policy_text("2027.1.2").replace(
        "legal_basis: consent\n    description: Real-time",
        "legal_basis: consent\n    default: true\n    description: Real-time",
    )

    refusals = [
        (
            await control.http.put(
                f"{control.url}/v1/policy", data=tampered_json, headers=control.auth("operator")
            ),
            403,
            "signature",
        ),
        (await control.push(policy_text("2027.1.1"), key=stranger), 403, "unknown signing key"),
        (await control.push(policy_text("2026.1.1")), 409, "not newer"),
        (await control.push(broken), 422, "invalid"),
        (
            await control.http.put(
                f"{control.url}/v1/policy", data="not json", headers=control.auth("operator")
            ),
            400,
            "JSON",
        ),
    ]
    for response, status, words in refusals:
        body = await response.json()
        assert response.status == status, body
        assert words in repr(body)
        assert await status_version(clients) == "2026.12.1"
    problems = (await refusals[3][0].json())["problems"]
    assert any("privacy by default" in p["problem"] for p in problems)


async def test_push_while_messages_flow_each_message_decided_by_exactly_one_version(
    control: Control, clients: Clients
) -> None:
    car = clients.car
    await car.settings(
        1, features={"remote_control": True}, location=common_pb2.LOCATION_APPROXIMATE
    )
    sent: list[int] = []

    async def stream() -> None:
        for i in range(300):
            msg = streams_pb2.VehicleStatus()
            msg.position.latitude, msg.position.longitude = 48.1 + i * 0.01, 11.5
            car.header(msg)
            # A fresh timestamp far apart: every message refreshes its coarse value.
            msg.header.timestamp_ms += i * 3_600_000
            sent.append(msg.header.seq)
            await car.send("tbox/status", msg)

    flow = asyncio.create_task(stream())
    await asyncio.sleep(0.05)
    response = await control.push(policy_text("2027.2.1", cell_size=5000))
    assert response.status == 200, await response.text()
    await flow
    await car.barrier()
    received = {}
    for m in clients.backend.on("/tbox/status"):
        msg = streams_pb2.VehicleStatus.FromString(m.payload)  # type: ignore[arg-type]
        received.setdefault(
            msg.header.seq,
            (user_properties(m)["policy-version"], msg.position.horizontal_accuracy_m),
        )
    assert set(sent) <= set(received)  # nothing lost during the swap
    versions = [received[s] for s in sent]
    assert {v for v, _ in versions} == {"2026.12.1", "2027.2.1"}
    for version, accuracy in versions:
        assert accuracy == (2000 if version == "2026.12.1" else 5000)
    # Arrival order: once the new version decided a message, the old one never did again.
    first_new = next(i for i, (v, _) in enumerate(versions) if v == "2027.2.1")
    assert all(v == "2027.2.1" for v, _ in versions[first_new:])
    view = await (
        await control.http.get(f"{control.url}/v1/policy", headers=control.auth("viewer"))
    ).json()
    assert view["version"] == "2027.2.1" and len(view["digest"]) == 64 and view["applied_at"]


async def test_rollback(control: Control, clients: Clients) -> None:
    await clients.car.settings(1, features={"remote_control": True})
    assert (await control.push(policy_text("2027.3.1"))).status == 200
    assert await status_version(clients) == "2027.3.1"
    unknown = await control.http.post(
        f"{control.url}/v1/policy/rollback",
        json={"version": "1.0"},
        headers=control.auth("operator"),
    )
    assert unknown.status == 404
    back = await control.http.post(
        f"{control.url}/v1/policy/rollback",
        json={"version": "2026.12.1"},
        headers=control.auth("operator"),
    )
    assert back.status == 200, await back.text()
    assert await status_version(clients) == "2026.12.1"
    versions = {p.version: p.active for p in control.service.store.policies()}
    assert versions == {"2026.12.1": True, "2027.3.1": False}


async def get_policy(control: Control) -> dict[str, Any]:
    response = await control.http.get(f"{control.url}/v1/policy", headers=control.auth("viewer"))
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def rollback(control: Control, version: str) -> aiohttp.ClientResponse:
    return await control.http.post(
        f"{control.url}/v1/policy/rollback",
        json={"version": version},
        headers=control.auth("operator"),
    )


async def test_concurrent_pushes_the_newest_stays_active_also_after_restart(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    """Two pushes in flight at once, the newer one first. The decision loop is
    kept busy until both requests wait for it, so whatever an HTTP handler
    checks before the swap, both would pass it."""
    await clients.car.settings(1, features={"remote_control": True})
    service = control.service
    run_control = service.run_control
    queued = 0
    changed = asyncio.Event()

    async def counting(run: Callable[[], Awaitable[Any]]) -> Any:
        nonlocal queued
        queued += 1
        changed.set()
        return await run_control(run)

    async def until_queued(count: int) -> None:
        while queued < count:
            changed.clear()
            await changed.wait()

    service.run_control = counting  # type: ignore[method-assign]
    for i in range(1, 9):
        older, newer = f"2027.{i}.1", f"2027.{i}.2"
        gate = asyncio.Event()
        busy = asyncio.create_task(run_control(gate.wait))  # the loop is deciding messages
        base = queued

        async def push_newer(version: str = newer) -> aiohttp.ClientResponse:
            return await control.push(policy_text(version))

        async def push_older(version: str = older, base: int = base) -> aiohttp.ClientResponse:
            await asyncio.wait_for(until_queued(base + 1), 10)  # the newer one is in line
            return await control.push(policy_text(version))

        async def release(base: int = base, gate: asyncio.Event = gate) -> None:
            # Both requests wait for the decision loop (or one was refused before).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until_queued(base + 2), 5)
            gate.set()

        newer_response, older_response, _ = await asyncio.gather(
            push_newer(), push_older(), release()
        )
        await busy
        assert service.ctx.policy.version == newer, f"round {i}: the older push won"
        assert newer_response.status == 200, await newer_response.text()
        assert older_response.status == 409, await older_response.text()
        assert "not newer" in (await older_response.json())["error"]
        assert (await get_policy(control))["version"] == newer
    assert await status_version(clients) == "2027.8.2"
    stored = {p.version: p.active for p in service.store.policies()}
    assert stored == {
        "2026.12.1": False,
        **{f"2027.{i}.2": False for i in range(1, 8)},
        "2027.8.2": True,
    }

    await restart(control, gateways)
    assert control.service.ctx.policy.version == "2027.8.2"
    assert (await get_policy(control))["version"] == "2027.8.2"
    assert await status_version(clients) == "2027.8.2"


async def test_a_version_names_one_text_for_good(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    await clients.car.settings(1, features={"remote_control": True})
    text = policy_text("2027.5.1")
    assert (await control.push(text)).status == 200
    digest = (await get_policy(control))["digest"]

    async def other_text_refused() -> None:
        response = await control.push(policy_text("2027.5.1", cell_size=5000))
        body = await response.json()
        assert response.status == 409, body
        assert "different text" in body["error"]
        stored = {p.version: p for p in control.service.store.policies()}
        assert (stored["2027.5.1"].digest, stored["2027.5.1"].yaml) == (digest, text)

    await other_text_refused()  # while 2027.5.1 is active
    assert (await rollback(control, "2026.12.1")).status == 200
    await other_text_refused()  # newer than the active one, still the same number
    assert await status_version(clients) == "2026.12.1"
    await restart(control, gateways)
    await other_text_refused()
    assert await status_version(clients) == "2026.12.1"
    back = await rollback(control, "2027.5.1")
    assert back.status == 200, await back.text()
    assert (await back.json())["digest"] == digest
    assert control.service.ctx.policy.cell_size_m == 2000


async def test_replayed_bundle_refused_rollback_is_the_way_back(
    control: Control, clients: Clients
) -> None:
    await clients.car.settings(1, features={"remote_control": True})
    first = sign_policy(policy_text("2027.6.1"), control.key).to_json()
    second = sign_policy(policy_text("2027.6.2"), control.key).to_json()
    assert (await control.put(first)).status == 200
    assert (await control.put(second)).status == 200
    assert (await rollback(control, "2027.6.1")).status == 200
    assert await status_version(clients) == "2027.6.1"

    refusals = [
        (await control.put(second), "rollback"),  # replay of the rolled-back bundle
        (await control.put(first), "already active"),  # replay of the active one
        # Newer than the active version but not than the highest stored one.
        (await control.push(policy_text("2027.6.1.1")), "not newer than 2027.6.2"),
    ]
    for response, words in refusals:
        body = await response.json()
        assert response.status == 409, body
        assert words in body["error"]
        assert await status_version(clients) == "2027.6.1"

    again = await rollback(control, "2027.6.2")
    assert again.status == 200, await again.text()
    assert await status_version(clients) == "2027.6.2"
    active = await rollback(control, "2027.6.2")
    assert active.status == 409 and "already active" in (await active.json())["error"]
    assert [p.version for p in control.service.store.policies()] == [
        "2026.12.1",
        "2027.6.1",
        "2027.6.2",
    ]
    actions = [
        e["action"]
        for e in control.service.store.audit_entries()
        if e["action"].startswith("policy_")  # the test barrier applies settings too
    ]
    assert actions[-4:] == [
        "policy_pushed",
        "policy_pushed",
        "policy_rolled_back",
        "policy_rolled_back",
    ]


async def test_rollback_to_a_stored_policy_that_no_longer_validates(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    """Stored by an earlier release whose rules were looser: refused, clearly."""
    await clients.car.settings(1, features={"remote_control": True})
    looser = policy_text("2026.5.1").replace(
        "legal_basis: consent\n    description: Real-time",
        "legal_basis: consent\n    default: true\n    description: Real-time",
    )
    db = sqlite3.connect(gateways.state_dir / SqliteConsentStore.FILENAME)
    db.execute(
        "INSERT INTO policies VALUES (?,?,?,?,?,NULL,0)",
        ("2026.5.1", hashlib.sha256(looser.encode()).hexdigest(), looser, "old-key", 1.0),
    )
    db.commit()
    db.close()
    response = await rollback(control, "2026.5.1")
    body = await response.json()
    assert response.status == 422, body
    assert "stored policy 2026.5.1 no longer validates" in body["error"]
    assert any("privacy by default" in p["problem"] for p in body["problems"])
    assert await status_version(clients) == "2026.12.1"
    assert control.service.store.active_policy().version == "2026.12.1"  # type: ignore[union-attr]


async def test_restriction_is_announced_downstream_set_and_lifted(
    control: Control, clients: Clients
) -> None:
    """Art. 18 / notice L989: stored backend data of a restricted car must be
    marked, so the backend is told (and told again when it is lifted)."""
    http, url, car = control.http, control.url, clients.car
    await car.settings(1, features={"remote_control": True})
    for method, restricted in (("post", True), ("delete", False)):
        request = getattr(http, method)
        response = await request(
            f"{url}/v1/vehicles/{VIN}/restriction", headers=control.auth("dpo")
        )
        assert response.status == 200
        await clients.backend.wait_for(
            lambda n=restricted: (
                len(clients.backend.on(f"tsp/{VIN}/restriction")) == (1 if n else 2)
            )
        )
        event = privacy_pb2.RestrictionEvent.FromString(
            clients.backend.on(f"tsp/{VIN}/restriction")[-1].payload  # type: ignore[arg-type]
        )
        assert (event.vin, event.restricted) == (VIN, restricted) and event.at_ms > 0
    # Asking again changes nothing and announces nothing.
    assert (
        await http.delete(f"{url}/v1/vehicles/{VIN}/restriction", headers=control.auth("dpo"))
    ).status == 200
    await car.barrier()
    assert len(clients.backend.on(f"tsp/{VIN}/restriction")) == 2


async def test_export_answers_art_15_per_stream_and_renders_for_people(
    control: Control, clients: Clients
) -> None:
    """Art. 15: purposes, categories of data, legal basis, recipients and
    retention per stream, beside the counts and the settings history; and a
    page a data subject can read."""
    http, url, car = control.http, control.url, clients.car
    await car.settings(1, features={"remote_control": True})
    assert await status_version(clients)
    export = await (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("dpo"))
    ).json()
    streams = {s["stream"]: s for s in export["streams"]}
    status = streams["tbox/status"]
    assert status["purpose"] and status["legal_basis"] == "contract"
    assert status["retention_days"] > 0
    (developer,) = status["recipients"]  # who gets it, where, on which transfer basis
    assert (developer["id"], developer["region"], developer["transfer_basis"]) == (
        "developer",
        "CN",
        "scc",
    )
    assert developer["identified_by"] == "VIN"
    nav = {r["id"]: r for r in streams["avn/nav"]["recipients"]}
    assert nav["map_provider"]["identified_by"] == "pseudonym"
    assert nav["map_provider"]["not_sent"] == ["route_id"]
    assert streams["avn/app/{app_id}"]["recipients"][0]["transfer_basis"] == "explicit_consent"
    assert status["data"]["position"].startswith("location")
    assert status["messages_sent"] >= 1
    page = await http.get(
        f"{url}/v1/vehicles/{VIN}/export?format=html", headers=control.auth("dpo")
    )
    text = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    assert text.startswith("<!doctype html>") and VIN in text
    assert status["purpose"] in text and "tbox/status" in text
    assert "standard contractual clauses" in text and "HERE Europe" in text
    assert "<script" not in text.lower()


async def test_objection_stops_a_legitimate_interest_feature_and_survives_changes(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    """Notice L1005-1029 and L450: service adverts in the message centre rest
    on legitimate interest, on by default for known cars; an objection stops
    them for one car whatever it sends, durably; every message gets a result."""
    http, url, car = control.http, control.url, clients.car
    await car.client.subscribe(f"vehicle/{VIN}/avn/msg/#", qos=1)

    async def message(category: str, request_id: str) -> command_pb2.CommandResult:
        cmd = command_pb2.Command(request_id=request_id, args={"title": "Service due"})
        await clients.backend_client.publish(
            f"tsp/{VIN}/msg/{category}", cmd.SerializeToString(), qos=1
        )

        def result() -> command_pb2.CommandResult | None:
            for m in clients.backend.on(f"/msg/{category}/result"):
                parsed = command_pb2.CommandResult.FromString(m.payload)  # type: ignore[arg-type]
                if parsed.request_id == request_id:
                    return parsed
            return None

        await clients.backend.wait_for(lambda: result() is not None)
        found = result()
        assert found is not None
        return found

    def delivered() -> list[str]:
        return [str(m.topic) for m in car.commands if "/avn/msg/" in str(m.topic)]

    assert (await message("service_advert", "m0")).reason == "unknown_vehicle"
    await car.settings(1, features={"remote_control": True})  # says nothing of adverts
    assert (await message("service_advert", "m1")).accepted
    assert (await message("no_such_category", "m2")).reason == "unknown_category"
    objection = f"{url}/v1/vehicles/{VIN}/objections/service_adverts"
    assert (await http.post(objection, headers=control.auth("operator"))).status == 403
    assert (await http.post(objection, headers=control.auth("dpo"))).status == 200
    assert (await message("service_advert", "m3")).reason == "objected:service_adverts"
    assert (await message("alert", "m4")).accepted  # contract: no objection applies
    # Consent is withdrawn with the car's toggle; unknown features do not exist.
    consent = f"{url}/v1/vehicles/{VIN}/objections/online_navigation"
    assert (await http.post(consent, headers=control.auth("dpo"))).status == 409
    unknown = f"{url}/v1/vehicles/{VIN}/objections/nothing"
    assert (await http.post(unknown, headers=control.auth("dpo"))).status == 404
    # The objection survives new settings and a restart.
    await car.settings(2, features={"remote_control": True, "service_adverts": True})
    assert (await message("service_advert", "m5")).reason == "objected:service_adverts"
    await restart(control, gateways)
    assert (await message("service_advert", "m6")).reason == "objected:service_adverts"
    objection = f"{control.url}/v1/vehicles/{VIN}/objections/service_adverts"
    assert (await http.delete(objection, headers=control.auth("dpo"))).status == 200
    assert (await message("service_advert", "m7")).accepted
    await car.barrier()
    assert delivered().count(f"vehicle/{VIN}/avn/msg/service_advert") == 2  # m1, m7
    actions = [e["action"] for e in control.service.store.audit_entries()]
    assert "objection_made" in actions and "objection_withdrawn" in actions


async def test_a_widened_policy_needs_the_consent_again(control: Control, clients: Clients) -> None:
    """Issue 14, item 2: a consent given under 2026.12.1 covers online search
    as that version defined it (the typed text cleared unless precise). A push
    that keeps the text widens it: the car's searches drop as
    `consent_outdated`, the car is asked again, and once it confirms the new
    version they pass. Narrowing takes effect at once."""
    car = clients.car
    features = {"online_search": True}
    await car.settings(1, features=features, location=common_pb2.LOCATION_APPROXIMATE)

    async def search(text: str) -> int:
        msg = streams_pb2.SearchQuery(text=text, category="charger")
        await car.send("avn/search", car.header(msg))
        await car.barrier()
        return len(clients.backend.on("/avn/search", "tsp/"))

    assert await search("near me") == 1
    wider = policy_text("2027.1.1").replace("      text: place_text\n", "      text: keep\n")
    assert (await control.push(wider)).status == 200
    assert await search("near me") == 1  # not covered by the consent given
    dropped = control.service.metrics.value(
        "gateway_messages_dropped_total", stream="avn/search", reason="consent_outdated"
    )
    assert dropped == 1
    # New settings that do not say which screen was shown: judged by the
    # version in force when applied (2027.1.1): the driver answered that one.
    msg = privacy_pb2.PrivacySettings(revision=2, location=common_pb2.LOCATION_APPROXIMATE)
    msg.header.vin = VIN
    msg.features["online_search"] = True
    msg.policy_version = "2026.12.1"  # the car still shows the old screen
    await car.send("avn/privacy", msg)
    applied = await asyncio.wait_for(car.applied.get(), 10)
    while applied.revision != 2:
        applied = await asyncio.wait_for(car.applied.get(), 10)
    assert applied.reprompt and applied.policy_version == "2027.1.1"
    assert await search("near me") == 1
    await car.settings(3, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    assert await search("near me") == 2  # confirmed under 2027.1.1
    got = streams_pb2.SearchQuery.FromString(clients.backend.on("/avn/search", "tsp/")[-1].payload)  # type: ignore[arg-type]
    assert got.text == "near me"


async def test_rewidening_after_a_rollback_needs_the_consent_again(
    control: Control, clients: Clients
) -> None:
    """Confirmed under a wide version, rolled back to a narrow one, then the
    wide rules pushed again: the consent covers what was in force after it
    (the narrow version), so the car is asked again."""
    car = clients.car
    features = {"online_search": True}
    await car.settings(1, features=features, location=common_pb2.LOCATION_APPROXIMATE)

    async def searches() -> int:
        await car.send("avn/search", car.header(streams_pb2.SearchQuery(text="x")))
        await car.barrier()
        return len(clients.backend.on("/avn/search", "tsp/"))

    wide = policy_text("2027.1.1").replace("      text: place_text\n", "      text: keep\n")
    assert (await control.push(wide)).status == 200
    await car.settings(2, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    assert await searches() == 1  # confirmed under 2027.1.1
    assert (await rollback(control, "2026.12.1")).status == 200
    assert await searches() == 2  # narrowing applies at once
    again = policy_text("2027.2.1").replace("      text: place_text\n", "      text: keep\n")
    assert (await control.push(again)).status == 200
    assert await searches() == 2  # wider than what was in force after the consent


async def test_ownership_change_gives_the_new_owner_a_clean_car(
    control: Control, clients: Clients
) -> None:
    """Notice L332-334: the car leaves one account for another. Nothing of the
    previous owner reaches the next (settings, history, counts, pseudonyms,
    grid offset); the backend is told to unlink it and the car to ask again."""
    http, url, car = control.http, control.url, clients.car
    features = {"remote_control": True, "third_party.music": True}
    await car.settings(3, features=features, location=common_pb2.LOCATION_APPROXIMATE)

    async def coarse_and_ref() -> tuple[tuple[float, float], str]:
        start = len(clients.backend.messages)
        msg = streams_pb2.VehicleStatus()
        msg.position.latitude, msg.position.longitude = 48.137, 11.576
        await car.send("tbox/status", car.header(msg))
        await car.send("avn/app/music", car.header(streams_pb2.AppTraffic(app_id="music")))
        await car.barrier()
        new = clients.backend.messages[start:]
        status = next(m for m in new if str(m.topic).endswith("/tbox/status"))
        app = next(m for m in new if "/avn/app/music" in str(m.topic))
        point = streams_pb2.VehicleStatus.FromString(status.payload).position  # type: ignore[arg-type]
        return (point.latitude, point.longitude), str(app.topic).split("/")[1]

    before, old_ref = await coarse_and_ref()
    denied = await http.post(
        f"{url}/v1/vehicles/{VIN}/ownership-change", headers=control.auth("operator")
    )
    assert denied.status == 403
    changed = await http.post(
        f"{url}/v1/vehicles/{VIN}/ownership-change", headers=control.auth("dpo")
    )
    assert changed.status == 200 and (await changed.json())["ownership_event"] == "delivered"
    (event,) = clients.backend.on(f"tsp/{VIN}/ownership")
    assert privacy_pb2.OwnershipEvent.FromString(event.payload).vin == VIN  # type: ignore[arg-type]
    applied = await asyncio.wait_for(car.applied.get(), 10)
    while not applied.reprompt:
        applied = await asyncio.wait_for(car.applied.get(), 10)
    # Consent is unknown again: only legal obligations pass.
    sent = len(clients.backend.on("/tbox/status"))
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus(fuel_level_pct=3.0)))
    await car.barrier()
    assert len(clients.backend.on("/tbox/status")) == sent
    export = await (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("dpo"))
    ).json()
    assert export["settings_history"] == [] and export["sent_to_backend"] == []
    # The new owner's choices: new pseudonyms, a new grid offset for the same spot.
    await car.settings(4, features=features, location=common_pb2.LOCATION_APPROXIMATE)
    after, new_ref = await coarse_and_ref()
    assert new_ref != old_ref and after != before
    entries = control.service.store.audit_entries(control.service.audit_subject(VIN))
    assert "ownership_changed" in [e["action"] for e in entries]
    assert any(e["content"] for e in entries if e["action"] == "settings_applied")  # trail kept
    assert control.service.store.verify_audit().ok


async def test_restriction_export_and_erasure_round_trip(
    control: Control, clients: Clients
) -> None:
    http, url, car = control.http, control.url, clients.car
    await car.settings(1, features={"remote_control": True, "third_party.music": True})
    await car.settings(
        2,
        features={"remote_control": True, "third_party.music": True},
        location=common_pb2.LOCATION_APPROXIMATE,
    )
    assert await status_version(clients)
    app = car.header(streams_pb2.AppTraffic(app_id="music", payload=b"{}"))
    await car.send("avn/app/music", app)
    await car.barrier()

    privacy = await (
        await http.get(f"{url}/v1/vehicles/{VIN}/privacy", headers=control.auth("dpo"))
    ).json()
    assert privacy["settings"]["revision"] == 2 and privacy["settings"]["location"] == "APPROXIMATE"
    assert privacy["restricted"] is False

    # Restriction: only legal-obligation streams pass, whatever the car says.
    assert (
        await http.post(f"{url}/v1/vehicles/{VIN}/restriction", headers=control.auth("dpo"))
    ).status == 200
    before = len(clients.backend.on("/tbox/status"))
    msg = car.header(streams_pb2.VehicleStatus())
    await car.send("tbox/status", msg)
    await car.settings(3, features={"remote_control": True})
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus()))
    await car.barrier()
    assert len(clients.backend.on("/tbox/status")) == before
    assert (
        await http.delete(f"{url}/v1/vehicles/{VIN}/restriction", headers=control.auth("dpo"))
    ).status == 200
    # Data captured within the clock-skew margin of the restriction might have
    # been captured while restricted (contract rule 11): it passes after that.
    await asyncio.sleep(control.service.config.pipeline.capture_skew_s + 0.1)
    assert await status_version(clients)

    export = await (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("dpo"))
    ).json()
    assert [h["revision"] for h in export["settings_history"]] == [1, 2, 3]
    sent = {(c["feature"], c["category"]): c["messages"] for c in export["sent_to_backend"]}
    assert sent[("remote_control", "tbox/status")] == 2  # none while restricted
    assert sent[("third_party.music", "avn/app/{app_id}")] == 1
    assert "2026.12.1" in export["policy_versions_applied"]
    assert {r["category"]: r["retention_days"] for r in export["retention"]}[
        "tbox/connectivity"
    ] == 7

    erased = await http.delete(f"{url}/v1/vehicles/{VIN}", headers=control.auth("dpo"))
    body = await erased.json()
    # Three settings and the restriction set and lifted (rows of its own).
    assert erased.status == 200 and body["removed"]["settings_history"] == 5
    await clients.backend.wait_for(lambda: bool(clients.backend.on(f"{VIN}/erasure")))
    event = privacy_pb2.ErasureEvent.FromString(clients.backend.on(f"{VIN}/erasure")[0].payload)  # type: ignore[arg-type]
    # Only the VIN (rule 16): the app's ref gets its own event later, on its own topic.
    assert event.vin == VIN and not event.refs
    assert len(body["pseudonymous_refs"]) == 1 and len(body["app_erasure_events"]) == 1
    # Fail closed afterwards: the vehicle is unknown until it sends settings again.
    before = len(clients.backend.on("/tbox/status"))
    await car.send("tbox/status", car.header(streams_pb2.VehicleStatus()))
    await car.barrier()
    assert len(clients.backend.on("/tbox/status")) == before
    export = await (
        await http.get(f"{url}/v1/vehicles/{VIN}/export", headers=control.auth("dpo"))
    ).json()
    assert export["settings_history"] == []
    # Nothing is on record after the erasure (the status message was dropped).
    assert export["sent_to_backend"] == []
    # The ledger keeps its chain but no longer holds the vehicle's personal content.
    entries = control.service.store.audit_entries(control.service.audit_subject(VIN))
    assert entries and all(e["content"] in (None, {}) for e in entries)
    assert control.service.store.verify_audit().ok
    assert VIN not in repr(control.service.store.audit_entries())


async def test_audit_verify_catches_tampering(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    await clients.car.settings(1, features={"remote_control": True})
    await clients.car.settings(2, features={"remote_control": False})
    ok = await control.http.get(f"{control.url}/v1/audit/verify", headers=control.auth("viewer"))
    assert ok.status == 200 and (await ok.json())["entries"] == 3  # policy loaded + 2 settings
    db = sqlite3.connect(gateways.state_dir / SqliteConsentStore.FILENAME)
    db.execute(
        "UPDATE audit_log SET content=replace(content, 'remote_control\":false',"
        " 'remote_control\":true') WHERE seq=3"
    )
    db.commit()
    db.close()
    bad = await control.http.get(f"{control.url}/v1/audit/verify", headers=control.auth("viewer"))
    assert bad.status == 409 and "entry 3: content was modified" in (await bad.json())["problems"]
    command = [sys.executable, "-m", "gateway", "audit", "verify"]
    command += ["--state-dir", str(gateways.state_dir)]

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)

    # Content hashes are keyed: without the key the tool cannot vouch for them.
    cli = verify()
    assert cli.returncode == 3 and "NOT checked" in cli.stderr
    (gateways.state_dir / "pseudonym.key").write_bytes(KEY)  # where `gateway run` keeps it
    cli = verify()
    assert cli.returncode == 1 and "TAMPERED" in cli.stderr


async def test_removed_audit_entry_is_detected(
    control: Control, clients: Clients, gateways: GatewayHarness
) -> None:
    for revision in (1, 2, 3):
        await clients.car.settings(revision, features={"remote_control": True})
    db = sqlite3.connect(gateways.state_dir / SqliteConsentStore.FILENAME)
    db.execute("DELETE FROM audit_log WHERE seq=2")
    db.commit()
    db.close()
    result = control.service.store.verify_audit()
    assert not result.ok and any("missing" in p for p in result.problems)


@pytest.mark.parametrize(
    ("header", "found"),
    [
        ("Bearer view-secret", True),
        ("bearer view-secret", True),
        ("BEARER view-secret", True),
        ("bEaReR   view-secret ", True),
        ("Basic view-secret", False),
        ("Bearerview-secret", False),
        ("Bearer", False),
        ("Bearer ", False),
        ("view-secret", False),
    ],
)
def test_bearer_scheme_is_case_insensitive(header: str, found: bool) -> None:
    tokens = [TokenConfig(name="v", role="viewer", sha256=hash_token(TOKENS["viewer"]))]
    assert (authenticate(header, tokens) is not None) is found


async def test_lowercase_bearer_over_http(control: Control) -> None:
    response = await control.http.get(
        f"{control.url}/v1/policy", headers={"Authorization": f"bearer {TOKENS['viewer']}"}
    )
    assert response.status == 200


async def test_unauthenticated_unknown_paths_are_not_logged(control: Control) -> None:
    http, url, store = control.http, control.url, control.service.store
    before = len(store.access_log())
    for path in ["/wp-login.php", "/v1/nope", "/v1/vehicles", "/.env"]:
        assert (await http.get(f"{url}{path}")).status == 404
        wrong = {"Authorization": "Bearer guessed"}
        assert (await http.get(f"{url}{path}", headers=wrong)).status == 404
    assert (await http.patch(f"{url}/v1/policy")).status == 404  # known path, unknown method
    assert len(store.access_log()) == before
    # Still logged: a token holder probing, and refusals on real endpoints.
    assert (await http.get(f"{url}/v1/nope", headers=control.auth("viewer"))).status == 404
    assert (await http.get(f"{url}/v1/policy")).status == 401
    assert (await http.put(f"{url}/v1/policy", headers=control.auth("viewer"))).status == 403
    logged = [row[2:] for row in store.access_log()[before:]]
    assert logged == [
        ("viewer-1", "GET", "/v1/nope", 404),
        ("", "GET", "/v1/policy", 401),
        ("viewer-1", "PUT", "/v1/policy", 403),
    ]


async def test_vin_with_trailing_newline_is_not_a_vin(control: Control) -> None:
    http, url, dpo = control.http, control.url, control.auth("dpo")
    for method, path in [
        ("GET", "/privacy"),
        ("GET", "/export"),
        ("POST", "/restriction"),
        ("DELETE", "/restriction"),
        ("DELETE", ""),
    ]:
        response = await http.request(method, f"{url}/v1/vehicles/{VIN}%0A{path}", headers=dpo)
        assert response.status == 400, (method, path)
    assert control.service.store.restriction(VIN + "\n") is None
    # The documented pattern anchors at the end of input (ECMA-262 `$`), and
    # the Python one agrees on the newline.
    schema = openapi_document()["paths"]["/v1/vehicles/{vin}/privacy"]["get"]["parameters"][0]
    pattern = schema["schema"]["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$") and "\\Z" not in pattern
    assert re.fullmatch(pattern, VIN) and not re.fullmatch(pattern, VIN + "\n")


async def test_access_log_purged_after_retention(control: Control) -> None:
    store = control.service.store
    store.log_access(time.time() - 8 * 86400, "10.0.0.9", "old", "GET", "/v1/policy", 200)
    assert (
        await control.http.get(f"{control.url}/v1/policy", headers=control.auth("viewer"))
    ).status == 200
    await control.plane.purge_protocol_data()
    clients_seen = [row[1] for row in store.access_log()]
    assert "10.0.0.9" not in clients_seen  # older than 7 days: gone
    assert "127.0.0.1" in clients_seen  # recent: kept


async def test_incident_hold_suspends_the_protocol_data_purge_for_its_time(
    control: Control,
) -> None:
    """Notice L115: protocol data is kept 7 days unless a security-relevant
    incident: an operator's hold (audited, time-bounded) keeps it meanwhile."""
    store, http, url = control.service.store, control.http, control.url
    opened = await http.post(
        f"{url}/v1/incidents",
        json={"reason": "credential stuffing on the control plane", "hold_days": 14},
        headers=control.auth("operator"),
    )
    assert opened.status == 201
    incident = await opened.json()
    assert incident["active"] and incident["until"] > time.time() + 13 * 86400
    # (logged after the hold opened: the plane's own purge runs as it starts)
    store.log_access(time.time() - 8 * 86400, "10.0.0.9", "old", "GET", "/v1/policy", 200)
    assert (
        await http.post(
            f"{url}/v1/incidents",
            json={"reason": "x", "hold_days": 14},
            headers=control.auth("viewer"),
        )
    ).status == 403
    for bad in ({"reason": "", "hold_days": 3}, {"reason": "x", "hold_days": 400}, {}):
        response = await http.post(
            f"{url}/v1/incidents", json=bad, headers=control.auth("operator")
        )
        assert response.status == 400, bad
    await control.plane.purge_protocol_data()
    assert "10.0.0.9" in [row[1] for row in store.access_log()]  # held
    listed = await (await http.get(f"{url}/v1/incidents", headers=control.auth("dpo"))).json()
    assert [i["id"] for i in listed["incidents"] if i["active"]] == [incident["id"]]
    closed = await http.delete(
        f"{url}/v1/incidents/{incident['id']}", headers=control.auth("operator")
    )
    assert closed.status == 200 and not (await closed.json())["active"]
    await control.plane.purge_protocol_data()
    assert "10.0.0.9" not in [row[1] for row in store.access_log()]  # released: purged
    actions = [e["action"] for e in store.audit_entries()]
    assert "incident_hold_opened" in actions and "incident_hold_closed" in actions


async def test_an_expired_incident_hold_holds_nothing(control: Control) -> None:
    store = control.service.store
    store.open_incident(
        time.time() - 20 * 86400,
        time.time() - 86400,
        "old",
        AuditRecord("ops", "incident_hold_opened", "", {"reason": "old"}, time.time() - 20 * 86400),
    )
    store.log_access(time.time() - 8 * 86400, "10.0.0.9", "old", "GET", "/v1/policy", 200)
    await control.plane.purge_protocol_data()
    assert "10.0.0.9" not in [row[1] for row in store.access_log()]


def test_openapi_document_matches_the_routes(control: Control) -> None:
    app = control.plane.build_app()
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {
        (m.upper(), path) for path, ops in openapi_document()["paths"].items() for m in ops
    }
    assert served == documented == {(r.method, r.path) for r in ROUTES}


def test_operator_workflow_keygen_sign_push_and_restart_keeps_policy(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    assert gateway("keygen", str(tmp_path / "op.key")).returncode == 0
    token = "workflow-token"
    config = tmp_path / "gateway.toml"
    config.write_text(
        (REPO / "config" / "gateway.toml")
        .read_text()
        .replace('policy = "policy.yaml"', f'policy = "{DEFAULT_POLICY}"')
        .replace("trusted_keys = []", f'trusted_keys = ["{tmp_path / "op.key.pub"}"]')
        + f'\n[[control.tokens]]\nname = "ops"\nrole = "operator"\nsha256 = "{hash_token(token)}"\n'
    )
    new_policy = tmp_path / "policy.yaml"
    new_policy.write_text(policy_text("2027.4.1"))
    signed = gateway("policy", "sign", "--key", str(tmp_path / "op.key"), str(new_policy))
    assert signed.returncode == 0, signed.stderr
    port_args = ["--control-listen", "127.0.0.1:0"]
    proc = GatewayProcess(
        broker.url, broker.url, tmp_path / "state", "--config", str(config), *port_args
    )
    try:
        url = _control_url(proc)
        pushed = gateway(
            "policy", "push", "--url", url, "--token", token, str(tmp_path / "policy.yaml.signed")
        )
        assert pushed.returncode == 0, pushed.stderr
        again = gateway(
            "policy", "push", "--url", url, "--token", token, str(tmp_path / "policy.yaml.signed")
        )
        assert again.returncode == 1 and "not newer" in again.stderr
    finally:
        assert proc.terminate() == 0
    proc = GatewayProcess(
        broker.url, broker.url, tmp_path / "state", "--config", str(config), *port_args
    )
    try:
        assert any("2027.4.1" in line and "gateway ready" in line for line in proc.lines)
    finally:
        assert proc.terminate() == 0


def _control_url(proc: GatewayProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in proc.lines:
            if "control plane listening on" in line:
                return "http://" + line.rsplit("listening on ", 1)[1].split()[0]
        time.sleep(0.05)
    raise AssertionError("control plane did not start:\n" + "".join(proc.lines))


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "api.crt", tmp_path / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_api_over_tls(gateways: GatewayHarness, tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    config = ControlConfig(
        listen="127.0.0.1:0",
        tls_cert=cert,
        tls_key=key,
        tokens=[TokenConfig(name="v", role="viewer", sha256=hash_token("t"))],
    )
    plane = ControlPlane(await gateways.start(), config)
    await plane.start()
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            url = f"https://127.0.0.1:{plane.port}"
            response = await http.get(
                f"{url}/v1/policy", ssl=trust, headers={"Authorization": "Bearer t"}
            )
            assert response.status == 200
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://127.0.0.1:{plane.port}/healthz")
    finally:
        await plane.stop()
