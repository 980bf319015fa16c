"""Prometheus metrics of one gateway instance (own registry: tests run several)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OTHER = "other"


class GatewayMetrics:
    def __init__(self, max_series: int = 500) -> None:
        # Label values come partly from cars (app ids): a metric holds at most
        # this many label sets, later ones are counted under "other".
        self.max_series = max_series
        self._series: dict[object, int] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "gateway_messages_received_total", "Messages received", ["source"], registry=r
        )
        self.forwarded = Counter(
            "gateway_messages_forwarded_total",
            "Messages forwarded to the backend",
            ["stream", "feature"],
            registry=r,
        )
        self.dropped = Counter(
            "gateway_messages_dropped_total", "Messages dropped", ["stream", "reason"], registry=r
        )
        self.transforms = Counter(
            "gateway_transforms_total", "Field transforms applied", ["transform"], registry=r
        )
        self.settings_applied = Counter(
            "gateway_settings_applied_total",
            "Privacy settings made durable and enforced",
            registry=r,
        )
        self.commands = Counter(
            "gateway_commands_total", "Backend commands", ["command", "accepted"], registry=r
        )
        self.publish_retries = Counter(
            "gateway_publish_retries_total",
            "Publishes retried after a refusal",
            ["edge"],
            registry=r,
        )
        self.dead_letters = Counter(
            "gateway_dead_letters_total",
            "Messages kept as dead letters after a refusal, by edge and reason",
            ["edge", "reason"],
            registry=r,
        )
        self.dead_letters_stored = Gauge(
            "gateway_dead_letters_stored", "Dead letters currently stored", registry=r
        )
        self.dead_letters_evicted = Counter(
            "gateway_dead_letters_evicted_total",
            "Oldest dead letters evicted because the store reached its row cap",
            registry=r,
        )
        self.store_writable = Gauge(
            "gateway_store_writable", "1 when the consent store accepts writes", registry=r
        )
        self.settings_merged = Counter(
            "gateway_settings_merged_total",
            "Settings over a vehicle's rate, applied but merged into its latest history row",
            registry=r,
        )
        self.settings_ignored_features = Counter(
            "gateway_settings_ignored_features_total",
            "Feature ids of settings snapshots not kept (unknown, per-app off, over the cap)",
            registry=r,
        )
        self.internal_errors = Counter(
            "gateway_internal_errors_total", "Messages that raised inside the gateway", registry=r
        )
        self.decision_seconds = Histogram(
            "gateway_decision_seconds",
            "Time to decide one message (decode, decide, transform, encode)",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2),
            registry=r,
        )
        self.inflight = Gauge(
            "gateway_inflight_messages", "Received but not yet acknowledged", ["source"], registry=r
        )
        self.connected = Gauge(
            "gateway_broker_connected", "1 when the broker connection is up", ["edge"], registry=r
        )
        self.vehicles = Gauge(
            "gateway_known_vehicles", "Vehicles with applied settings", registry=r
        )
        self.policy_info = Gauge(
            "gateway_policy_info", "Active policy", ["version", "digest"], registry=r
        )

        # Labelled children by (metric, labels): `labels()` costs 1-3 us per
        # call, a dictionary hit a tenth of that, on every message.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def inc(self, metric: Counter, *labels: str) -> None:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            series = self._series.get(metric, 0)
            if series >= self.max_series:
                labels = (OTHER,) * len(labels)
                key = (metric, labels)
                child = self._children.get(key)
            if child is None:
                self._series[metric] = series + 1
                child = self._children[key] = metric.labels(*labels)
        child.inc()

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests and the shutdown summary)."""
        return self.registry.get_sample_value(name, labels) or 0.0
