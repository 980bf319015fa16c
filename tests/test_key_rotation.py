"""Pseudonymization key rotation (issue 10): the operator procedure end to end
on a real state directory, real Mosquitto and SQLite, through `gateway
rotate-key` and the same start path as `gateway run`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.core import DecisionContext, Forward, LocationMode, SettingsSnapshot
from gateway.core.decide import decide, state_from_snapshot
from gateway.keys import key_fingerprint
from gateway.policy import load_policy
from gateway.service import GatewayService
from gateway.statedir import (
    INTERNAL_KEY_FILE,
    RETIRED_KEYS_DIR,
    OpenState,
    StateDirError,
    open_state,
    rotate_key,
)
from sim.broker import MosquittoBroker
from telematics.v1 import common_pb2, streams_pb2
from tests.conftest import DEFAULT_POLICY, VIN, Clients, gateway_config
from tests.test_identity_erasure import send_apps

APPS = {"third_party.music": True, "third_party.weather": True}


async def start(config: GatewayConfig) -> tuple[OpenState, GatewayService]:
    """What `gateway run` does with the state directory."""
    state = open_state(config)
    service = GatewayService(
        config,
        load_policy(DEFAULT_POLICY),
        state.key,
        state.store,
        internal_key=state.internal_key,
        retired_keys=state.retired_keys,
    )
    await service.start()
    await asyncio.wait_for(service.ready.wait(), 10)
    return state, service


async def stop(state: OpenState, service: GatewayService) -> None:
    await service.stop()
    state.close()


@pytest.mark.integration
async def test_rotation_changes_what_leaves_and_keeps_what_names_cars(
    broker: MosquittoBroker, tmp_path: Path, clients: Clients
) -> None:
    config = gateway_config(broker.url, broker.url, tmp_path / "state")
    state, service = await start(config)
    first_key = state.key
    await clients.car.settings(2, features=APPS)
    before = await send_apps(clients)
    await stop(state, service)

    rotation = rotate_key(config, time.time())
    assert rotation.internal_created
    assert (config.state_dir / INTERNAL_KEY_FILE).read_bytes() == first_key
    assert rotation.retired.parent.name == RETIRED_KEYS_DIR
    assert rotation.retired.read_bytes() == first_key
    assert rotation.retired.stat().st_mode & 0o077 == 0

    state, service = await start(config)
    try:
        assert state.internal_key == first_key and state.key != first_key
        assert state.retired_keys == (first_key,)
        # The car is still known (its settings are stored under the internal
        # key's subject) and its apps are new users under the new key.
        after = await send_apps(clients)
        assert set(after.values()).isdisjoint(before.values())
        assert service.states[VIN].revision == 2
        # An erasure names the refs of both keys (the backend may hold both).
        result = await service.erase_vehicle(VIN, "dpo")
        assert set(before.values()) | set(after.values()) <= set(result["pseudonymous_refs"])
        verified = service.store.verify_audit()
        assert verified.ok and verified.unchecked == 0
        actions = [e["action"] for e in service.store.audit_entries()]
        assert "pseudonym_key_rotated" in actions
    finally:
        await stop(state, service)

    # A second rotation keeps the internal key and retires the second key too.
    second = rotate_key(config, time.time() + 1)
    assert not second.internal_created
    assert (config.state_dir / INTERNAL_KEY_FILE).read_bytes() == first_key
    assert len(list((config.state_dir / RETIRED_KEYS_DIR).glob("*.key"))) == 2


def test_the_grid_stays_with_the_internal_key_and_pseudonyms_follow_the_new_one() -> None:
    """Two offsets of one parked car could be intersected: the coarse value
    of a car never changes with a rotation; its app refs do."""
    policy = load_policy(DEFAULT_POLICY)
    old, new = bytes(range(32)), bytes(range(32, 64))
    snapshot = SettingsSnapshot(
        VIN, 1, False, LocationMode.APPROXIMATE, {"remote_control": True}, 0.0, policy.version
    )
    states = {VIN: state_from_snapshot(policy, snapshot)}
    status = streams_pb2.VehicleStatus(fuel_level_pct=1.0)
    status.header.vin, status.header.seq = VIN, 1
    status.position.CopyFrom(common_pb2.GeoPoint(latitude=48.137, longitude=11.576))
    payload = status.SerializeToString()

    def coarse(ctx: DecisionContext) -> tuple[float, float]:
        decision = decide(ctx, f"vehicle/{VIN}/tbox/status", payload, states, {}, 100.0)
        assert isinstance(decision, Forward)
        point = streams_pb2.VehicleStatus.FromString(decision.payload).position
        return point.latitude, point.longitude

    before = coarse(DecisionContext(policy=policy, key=old))
    rotated = DecisionContext(policy=policy, key=new, internal_key=old)
    assert coarse(rotated) == before
    assert coarse(DecisionContext(policy=policy, key=new)) != before  # what the split prevents


def test_rotate_key_cli_refuses_while_the_gateway_runs(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(f'state_dir = "{state_dir}"\npolicy = "{DEFAULT_POLICY}"\n')
    assert main(["rotate-key", "--config", str(config_file)]) == 2  # no store yet
    config = gateway_config("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:1", state_dir)
    state = open_state(config)  # a running gateway holds the lock
    try:
        with pytest.raises(StateDirError):
            rotate_key(config, time.time())
    finally:
        state.close()
    key = config.key_path.read_bytes()
    assert main(["rotate-key", "--config", str(config_file)]) == 0
    assert config.key_path.read_bytes() != key
    assert key_fingerprint(key) in next((state_dir / RETIRED_KEYS_DIR).glob("*.key")).name
