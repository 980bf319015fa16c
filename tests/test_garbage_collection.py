"""The gateway process keeps CPython's cyclic collector off its hot path: the
state it loads is frozen out of collections and the young generation is
collected rarely (gateway/cli.py). With the interpreter's defaults, a few
thousand forwarded messages ran dozens of collections, and full ones over
every loaded car: a quarter of the process' CPU (docs/performance.md).

Run as a user runs it: `python -m gateway run` against a real Mosquitto,
the collector's counts read from the process' own /metrics."""

from __future__ import annotations

import contextlib
import gc
import secrets
import time
import urllib.request
from pathlib import Path

import pytest

from bench.peers import all_forward_fleet, all_forward_messages
from bench.procs import start_gateway, write_gateway_config
from bench.suite import encode, policy_version
from bench.wire import Publisher, Receiver
from bench.workload import populate_store
from gateway.cli import GC_YOUNG_PER_INFLIGHT, collection_paused_while_loading
from gateway.control.api import hash_token
from sim.broker import MosquittoBroker, free_port

MESSAGES = 4_000


def collections(port: int, token: str) -> dict[str, float]:
    """python_gc_collections_total per generation."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("python_gc_collections_total{"):
            labels, value = line.rsplit(" ", 1)
            generation = labels.split('generation="', 1)[1].split('"', 1)[0]
            counts[generation] = float(value)
    assert set(counts) == {"0", "1", "2"}, text
    return counts


@pytest.mark.integration
def test_forwarding_runs_no_full_collection_and_rare_young_ones(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    fleet = all_forward_fleet(500)
    state = tmp_path / "state"
    populate_store(state, fleet, policy_version())
    port, token = free_port(), secrets.token_hex(16)
    config = write_gateway_config(
        tmp_path / "configs", "gc", "gcv", "gcb", control=(port, hash_token(token))
    )
    gateway = start_gateway("gc", config, broker.url, state)
    try:
        gateway.wait_ready(90)
        before = collections(port, token)
        packets = encode(all_forward_messages(fleet, MESSAGES), "gcv")
        receiver = Receiver("127.0.0.1", broker.port, "gc-recv", ["gcb/#"], side_suffix=b"/x")
        publisher = Publisher("127.0.0.1", broker.port, "gc-gen")
        try:
            receiver.expect(MESSAGES)
            publisher.send(packets, [0.0] * MESSAGES)
            assert receiver.done.wait(120), "not every message was forwarded"
            time.sleep(0.3)  # the last acknowledgements
            after = collections(port, token)
        finally:
            publisher.close()
            receiver.close()
    finally:
        gateway.stop()
    ran = {generation: after[generation] - before[generation] for generation in before}
    # The interpreter's defaults ran about 30 young, 3 middle and, every few
    # thousand messages, a full collection per 1,000 messages here.
    assert ran["2"] == 0, ran
    assert ran["0"] <= MESSAGES / 1_000, ran


@pytest.mark.parametrize("fails", [False, True])
def test_the_collector_is_on_and_tuned_after_the_load_also_when_the_start_fails(
    fails: bool,
) -> None:
    """Collection is off while the state loads, and on again afterwards, with
    the loaded objects frozen and the young threshold sized for the in-flight
    window (a collector left off would pass the test above)."""
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    kept = [[n] for n in range(1_000)]  # what a load leaves behind
    try:
        with contextlib.suppress(RuntimeError), collection_paused_while_loading(inflight=4_000):
            assert not gc.isenabled()
            if fails:
                raise RuntimeError("the start failed")
        assert gc.isenabled()
        assert gc.get_threshold()[0] == GC_YOUNG_PER_INFLIGHT * 4_000
        assert gc.get_freeze_count() >= frozen + len(kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.enable()
