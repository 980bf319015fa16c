"""The README's operator workflow, followed literally: every command of its block runs
as written (through bash, from the checkout, with `python` being this interpreter)
against a real Mosquitto and the real gateway; only the ports differ (a private broker
and a free control port instead of 1883 and 8080). The one manual step, editing the
config, is done exactly as the block's comment says."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from sim.broker import MosquittoBroker, free_port
from telematics.v1 import streams_pb2

from .conftest import VIN, Clients, GatewayProcess, user_properties

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed",
    ),
]


def workflow_commands() -> list[str]:
    """The shell commands of the README's operator workflow block, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```sh\n", text.index("Operator workflow, step by step")) + len("```sh\n")
    block = text[start : text.index("```", start)]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(pending)
        pending = ""
    return commands


def test_the_block_is_the_workflow_the_test_follows() -> None:
    """The steps this test relies on are in the README (else it would test nothing)."""
    joined = "\n".join(workflow_commands())
    for step in ("keygen ~/gateway-ops/ops.key", "token --name alice", " run --config ",
                 "sed -i 's/^version: .*/version: \"2026.12.2\"/'", "policy sign", "policy push",
                 "audit verify"):
        assert step in joined, step


def test_operator_workflow_from_the_readme(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"  # `python` in the README is the project's interpreter
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    ops = home / "gateway-ops"
    control_port = free_port()
    token = ""
    gateway: subprocess.Popen[str] | None = None
    log: list[str] = []
    ready = threading.Event()
    reader: threading.Thread | None = None

    def drain(stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            log.append(line)
            if "gateway ready" in line:
                ready.set()

    with MosquittoBroker() as broker:
        try:
            for command in workflow_commands():
                command = command.replace("127.0.0.1:1883", f"127.0.0.1:{broker.port}")
                command = command.replace("127.0.0.1:8080", f"127.0.0.1:{control_port}")
                command = command.replace("--token TOKEN", f"--token {token}")
                if command.rstrip().endswith("&"):  # the gateway itself
                    gateway = subprocess.Popen(
                        ["bash", "-c", "exec " + command.rstrip().rstrip("&")],
                        cwd=ROOT, env=env, text=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                    reader = threading.Thread(target=drain, args=(gateway.stderr,), daemon=True)
                    reader.start()
                    assert ready.wait(30), "gateway not ready:\n" + "".join(log)
                    continue
                result = subprocess.run(
                    ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                    text=True, timeout=60, check=False,
                )
                assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
                if " token --name " in command:
                    token = edit_config_as_the_readme_says(ops, result.stdout, control_port)
                if " policy push " in command:
                    assert json.loads(result.stdout)["version"] == "2026.12.2", result.stdout
                if " audit verify " in command:
                    assert "audit ledger intact" in result.stdout
            assert gateway is not None and token
            request = urllib.request.Request(
                f"http://127.0.0.1:{control_port}/v1/policy",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                view = json.loads(response.read())
            assert view["version"] == "2026.12.2" and view["signer"] != "config"
        finally:
            if gateway is not None:
                if gateway.poll() is None:
                    gateway.send_signal(signal.SIGTERM)
                gateway.wait(30)
                if reader is not None:
                    reader.join(10)
                assert gateway.stderr is not None
                gateway.stderr.close()
    assert gateway.returncode == 0, "".join(log)
    # The private key stayed outside the checkout, with its mode.
    assert (ops / "ops.key").stat().st_mode & 0o777 == 0o600
    assert not (ROOT / "ops.key").exists() and not (ROOT / "config" / "ops.key").exists()
    # Text logs carry the structured fields: the pushed version is on its line.
    assert any("policy 2026.12.2 active" in line and " policy_version=2026.12.2" in line
               for line in log), "".join(log)


def edit_config_as_the_readme_says(ops: Path, token_output: str, control_port: int) -> str:
    """'under [control] set trusted_keys = ["ops.key.pub"] and paste the printed
    [[control.tokens]] entry at the end of the file' (plus this test's control port)."""
    token = re.search(r"shown once\): (\S+)", token_output)
    assert token, token_output
    entry = token_output.split("config entry:\n", 1)[1]
    assert entry.startswith("[[control.tokens]]")
    config = ops / "gateway.toml"
    text = config.read_text()
    assert "trusted_keys = []" in text and 'listen = "127.0.0.1:8080"' in text
    text = text.replace("trusted_keys = []", 'trusted_keys = ["ops.key.pub"]')
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{control_port}"')
    config.write_text(text + "\n" + entry)
    return token.group(1)


# ------------------------------------------------- explain --key-file reproduces production

SETTINGS = {
    "revision": 1,
    "location": "approximate",
    "features": {
        "remote_control": True, "charging": True, "digital_key": True, "third_party.music": True,
    },
}


def explain(state_dir: Path, topic: str, message: Message) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "explain", "--policy", str(ROOT / "config/policy.yaml"),
         "--settings", json.dumps(SETTINGS), "--topic", topic,
         "--payload-json", json_format.MessageToJson(message),
         "--key-file", str(state_dir / "pseudonym.key")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


async def test_explain_with_the_key_file_reproduces_what_the_gateway_published(
    broker: MosquittoBroker, clients: Clients, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proc = GatewayProcess(broker.url, broker.url, state)
    car = clients.car
    try:
        await car.settings(1, features=dict(SETTINGS["features"]), location=2)  # type: ignore[arg-type]
        status = streams_pb2.VehicleStatus(fuel_level_pct=40)
        status.position.latitude, status.position.longitude = 48.137154, 11.576124
        battery = streams_pb2.BatteryStatus(evse_id="DE*ABC*E1", state_of_charge_pct=80)
        # The car charges where it reported its position: within the refresh interval
        # the gateway shows the car's anchor, which a stateless dry run computes only
        # for the position the anchor was set from.
        battery.charging_location.latitude, battery.charging_location.longitude = (
            48.137154,
            11.576124,
        )
        key = streams_pb2.DigitalKeyEvent(key_id="k1", bluetooth_mac="AA:BB:CC:DD:EE:FF")
        app = streams_pb2.AppTraffic(app_id="music", content_type="text/plain", payload=b"hi")
        sent = {
            "tbox/status": car.header(status),
            "tbox/battery": car.header(battery),
            "tbox/digital_key": car.header(key),
            "avn/app/music": car.header(app),
        }
        for relative, message in sent.items():
            await car.send(relative, message)
        await clients.backend.wait_for(
            lambda: all(clients.backend.on(relative) for relative in sent), 15
        )
    finally:
        assert proc.terminate() == 0
    for relative, message in sent.items():
        (published,) = clients.backend.on(relative)
        report = explain(state, f"vehicle/{VIN}/{relative}", message)
        assert report["decision"] == "forward"
        assert report["topic"] == str(published.topic)
        props = user_properties(published)
        assert report["user_properties"] == props
        received = type(message).FromString(published.payload)  # type: ignore[arg-type]
        assert report["payload"] == json_format.MessageToDict(
            received, preserving_proto_field_name=True
        ), relative
        assert report["transforms"] == [t for t in props["transforms"].split(",") if t]
    # Not trivially equal: the key matters (a random key gives other pseudonyms).
    random_key = subprocess.run(
        [sys.executable, "-m", "gateway", "explain", "--policy", str(ROOT / "config/policy.yaml"),
         "--settings", json.dumps(SETTINGS), "--topic", f"vehicle/{VIN}/avn/app/music",
         "--payload-json", json_format.MessageToJson(sent["avn/app/music"])],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    production_topic = str(clients.backend.on("avn/app/music")[0].topic)
    assert json.loads(random_key.stdout)["topic"] != production_topic
