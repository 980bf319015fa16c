"""The peer benchmark compares like with like: the Node-RED flow it generates
forwards exactly what the gateway's decision core forwards, and the run's end
marker is a message the ordinary lane must carry (not an eCall, which has its
own lane and would overtake the backlog)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.peers import _FUNCTION, _car_table, _stream_rules, as_json
from bench.wire import header_seq
from bench.workload import make_fleet, make_messages, marker_vin
from gateway.core.decide import DecisionContext, Forward, decide
from gateway.core.state import LocationMode, SettingsSnapshot
from gateway.policy import load_policy
from sim.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "config" / "policy.yaml"


def test_seq_is_read_from_protobuf_and_from_json() -> None:
    fleet = make_fleet(50)
    message = make_messages(fleet, 3)[1]
    assert header_seq(message.payload) == 2
    assert header_seq(as_json([message])[0].payload) == 2
    assert header_seq(b'{"header": {"seq": 17}}') == 17
    assert header_seq(b'{"header": {}}') == -1


def test_the_last_message_of_a_run_is_forwarded_on_the_ordinary_lane() -> None:
    from gateway.core.decide import kept_features, state_from_snapshot

    policy = load_policy(POLICY)
    fleet = make_fleet(300)
    messages = make_messages(fleet, 500)
    last = messages[-1]
    assert last.stream == "tbox/status" and last.vin == marker_vin(fleet)
    settings = fleet.settings[last.vin]
    snapshot = SettingsSnapshot(
        last.vin,
        1,
        settings.privacy_mode,
        LocationMode.parse(settings.location),
        kept_features(policy, settings.features),
        0.0,
        policy.version,
    )
    states = {last.vin: state_from_snapshot(policy, snapshot)}
    decision = decide(
        DecisionContext(policy, b"k" * 32),
        f"vehicle/{last.vin}/{last.stream}",
        last.payload,
        states,
        {},
        time.time(),
    )
    assert isinstance(decision, Forward)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (the peer's runtime)")
def test_the_node_red_function_forwards_what_the_gateway_forwards(tmp_path: Path) -> None:
    import dataclasses

    from gateway.core.decide import kept_features, state_from_snapshot

    policy = load_policy(POLICY)
    fleet = make_fleet(400)
    messages = make_messages(fleet, 3_000, seed=11)
    states = {}
    for vin, s in fleet.settings.items():
        snapshot = SettingsSnapshot(
            vin,
            s.revision,
            s.privacy_mode,
            LocationMode.parse(s.location),
            kept_features(policy, s.features),
            0.0,
            policy.version,
        )
        state = state_from_snapshot(policy, snapshot)
        if vin in fleet.windows:
            state = dataclasses.replace(state, window_until=time.time() + 3600)
        states[vin] = state
    ctx = DecisionContext(policy, b"k" * 32)
    expected = []
    for m in messages:
        decision = decide(ctx, f"vehicle/{m.vin}/{m.stream}", m.payload, states, {}, time.time())
        expected.append(isinstance(decision, Forward))
        if isinstance(decision, Forward) and decision.state is not None:
            states[m.vin] = decision.state  # a find-my-car fix spent its window's allowance
    # The flow's function node, run by node on the same messages as JSON.
    script = tmp_path / "run.js"
    inputs = [
        {"topic": f"in/{m.vin}/{m.stream}", "payload": json.loads(j.payload)}
        for m, j in zip(messages, as_json(messages), strict=True)
    ]
    script.write_text(
        "const OUT = 'out';\n"
        f"const CELL = {policy.cell_size_m};\n"
        f"const STREAMS = {json.dumps(_stream_rules())};\n"
        f"const CARS = {json.dumps(_car_table(fleet))};\n"
        f"const inputs = {json.dumps(inputs)};\n"
        "const store = {};\n"
        "const context = {get: k => store[k], set: (k, v) => { store[k] = v; }};\n"
        "function rule(msg) {" + _FUNCTION + "}\n"
        "console.log(JSON.stringify(inputs.map(m => rule(m) !== null)));\n"
    )
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    forwarded = json.loads(result.stdout)
    assert sum(expected) > 500 and sum(expected) < len(messages) - 500
    mismatches = [
        (m.vin, m.stream) for m, a, b in zip(messages, expected, forwarded, strict=True) if a != b
    ]
    assert mismatches == []


@pytest.mark.integration
def test_the_edge_floor_relays_every_message_and_acknowledges_it(
    broker: MosquittoBroker,
) -> None:
    """`bench peers` quotes the gateway's MQTT edge relaying alone as the floor
    of the design: it must forward every message, in order (else its CPU per
    message would flatter the floor), which it can only do for more than its
    Receive Maximum (512) if it acknowledges them too."""
    from bench.peers import all_forward_fleet, all_forward_messages
    from bench.procs import start_relay
    from bench.suite import encode
    from bench.wire import Publisher, Receiver

    count = 2_000
    relay = start_relay("edge", "edge-floor", broker.url, "fin", "fout")
    try:
        relay.wait_ready(30)
        fleet = all_forward_fleet(100)
        receiver = Receiver("127.0.0.1", broker.port, "floor-recv", ["fout/#"], side_suffix=b"/x")
        publisher = Publisher("127.0.0.1", broker.port, "floor-gen")
        try:
            receiver.expect(count)
            publisher.send(encode(all_forward_messages(fleet, count), "fin"), [0.0] * count)
            assert receiver.done.wait(60), "not every message was relayed"
            assert [s for s in receiver.seqs if s > 0] == list(range(1, count + 1))
        finally:
            publisher.close()
            receiver.close()
    finally:
        relay.stop()


def test_the_gateways_cpu_is_also_quoted_against_what_ran_beside_it() -> None:
    """Per round, the gateway's CPU per message over the broker's in the same
    round and over Node-RED's and the edge's in the neighbouring rounds: the
    machine's phase moves all of them together."""
    from bench.peers import peer_targets

    def fig(system: float, broker: float) -> dict[str, object]:
        return {
            "msg_s": 10_000.0,
            "cpu_us_per_msg": {"system": system, "system_main_thread": system, "broker": broker},
        }

    gateway = [fig(30, 30), fig(60, 40), fig(45, 50)]
    raw = {"gateway": gateway, "node-red": [fig(60, 1), fig(60, 1), fig(90, 1)]}
    raw["edge"] = [fig(20, 1), fig(30, 1), fig(45, 1)]
    median_of = {name: figs[1] for name, figs in raw.items()}
    result = {
        "peer": "node-red 4",
        "all_forward": {"raw": raw, "median": median_of, "median_throughput_gateway_vs_peer": 1.0},
        "mixed": {
            "median": {"gateway": fig(1, 1), "node-red": fig(1, 1)},
            "median_throughput_gateway_vs_peer": 1.0,
        },
    }
    relative = {t.name.split(" / ")[1].split("'s")[0]: t for t in peer_targets(result)[3:]}
    assert relative["broker"].value == 1.0  # 1.0, 1.5, 0.9
    assert relative["node-red"].value == 0.5  # 0.5, 1.0, 0.5
    assert relative["edge"].value == 1.5  # 1.5, 2.0, 1.0
    assert "rounds 1.00, 1.50, 0.90" in relative["broker"].detail
