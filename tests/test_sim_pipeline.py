"""The sim's own plumbing: load mode, the recorder, the live display, and the whole
pipeline over real Mosquitto against the reference contract model (no real gateway)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console

from sim.broker import MosquittoBroker
from sim.checker import check_run
from sim.demo import DemoConfig, run_demo
from sim.fleet import Fleet, FleetOptions
from sim.groundtruth import RECORDING_FILE, read_json_lines, unb64
from sim.policy import load_policy
from sim.recorder import Recorder
from sim.run import parse_duration, progress_view
from sim.scenario import build_scenario
from sim.testing import run_in_memory


def test_parse_duration() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("6h") == 6 * 3600
    assert parse_duration("1h30m") == 5400
    with pytest.raises(ValueError):
        parse_duration("ten minutes")


def test_multiplexed_load_mode_is_clean(tmp_path: Path) -> None:
    summary, _ = run_in_memory(tmp_path, vehicles=40, duration_s=3600, seed=9, multiplex=3)
    assert summary.published > 500
    result = check_run(tmp_path, state_dir=tmp_path / "state")
    assert result.issues == []


def test_live_display_renders(tmp_path: Path) -> None:
    scenario = build_scenario(1, 3, 600)
    fleet = Fleet(scenario, load_policy(), FleetOptions("memory", "memory", 60), tmp_path)
    fleet.stats.published_by_stream["tbox/status"] = 3
    fleet.stats.expected_drops["feature_off"] = 1
    recorder = Recorder("memory", tmp_path)
    output = io.StringIO()
    Console(file=output, width=160).print(progress_view(fleet, recorder, time.monotonic()))
    recorder.writer.close()
    fleet.truth.close()
    assert "tbox/status" in output.getvalue() and "feature_off" in output.getvalue()


@pytest.mark.integration
def test_record_command_stores_user_properties(tmp_path: Path) -> None:
    with MosquittoBroker() as broker:
        recorder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sim",
                "record",
                "--broker",
                broker.url,
                "--out",
                str(tmp_path),
                "--duration",
                "4s",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # let it subscribe
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("feature", "remote_control"), ("transforms", "")]
        client.publish(
            "tsp/X/tbox/status", b"\x01\x02", qos=1, properties=properties
        ).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        assert recorder.wait(15) == 0
    records = list(read_json_lines(tmp_path / RECORDING_FILE))
    assert len(records) == 1
    assert records[0]["topic"] == "tsp/X/tbox/status"
    assert unb64(records[0]["payload"]) == b"\x01\x02"
    assert ["feature", "remote_control"] in records[0]["props"]


@pytest.mark.integration
def test_pipeline_over_mosquitto_with_reference_model(tmp_path: Path) -> None:
    """Fleet (tbox-/avn- connections) + recorder + checker over a real broker and a real
    subprocess, with the reference contract model standing in for the gateway."""
    config = DemoConfig(
        out_dir=tmp_path,
        vehicles=6,
        duration_s=2 * 3600,
        speedup=400,
        seed=3,
        gateway_command=[sys.executable, "-m", "sim.reference_gateway"],
        live=False,
    )
    outcome = run_demo(config, Console(file=io.StringIO()))
    assert outcome.result.issues == [], outcome.result.summary_json()
    assert outcome.run.settings_timeouts == 0
    assert outcome.result.published > 150
    assert outcome.report_path is not None and outcome.report_path.exists()
