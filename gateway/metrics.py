"""Prometheus metrics of one gateway instance (own registry: tests run several)."""

from __future__ import annotations

import os
from bisect import bisect_left
from importlib import metadata, resources
from itertools import accumulate
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

OTHER = "other"
DISTRIBUTION = "vehicle-privacy-gateway"
UNKNOWN = "unknown"
# Where the build says which commit it was made from: this variable (set by
# the container image), else a BUILD_COMMIT file shipped in the package
# (written by whoever builds the wheel). Never asked of git at run time.
COMMIT_ENV = "PRIVACY_GATEWAY_COMMIT"
COMMIT_FILE = "BUILD_COMMIT"

# A `_created` series per counter and histogram child doubles the series count
# and says nothing a restart (process_start_time_seconds) does not.
disable_created_metrics()  # type: ignore[no-untyped-call]


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return UNKNOWN


def build_commit() -> str:
    commit = os.environ.get(COMMIT_ENV, "").strip()
    if commit:
        return commit
    try:
        commit = resources.files("gateway").joinpath(COMMIT_FILE).read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN
    return commit or UNKNOWN


# Distinct (stream, feature, transforms) counted between two flushes at most.
FORWARD_KINDS_PENDING = 1024


class GatewayMetrics:
    def __init__(self, max_series: int = 500) -> None:
        # Label values come partly from cars (app ids): a metric holds at most
        # this many label sets, later ones are counted under "other".
        self.max_series = max_series
        self._series: dict[object, int] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        # Per-message counts are added up here and handed to their counters
        # when anything reads the registry (registered first, so every
        # collect() flushes before a counter is read): prometheus_client
        # takes a lock per increment, which cost more than the dictionary.
        self._pending: dict[Any, int] = {}
        # Forwarded messages by (stream, feature, transforms): one count per
        # message for what were 1 + len(transforms) increments.
        self._pending_forwards: dict[tuple[str, str, tuple[str, ...]], int] = {}
        r.register(_FlushPending(self))
        ProcessCollector(registry=r)  # process_*: CPU, memory, open fds, start time
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*: collections per generation (see cli's tuning)
        self.version = package_version()
        self.commit = build_commit()
        self.build_info = Gauge(
            "gateway_build_info",
            "Running build: package version, active policy version, source commit",
            ["version", "policy_version", "commit"],
            registry=r,
        )
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
        self.parked = Counter(
            "gateway_parked_total",
            "Messages parked until the settings revision they state is applied",
            ["stream"],
            registry=r,
        )
        self.parked_messages = Gauge(
            "gateway_parked_messages", "Messages parked for a settings revision", registry=r
        )
        self.parked_bytes = Gauge(
            "gateway_parked_bytes", "Payload bytes of parked messages", registry=r
        )
        self.internal_errors = Counter(
            "gateway_internal_errors_total", "Messages that raised inside the gateway", registry=r
        )
        self.decision_seconds = DecisionTimes(r)
        self.inflight = Gauge(
            "gateway_inflight_messages", "Received but not yet acknowledged", ["source"], registry=r
        )
        self.inflight_bytes = Gauge(
            "gateway_inflight_bytes",
            "Payload bytes of vehicle messages received and not final (the ingress budget)",
            registry=r,
        )
        self.ingress_paused = Gauge(
            "gateway_ingress_paused",
            "1 while the vehicle socket is not read (in-flight messages or bytes at the limit)",
            registry=r,
        )
        self.ready = Gauge(
            "gateway_ready",
            "1 when both brokers are connected and subscribed, the store accepts writes"
            " and a policy is loaded (what /readyz checks, without its test write)",
            registry=r,
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

    def set_policy(self, version: str, digest: str) -> None:
        """The active policy: its info series and the build's policy_version label."""
        self.policy_info.clear()
        self.policy_info.labels(version, digest[:16]).set(1)
        self.build_info.clear()
        self.build_info.labels(self.version, version, self.commit).set(1)

    def inc(self, metric: Counter, *labels: str, count: int = 1) -> None:
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
        pending = self._pending
        pending[child] = pending.get(child, 0) + count

    def forwarded_message(self, stream: str, feature: str, transforms: tuple[str, ...]) -> None:
        """A forwarded message: `forwarded` for its stream and feature and
        `transforms` once per transform, counted together until the next flush."""
        key = (stream, feature, transforms)
        pending = self._pending_forwards
        pending[key] = pending.get(key, 0) + 1
        if len(pending) >= FORWARD_KINDS_PENDING:  # features named by cars (app ids): bounded
            self._flush_forwards()

    def _flush_forwards(self) -> None:
        pending, self._pending_forwards = self._pending_forwards, {}
        for (stream, feature, transforms), n in pending.items():
            self.inc(self.forwarded, stream, feature, count=n)
            for transform in transforms:
                self.inc(self.transforms, transform, count=n)

    def flush(self) -> None:
        """Hand the counts added up by `inc` to their counters."""
        self._flush_forwards()
        pending, self._pending = self._pending, {}
        for child, count in pending.items():
            child.inc(count)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (tests and the shutdown summary)."""
        return self.registry.get_sample_value(name, labels) or 0.0


class DecisionTimes(Collector):
    """gateway_decision_seconds, a histogram counted here and exposed when the
    registry is read. prometheus_client's Histogram takes two locks and walks
    its buckets on every observation (about 1 µs, a third of deciding a
    dropped message); this is one bisection and one list increment."""

    NAME = "gateway_decision_seconds"
    HELP = "Time to decide one message (decode, decide, transform, encode)"
    BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts = [0] * (len(self.BUCKETS) + 1)  # the last: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        # A bucket counts what is <= its bound: the first bound not below it.
        self._counts[bisect_left(self.BUCKETS, seconds)] += 1
        self._sum += seconds

    def collect(self) -> list[Metric]:
        bounds = [*map(floatToGoString, self.BUCKETS), "+Inf"]
        cumulative = list(accumulate(self._counts))
        return [
            HistogramMetricFamily(
                self.NAME,
                self.HELP,
                buckets=list(zip(bounds, cumulative, strict=True)),
                sum_value=self._sum,
            )
        ]

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.NAME, self.HELP)]


class _FlushPending(Collector):
    """Flushes `GatewayMetrics.inc`'s counts whenever the registry is read."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        self._metrics.flush()
        return []
