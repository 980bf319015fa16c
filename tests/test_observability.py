"""What a monitoring system sees: /metrics of a running gateway over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as gateway_metrics
from gateway.config import ControlConfig, TokenConfig
from gateway.control.api import ControlPlane, hash_token
from gateway.metrics import COMMIT_ENV, DISTRIBUTION, GatewayMetrics, build_commit
from gateway.service import GatewayService

from .conftest import GatewayHarness

TOKEN = "viewer-secret"
COMMIT = "0123abcd"


@dataclass
class Live:
    service: GatewayService
    plane: ControlPlane
    http: aiohttp.ClientSession

    async def metrics_text(self) -> str:
        response = await self.http.get(
            f"http://127.0.0.1:{self.plane.port}/metrics",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status == 200
        return await response.text()


@pytest.fixture
async def live(gateways: GatewayHarness, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Live]:
    """A running gateway (real mosquitto) with its control plane, built from commit COMMIT."""
    monkeypatch.setenv(COMMIT_ENV, COMMIT)
    service = await gateways.start()
    plane = ControlPlane(
        service,
        ControlConfig(
            listen="127.0.0.1:0",
            tokens=[TokenConfig(name="grafana", role="viewer", sha256=hash_token(TOKEN))],
        ),
    )
    await plane.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Live(service, plane, http)
    finally:
        await plane.stop()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series_names(text: str) -> set[str]:
    """Every series name a query can use, also of metrics without samples yet
    (a labelled counter no message has touched shows only its # TYPE)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "info": ("_info",),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


@pytest.mark.integration
async def test_metrics_carry_process_platform_and_build_info_without_created_series(
    live: Live,
) -> None:
    text = await live.metrics_text()
    values = samples(text)
    names = {name for name, _ in values}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
    ):
        assert name in names, name
    build = [labels for name, labels in values if name == "gateway_build_info"]
    assert build == [
        frozenset(
            {
                "version": metadata.version(DISTRIBUTION),
                "policy_version": live.service.ctx.policy.version,
                "commit": COMMIT,
            }.items()
        )
    ]
    assert values[("gateway_build_info", build[0])] == 1.0
    # Unlabelled counters and histograms always have a sample: none of them
    # brings a _created series along.
    assert {"gateway_settings_applied_total", "gateway_decision_seconds_count"} <= names
    assert not [line for line in text.splitlines() if "_created" in line]
    assert values[("gateway_ready", frozenset())] == 1.0
    assert values[("gateway_inflight_bytes", frozenset())] == live.service.budget.bytes == 0
    assert values[("gateway_ingress_paused", frozenset())] == 0.0


@pytest.mark.integration
async def test_ready_gauge_follows_the_store_and_brokers(live: Live) -> None:
    live.service.store_writable = False  # what a failing durable write records
    assert samples(await live.metrics_text())[("gateway_ready", frozenset())] == 0.0
    live.service.store_writable = True
    live.service.backend_edge.ready.clear()
    assert samples(await live.metrics_text())[("gateway_ready", frozenset())] == 0.0
    live.service.backend_edge.ready.set()
    assert samples(await live.metrics_text())[("gateway_ready", frozenset())] == 1.0


def test_build_info_follows_the_active_policy() -> None:
    m = GatewayMetrics()
    m.set_policy("2026.1.1", "a" * 64)
    m.set_policy("2026.2.1", "b" * 64)
    build = [
        s.labels
        for family in m.registry.collect()
        for s in family.samples
        if s.name == "gateway_build_info"
    ]
    assert [b["policy_version"] for b in build] == ["2026.2.1"]
    assert m.value("gateway_policy_info", version="2026.2.1", digest="b" * 16) == 1.0
    assert m.value("gateway_policy_info", version="2026.1.1", digest="a" * 16) == 0.0


def test_build_commit_from_environment_else_build_file_else_unknown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gateway_metrics.resources, "files", lambda package: tmp_path)
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert build_commit() == "unknown"
    (tmp_path / "BUILD_COMMIT").write_text("fedcba98\n")
    assert build_commit() == "fedcba98"
    monkeypatch.setenv(COMMIT_ENV, "0123abcd")
    assert build_commit() == "0123abcd"
