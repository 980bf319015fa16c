"""What a monitoring system sees: /metrics of a running gateway over HTTP, and
the Grafana dashboard and Prometheus alert rules under deploy/ checked against it."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as gateway_metrics
from gateway.config import ControlConfig, TokenConfig
from gateway.control.api import ControlPlane, hash_token
from gateway.metrics import COMMIT_ENV, DISTRIBUTION, GatewayMetrics, build_commit
from gateway.service import GatewayService

from .conftest import REPO, GatewayHarness

DASHBOARD = REPO / "deploy" / "grafana" / "privacy-gateway.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
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


# ------------------------------------------------------------- dashboard

PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions, keywords,
    label matchers, ranges and grouping clauses left out)."""
    # Grafana's label_values(series, label): the second argument names a label.
    expr = re.sub(r"label_values\((.*),\s*\w+\s*\)\s*$", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = match.group(0), expr[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if match.start() > 0 and expr[match.start() - 1] in "$0123456789.":
            continue  # $variables, 1e-3, 5m
        names.add(word)
    return names


def test_metric_names_parser() -> None:
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(gateway_decision_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval])))'
    ) == {"gateway_decision_seconds_bucket"}
    assert metric_names("sum(gateway_inflight_bytes) / 1e6 and on(instance) up == 0") == {
        "gateway_inflight_bytes",
        "up",
    }
    assert metric_names('label_values(gateway_build_info{job=~"$job"}, instance)') == {
        "gateway_build_info"
    }


def dashboard_panels(node: Any) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from dashboard_panels(panel)  # rows hold their own panels


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    panels = [p for p in dashboard_panels(dashboard) if p.get("type") != "row"]
    assert all(p.get("targets") for p in panels), "a panel without a query"
    assert len({p["id"] for p in dashboard_panels(dashboard)}) == len(
        list(dashboard_panels(dashboard))
    ), "panel ids must be unique"
    used = set().union(*(metric_names(q) for q in dashboard_queries()))
    watched = {
        "gateway_messages_received_total",  # throughput
        "gateway_messages_forwarded_total",
        "gateway_messages_dropped_total",  # drop reasons
        "gateway_transforms_total",
        "gateway_decision_seconds_bucket",  # decision latency
        "gateway_inflight_messages",
        "gateway_inflight_bytes",
        "gateway_ingress_paused",
        "gateway_dead_letters_total",
        "gateway_dead_letters_stored",
        "gateway_broker_connected",
        "gateway_settings_applied_total",
        "gateway_settings_merged_total",
        "gateway_store_writable",
        "gateway_ready",
        "gateway_internal_errors_total",
        "gateway_build_info",
    }
    assert watched <= used, watched - used


@pytest.mark.integration
async def test_dashboard_and_alerts_read_only_series_the_gateway_exposes(live: Live) -> None:
    exposed = series_names(await live.metrics_text()) | {"up"}  # `up`: Prometheus' own
    for query in dashboard_queries():
        missing = metric_names(query) - exposed
        assert not missing, f"dashboard query {query!r} reads {missing}"
    for rule in alert_rules():
        missing = metric_names(rule["expr"]) - exposed
        assert not missing, f"alert {rule['alert']} reads {missing}"


# ---------------------------------------------------------------- alerts


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool() -> str:
    """promtool: on PATH, or next to this Python (scripts/test.sh puts it in
    .venv/bin). Missing is a failure, not a skip: the rules would go unchecked."""
    beside = Path(sys.executable).parent / "promtool"
    path = shutil.which("promtool") or (str(beside) if beside.is_file() else None)
    if path is None:
        pytest.fail(
            "promtool not found: scripts/test.sh fetches it (Debian package `prometheus`);"
            " it checks deploy/prometheus/alerts.yml"
        )
    return path


def test_alert_rules_cover_the_failure_modes() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "PrivacyGatewayDown",
        "PrivacyGatewayNotReady",
        "PrivacyGatewayDeadLettersGrowing",
        "PrivacyGatewayStoreNotWritable",
        "PrivacyGatewayBrokerDisconnected",
        "PrivacyGatewayInternalErrors",
    } <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alerts_fire_on_their_failure_and_not_on_a_healthy_gateway() -> None:
    """promtool's rule unit tests (deploy/prometheus/alerts_test.yml): each
    alert on synthetic series of its failure, none on a healthy instance."""
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ALERT_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load(ALERT_TESTS.read_text())
    alerts_tested = {
        case["alertname"]
        for test in tested["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts_tested == {rule["alert"] for rule in alert_rules()}


def test_scrape_example_is_valid_and_names_the_job_the_alerts_select() -> None:
    example = ALERTS.parent / "prometheus.example.yml"
    result = subprocess.run(
        [promtool(), "check", "config", "--syntax-only", str(example)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(example.read_text())
    assert config["rule_files"] == [ALERTS.name]
    (job,) = config["scrape_configs"]
    assert job["authorization"]["credentials_file"]  # /metrics wants a token
    down = next(r for r in alert_rules() if r["alert"] == "PrivacyGatewayDown")
    assert f'job="{job["job_name"]}"' in down["expr"]


def test_decision_times_expose_what_a_prometheus_histogram_would() -> None:
    """gateway_decision_seconds is counted by the gateway itself (cheaper per
    message): same buckets, same boundary rule (a value equal to a bound is in
    that bucket), same count and sum as prometheus_client's Histogram."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import DecisionTimes

    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = DecisionTimes(ours_registry)
    reference = Histogram(
        DecisionTimes.NAME,
        DecisionTimes.HELP,
        buckets=DecisionTimes.BUCKETS,
        registry=reference_registry,
    )
    rng = random.Random(7)
    values = [*DecisionTimes.BUCKETS, 0.0, 1.0, *(rng.uniform(0, 0.012) for _ in range(500))]
    values += [
        rng.choice(DecisionTimes.BUCKETS) * (1 + rng.choice((-1e-12, 1e-12))) for _ in range(200)
    ]
    for value in values:
        ours.observe(value)
        reference.observe(value)
    assert samples(generate_latest(ours_registry).decode()) == samples(
        generate_latest(reference_registry).decode()
    )
