"""SIGHUP reloads control tokens, trusted keys, the log level and broker TLS
material without dropping a message; a newer policy file is offered, never
applied by itself."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from gateway.config import BrokerConfig
from gateway.control.api import hash_token
from gateway.control.signing import generate_keypair, load_private_key, sign_policy
from gateway.policy import load_policy
from sim.broker import MosquittoBroker
from telematics.v1 import streams_pb2

from .conftest import (
    DEFAULT_POLICY,
    REPO,
    VIN,
    Car,
    GatewayProcess,
    Recorder,
    gateway_config,
    subscribe_backend,
)
from .test_control import _control_url, policy_text
from .test_tls import CertificateAuthority, running_gateway

pytestmark = pytest.mark.integration


def tokens_toml(name: str, token: str) -> str:
    return f'[[tokens]]\nname = "{name}"\nrole = "operator"\nsha256 = "{hash_token(token)}"\n'


def write_config(path: Path, *, trusted: list[str], level: str) -> None:
    path.write_text(
        (REPO / "config" / "gateway.toml")
        .read_text()
        .replace('level = "INFO"', f'level = "{level}"')
        .replace("trusted_keys = []", f"trusted_keys = {trusted!r}".replace("'", '"'))
        + 'tokens_file = "tokens.toml"\n'
    )


async def wait_for_line(proc: GatewayProcess, words: str, after: int, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.lines[after:]:
            if words in line:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {words!r} in:\n" + "".join(proc.lines[after:]))


@contextlib.asynccontextmanager
async def fleet(broker: MosquittoBroker) -> AsyncIterator[tuple[Car, Recorder]]:
    async with (
        aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier="reload-backend",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as backend_client,
        aiomqtt.Client("127.0.0.1", broker.port, identifier=f"tbox-{VIN}") as car_client,
    ):
        await subscribe_backend(backend_client)
        recorder = Recorder(backend_client)
        car = Car(car_client, recorder)
        await car.subscribe()
        tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
        try:
            yield car, recorder
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_sighup_reloads_tokens_keys_and_level_and_offers_a_newer_policy(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    old_token, new_token = "token-before-reload", "token-after-reload"
    (tmp_path / "tokens.toml").write_text(tokens_toml("before", old_token))
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(DEFAULT_POLICY.read_text())
    config = tmp_path / "gateway.toml"
    write_config(config, trusted=[], level="INFO")
    proc = GatewayProcess(broker.url, broker.url, tmp_path / "state", "--config", str(config))
    try:
        url = _control_url(proc)
        async with fleet(broker) as (car, recorder), aiohttp.ClientSession() as http:

            async def get_policy(token: str) -> tuple[int, Any]:
                response = await http.get(
                    f"{url}/v1/policy", headers={"Authorization": f"Bearer {token}"}
                )
                return response.status, await response.json()

            status, view = await get_policy(old_token)
            assert status == 200 and view["offered"] is None
            await car.settings(1, features={"remote_control": True})
            sent: list[int] = []

            async def stream() -> None:
                for _ in range(300):
                    msg = streams_pb2.VehicleStatus(fuel_level_pct=40.0)
                    car.header(msg)
                    sent.append(msg.header.seq)
                    await car.send("tbox/status", msg)
                    await asyncio.sleep(0.005)

            flow = asyncio.create_task(stream())
            await asyncio.sleep(0.3)
            # New tokens, a trusted key, another log level, a newer policy on disk.
            (tmp_path / "tokens.toml").write_text(tokens_toml("after", new_token))
            generate_keypair(tmp_path / "op.key", tmp_path / "op.key.pub")
            write_config(config, trusted=["op.key.pub"], level="DEBUG")
            newer = policy_text("2027.6.1")
            policy_file.write_text(newer)
            mark = len(proc.lines)
            proc.proc.send_signal(signal.SIGHUP)
            line = await wait_for_line(proc, "configuration reloaded", mark)
            assert "log level DEBUG" in line and "1 token" in line and "1 trusted key" in line
            assert not any("applied only by a restart" in line for line in proc.lines[mark:])
            offered_line = await wait_for_line(proc, "newer than the active", mark)
            assert (
                f"policy file {policy_file} has version 2027.6.1 newer than the active"
                " 2026.12.1: sign and push it to apply"
            ) in offered_line
            await flow
            await car.barrier()

            assert (await get_policy(old_token))[0] == 401
            status, view = await get_policy(new_token)
            assert status == 200
            assert view["version"] == "2026.12.1"  # offered, not applied
            assert view["offered"] == {
                "version": "2027.6.1",
                "digest": load_policy(policy_file).digest,
                "path": str(policy_file),
            }
            # The reloaded key is trusted: the offered policy, signed, goes in.
            bundle = sign_policy(newer, load_private_key(tmp_path / "op.key"))
            pushed = await http.put(
                f"{url}/v1/policy",
                data=bundle.to_json(),
                headers={"Authorization": f"Bearer {new_token}"},
            )
            assert pushed.status == 200, await pushed.text()
            status, view = await get_policy(new_token)
            assert view["version"] == "2027.6.1" and view["offered"] is None

            # What a reload does not apply is named (it waits for a restart).
            text = config.read_text()
            config.write_text(text.replace("new_vehicles_per_s = 50", "new_vehicles_per_s = 60"))
            mark = len(proc.lines)
            proc.proc.send_signal(signal.SIGHUP)
            pending = await wait_for_line(proc, "applied only by a restart", mark)
            assert "applied only by a restart: limits.new_vehicles_per_s" in pending

            # A broken configuration is refused as a whole: what runs stays.
            config.write_text(config.read_text() + "[pipeline\n")
            mark = len(proc.lines)
            proc.proc.send_signal(signal.SIGHUP)
            refused = await wait_for_line(proc, "reload refused", mark)
            assert str(config) in refused and "not valid TOML" in refused
            assert (await get_policy(new_token))[0] == 200

        got = [
            streams_pb2.VehicleStatus.FromString(m.payload).header.seq  # type: ignore[arg-type]
            for m in recorder.on("/tbox/status")
        ]
        assert set(sent) <= set(got), f"lost {sorted(set(sent) - set(got))[:10]}"
    finally:
        assert proc.terminate() == 0


async def test_reloaded_tls_material_is_used_on_the_next_reconnect(tmp_path: Path) -> None:
    """The backend broker's certificate moves to a new CA: after a reload with
    the new CA file the connection in place is kept, and the reconnect after
    the broker's restart trusts the new CA."""
    old_ca = CertificateAuthority.create(tmp_path / "old", "old CA")
    new_ca = CertificateAuthority.create(tmp_path / "new", "new CA")
    trust = tmp_path / "trust.pem"
    trust.write_bytes(old_ca.path.read_bytes())
    with MosquittoBroker() as vehicle:
        backend = MosquittoBroker(tls=old_ca.listener(tmp_path / "old", ("127.0.0.1",)))
        backend.start()
        try:
            config = gateway_config(vehicle.url, backend.url, tmp_path / "state")
            config.backend_broker = BrokerConfig.model_validate(
                {**config.backend_broker.model_dump(), "tls_ca_file": trust}
            )
            async with running_gateway(config, wait_ready=True) as service:
                edge = service.backend_edge
                generation = edge.generation
                trust.write_bytes(new_ca.path.read_bytes())
                service.reload_brokers(config.broker_access())
                await asyncio.sleep(0.5)
                assert edge.ready.is_set() and edge.generation == generation  # kept
                backend.stop()
                backend = MosquittoBroker(
                    port=backend.port,
                    tls=new_ca.listener(tmp_path / "new", ("127.0.0.1",)),
                )
                backend.start()

                async def reconnected() -> None:
                    while not (edge.ready.is_set() and edge.generation > generation):
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(reconnected(), 30)
        finally:
            backend.stop()
