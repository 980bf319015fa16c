"""The running gateway: edges -> decision core -> edges, with durable state.

Delivery guarantee (at least once): a message received from a broker is
acknowledged only when its outcome is final — forwarded and PUBACKed by the
destination broker, or deliberately dropped — and acknowledgements go out
in arrival order. A crash at any point leaves the message unacknowledged,
and the broker redelivers it to the restarted gateway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.config import GatewayConfig
from gateway.control.audit import AuditRecord
from gateway.core import (
    ApplySettings,
    CoarseFix,
    DecisionContext,
    Drop,
    Forward,
    VehicleState,
    decide,
    decide_command,
    state_from_snapshot,
)
from gateway.core.transforms import pseudonym
from gateway.edges.mqtt import InboundMessage, MqttEdge, PublishRefused
from gateway.metrics import GatewayMetrics
from gateway.policy import CompiledPolicy
from gateway.store import ConsentStore, EgressCount, StoredPolicy
from telematics.v1.privacy_pb2 import ErasureEvent

log = logging.getLogger("gateway.service")

T = TypeVar("T")
VEHICLE = "vehicle"
BACKEND = "backend"


class _Slot:
    """One received message awaiting its final outcome."""

    __slots__ = ("done", "generation", "mid", "qos", "window")

    def __init__(self, window: AckWindow, msg: InboundMessage) -> None:
        self.window = window
        self.mid = msg.mid
        self.qos = msg.qos
        self.generation = msg.generation
        self.done = False

    def settle(self) -> None:
        self.done = True
        self.window.release()


class AckWindow:
    """Acknowledges received messages in arrival order once each is final.

    MQTT asks for PUBACKs in receive order; it also means an ack never
    overtakes an earlier message still in flight.
    """

    def __init__(self, edge: MqttEdge, on_size: Callable[[int], None]) -> None:
        self._edge = edge
        self._pending: deque[_Slot] = deque()
        self._on_size = on_size
        self.drained = asyncio.Event()
        self.drained.set()

    def open(self, msg: InboundMessage) -> _Slot:
        slot = _Slot(self, msg)
        self._pending.append(slot)
        self.drained.clear()
        return slot

    def release(self) -> None:
        pending = self._pending
        while pending and pending[0].done:
            slot = pending.popleft()
            self._edge.ack(slot.mid, slot.qos, slot.generation)
        self._on_size(len(pending))
        if not pending:
            self.drained.set()

    def __len__(self) -> int:
        return len(self._pending)


@dataclass(slots=True)
class ControlOp:
    """Work done by the decision loop between two messages (policy swap,
    restriction, erasure): no message is decided while it runs."""

    run: Callable[[], Awaitable[Any]]
    done: asyncio.Future[Any]


class GatewayService:
    def __init__(
        self,
        config: GatewayConfig,
        policy: CompiledPolicy,
        key: bytes,
        store: ConsentStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = GatewayMetrics()
        self.ctx = DecisionContext(
            policy=policy,
            key=key,
            vehicle_prefix=config.vehicle_broker.topic_prefix,
            backend_prefix=config.backend_broker.topic_prefix,
        )
        self.states: dict[str, VehicleState] = {}
        self.coarse_fixes: dict[str, CoarseFix] = {}
        self._clock = clock
        self._queue: asyncio.Queue[InboundMessage | ControlOp | None] = asyncio.Queue()
        self.restricted: set[str] = set()
        self.policy_record: StoredPolicy | None = None
        # (vin, day, stream, feature, policy version) -> messages forwarded; flushed periodically.
        self._egress_counts: dict[tuple[str, str, str, str, str], int] = {}
        self._day_cache: tuple[float, float, str] = (0.0, 0.0, "")
        # Undecided messages: past the high-water mark the vehicle socket is
        # not read until the decision loop is back under the low-water mark.
        self._high_water = config.pipeline.inflight
        self._low_water = max(1, config.pipeline.inflight // 4)
        self._store_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-store")
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.ready = asyncio.Event()
        self.vehicle_edge: MqttEdge
        self.backend_edge: MqttEdge
        self._windows: dict[str, AckWindow] = {}
        self.metrics.policy_info.labels(policy.version, policy.digest[:16]).set(1)

    # -------------------------------------------------------------- lifecycle

    def load_state(self) -> int:
        """Enforce the last applied settings before any message is decided."""
        policy = self.ctx.policy
        self.restricted = self.store.restricted_vins()
        states: dict[str, VehicleState] = {}
        for stored in self.store.load_all():
            vin = stored.snapshot.vin
            state = state_from_snapshot(policy, stored.snapshot, stored.window_until)
            states[vin] = (
                dataclasses.replace(state, restricted=True) if vin in self.restricted else state
            )
        self.states = states
        self.metrics.vehicles.set(len(self.states))
        return len(self.states)

    def _record_policy(self) -> None:
        """Keep the running policy in the store, so it can be rolled back to."""
        policy = self.ctx.policy
        active = self.store.active_policy()
        if active is not None and active.digest == policy.digest:
            self.policy_record = active
            return
        now = self._clock()
        record = StoredPolicy(policy.version, policy.digest, policy.text, "config", now, now, True)
        audit = AuditRecord(
            actor="gateway",
            action="policy_loaded",
            subject=policy.version,
            content={"version": policy.version, "digest": policy.digest, "source": "config file"},
            at=now,
        )
        self.store.save_policy(record, audit)
        self.policy_record = record

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._store_executor, self._record_policy)
        count = await loop.run_in_executor(self._store_executor, self.load_state)
        log.info("loaded applied settings of %d vehicles", count, extra={"vehicles": count})
        vcfg, bcfg, inflight = (
            self.config.vehicle_broker,
            self.config.backend_broker,
            self.config.pipeline.inflight,
        )
        self.vehicle_edge = MqttEdge(
            name=VEHICLE,
            endpoint=vcfg.endpoint,
            client_id=self.config.client_id(vcfg),
            subscriptions=[f"{vcfg.topic_prefix}/#"],
            on_message=self._enqueue_vehicle_message,
            clean_start=False,  # persistent session: the broker queues while we are away
            session_expiry_s=vcfg.session_expiry_s or 86400,
            receive_maximum=inflight,
            max_inflight_publishes=inflight,
            keepalive_s=vcfg.keepalive_s,
            on_state_change=self._edge_state,
        )
        self.backend_edge = MqttEdge(
            name=BACKEND,
            endpoint=bcfg.endpoint,
            client_id=self.config.client_id(bcfg),
            subscriptions=[f"{bcfg.topic_prefix}/+/cmd/+"],
            on_message=self._queue.put_nowait,
            clean_start=bcfg.session_expiry_s == 0,
            session_expiry_s=bcfg.session_expiry_s,
            receive_maximum=inflight,
            max_inflight_publishes=inflight,
            keepalive_s=bcfg.keepalive_s,
            on_state_change=self._edge_state,
        )
        for edge in (self.vehicle_edge, self.backend_edge):
            self._windows[edge.name] = AckWindow(edge, self.metrics.inflight.labels(edge.name).set)
        self._tasks = [
            asyncio.create_task(self.backend_edge.run(), name="backend-edge"),
            asyncio.create_task(self.vehicle_edge.run(), name="vehicle-edge"),
            asyncio.create_task(self._decide_loop(), name="decide-loop"),
            asyncio.create_task(self._announce_ready(), name="ready"),
            asyncio.create_task(self._flush_counts_periodically(), name="egress-counts"),
        ]

    def _enqueue_vehicle_message(self, msg: InboundMessage) -> None:
        self._queue.put_nowait(msg)
        if self._queue.qsize() >= self._high_water:
            self.vehicle_edge.pause_reading()

    async def _announce_ready(self) -> None:
        await self.vehicle_edge.ready.wait()
        await self.backend_edge.ready.wait()
        self.ready.set()
        log.info(
            "gateway ready: policy %s, %d known vehicles",
            self.ctx.policy.version,
            len(self.states),
            extra={"policy_version": self.ctx.policy.version},
        )

    async def stop(self) -> None:
        """Finish what is in flight (bounded), then disconnect.

        Messages not yet decided stay unacknowledged: the broker keeps them
        for the next start.
        """
        if self._stopping:
            return
        self._stopping = True
        self._queue.put_nowait(None)
        timeout = self.config.pipeline.drain_timeout_s
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.drained.wait() for w in self._windows.values())), timeout
            )
        except TimeoutError:
            log.warning("stopping with messages still in flight (they will be redelivered)")
        for edge in (self.vehicle_edge, self.backend_edge):
            await edge.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush_counts()
        self._store_executor.shutdown(wait=True)
        self.store.close()
        log.info("gateway stopped", extra=self.summary())

    def summary(self) -> dict[str, float]:
        m = self.metrics
        return {
            "received": sum(
                m.value("gateway_messages_received_total", source=s) for s in (VEHICLE, BACKEND)
            ),
            "settings_applied": m.value("gateway_settings_applied_total"),
            "internal_errors": m.value("gateway_internal_errors_total"),
        }

    def _edge_state(self, name: str, connected: bool) -> None:
        self.metrics.connected.labels(name).set(1 if connected else 0)

    # ---------------------------------------------------------------- pipeline

    async def _decide_loop(self) -> None:
        edges = {VEHICLE: self.vehicle_edge, BACKEND: self.backend_edge}
        queue, vehicle_edge, low_water = self._queue, self.vehicle_edge, self._low_water
        while True:
            msg = await queue.get()
            if msg is None or self._stopping:
                return
            if vehicle_edge.reading_paused and queue.qsize() <= low_water:
                vehicle_edge.resume_reading()
            if isinstance(msg, ControlOp):
                try:
                    msg.done.set_result(await msg.run())
                except Exception as exc:
                    msg.done.set_exception(exc)
                continue
            if msg.generation != edges[msg.source].generation:
                continue  # received over a lost connection: the broker redelivers it
            self.metrics.inc(self.metrics.received, msg.source)
            slot = self._windows[msg.source].open(msg)
            try:
                if msg.source == VEHICLE:
                    await self._handle_vehicle_message(msg, slot)
                else:
                    await self._handle_command(msg, slot)
            except Exception:
                # A bug must not wedge the pipeline with a poison message:
                # nothing was forwarded (fail closed); count it and go on.
                log.exception("internal error deciding %s", msg.topic)
                self.metrics.internal_errors.inc()
                if not slot.done:
                    slot.settle()

    async def _handle_vehicle_message(self, msg: InboundMessage, slot: _Slot) -> None:
        started = time.perf_counter()
        decision = decide(
            self.ctx, msg.topic, msg.payload, self.states, self.coarse_fixes, self._clock()
        )
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        if isinstance(decision, Forward):
            if decision.coarse_fix is not None:
                self.coarse_fixes[decision.vin] = decision.coarse_fix
            self.metrics.inc(self.metrics.forwarded, decision.stream, decision.feature)
            key = (
                decision.vin,
                self._day(),
                decision.stream,
                decision.feature,
                self.ctx.policy.version,
            )
            self._egress_counts[key] = self._egress_counts.get(key, 0) + 1
            for transform in decision.transforms:
                self.metrics.inc(self.metrics.transforms, transform)
            self._deliver(
                self.backend_edge,
                decision.topic,
                decision.payload,
                decision.user_properties,
                slot.settle,
            )
        elif isinstance(decision, Drop):
            self.metrics.inc(self.metrics.dropped, decision.stream, decision.reason.value)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("drop %s: %s %s", msg.topic, decision.reason, decision.detail)
            if decision.reannounce is not None:
                topic, body = decision.reannounce
                self._deliver(self.vehicle_edge, topic, body, (), slot.settle)
            else:
                slot.settle()
        elif isinstance(decision, ApplySettings):
            await self._apply_settings(decision, slot)

    async def _apply_settings(self, decision: ApplySettings, slot: _Slot) -> None:
        snapshot = decision.snapshot
        record = AuditRecord(
            actor="vehicle",
            action="settings_applied",
            subject=self.audit_subject(snapshot.vin),
            content={
                "vin": snapshot.vin,
                "revision": snapshot.revision,
                "privacy_mode": snapshot.privacy_mode,
                "location": snapshot.location.name,
                "features": snapshot.features,
                "policy_version": snapshot.policy_version,
            },
            at=snapshot.applied_at,
        )
        # Durable before it is announced and before the next message is decided.
        await self._persist(self.store.apply_settings, snapshot, record)
        state = decision.state
        if snapshot.vin in self.restricted and not state.restricted:
            state = dataclasses.replace(state, restricted=True)
        self.states[snapshot.vin] = state
        self.metrics.settings_applied.inc()
        self.metrics.vehicles.set(len(self.states))
        log.info(
            "settings applied",
            extra={
                "vin": snapshot.vin,
                "revision": snapshot.revision,
                "privacy_mode": snapshot.privacy_mode,
                "location": snapshot.location.name,
            },
        )
        self._deliver(
            self.vehicle_edge, decision.applied_topic, decision.applied_payload, (), slot.settle
        )

    async def _handle_command(self, msg: InboundMessage, slot: _Slot) -> None:
        decision = decide_command(self.ctx, msg.topic, msg.payload, self.states, self._clock())
        if decision is None:
            self.metrics.dropped.labels("command", "unknown_topic").inc()
            slot.settle()
            return
        self.metrics.commands.labels(decision.command, str(decision.accepted).lower()).inc()
        if decision.state is not None:
            await self._persist(self.store.open_window, decision.vin, decision.state.window_until)
            self.states[decision.vin] = decision.state
        log.info(
            "command %s",
            "forwarded" if decision.accepted else "refused",
            extra={"vin": decision.vin, "command": decision.command, "reason": decision.reason},
        )

        def publish_result() -> None:
            self._deliver(
                self.backend_edge, decision.result_topic, decision.result_payload, (), slot.settle
            )

        if decision.accepted and decision.forward_topic and decision.forward_payload is not None:
            self._deliver(
                self.vehicle_edge,
                decision.forward_topic,
                decision.forward_payload,
                (),
                publish_result,
            )
        else:
            publish_result()

    # ------------------------------------------------------- control operations

    async def run_control(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run `run` inside the decision loop, between two messages."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(ControlOp(run, done))
        return await done

    def audit_subject(self, vin: str) -> str:
        """Keyed hash of a VIN for the audit ledger (never the VIN itself)."""
        return pseudonym(self.ctx.key, "audit-subject", vin)

    async def swap_policy(
        self,
        policy: CompiledPolicy,
        record: StoredPolicy,
        audit: AuditRecord,
        *,
        activate_only: bool = False,
    ) -> None:
        """Persist, then switch every later message to `policy` (atomically)."""

        async def run() -> None:
            if activate_only:
                await self._persist_once(
                    self.store.activate_policy, record.version, audit.at, audit
                )
            else:
                await self._persist_once(self.store.save_policy, record, audit)
            old = self.ctx.policy
            self.ctx = dataclasses.replace(self.ctx, policy=policy)
            self.policy_record = dataclasses.replace(record, applied_at=audit.at, active=True)
            if (old.default_on, old.features.keys(), old.per_app_features) != (
                policy.default_on,
                policy.features.keys(),
                policy.per_app_features,
            ):
                # Which features a snapshot enables depends on the policy.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._store_executor, self.load_state)
            self.metrics.policy_info.clear()
            self.metrics.policy_info.labels(policy.version, policy.digest[:16]).set(1)
            log.info("policy %s active", policy.version, extra={"policy_version": policy.version})

        await self.run_control(run)

    async def set_restriction(self, vin: str, restricted: bool, actor: str) -> bool:
        async def run() -> bool:
            record = AuditRecord(
                actor=actor,
                action="restriction_set" if restricted else "restriction_lifted",
                subject=self.audit_subject(vin),
                content={"vin": vin},
                at=self._clock(),
            )
            changed = await self._persist_once(self.store.set_restriction, vin, restricted, record)
            if restricted:
                self.restricted.add(vin)
            else:
                self.restricted.discard(vin)
            state = self.states.get(vin)
            if state is not None:
                self.states[vin] = dataclasses.replace(state, restricted=restricted)
            return bool(changed)

        return await self.run_control(run)

    async def erase_vehicle(self, vin: str, actor: str) -> dict[str, Any]:
        """Art. 17: forget the vehicle, tell downstream systems, fail closed after."""

        async def run() -> dict[str, Any]:
            now = self._clock()
            subject = self.audit_subject(vin)
            apps = sorted(
                {k[3].partition(".")[2] for k in self._egress_counts if k[0] == vin and "." in k[3]}
                | {
                    c.feature.partition(".")[2]
                    for c in await self._persist_once(self.store.egress_counts, vin)
                    if "." in c.feature
                }
            )
            record = AuditRecord(actor=actor, action="erasure", subject=subject, content={}, at=now)
            removed = await self._persist_once(self.store.erase_vehicle, vin, subject, record)
            self.states.pop(vin, None)
            self.coarse_fixes.pop(vin, None)
            self.restricted.discard(vin)
            for key in [k for k in self._egress_counts if k[0] == vin]:
                del self._egress_counts[key]
            self.metrics.vehicles.set(len(self.states))
            refs = [pseudonym(self.ctx.key, f"vin/{app}", vin) for app in apps]
            event = ErasureEvent(vin=vin, refs=refs, erased_at_ms=int(now * 1000), reason="art17")
            topic = f"{self.ctx.backend_prefix}/{vin}/erasure"
            delivered = asyncio.get_running_loop().create_future()
            self._deliver(
                self.backend_edge,
                topic,
                event.SerializeToString(),
                (),
                lambda: delivered.set_result(None),
            )
            await delivered
            return {"removed": removed, "erasure_event_topic": topic, "pseudonymous_refs": refs}

        return await self.run_control(run)

    async def _persist_once(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call for a control operation: failures go back to the caller."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_executor, fn, *args)

    def _day(self) -> str:
        now = self._clock()
        start, end, day = self._day_cache
        if not start <= now < end:
            midnight = now - now % 86400
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self._day_cache = (midnight, midnight + 86400, day)
        return day

    async def flush_counts(self) -> None:
        counts, self._egress_counts = self._egress_counts, {}
        if counts:
            rows = [EgressCount(*key, count) for key, count in counts.items()]
            await self._persist(self.store.add_egress_counts, rows)

    async def _flush_counts_periodically(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush_counts()

    # ------------------------------------------------------------------ I/O

    def _deliver(
        self,
        edge: MqttEdge,
        topic: str,
        payload: bytes,
        user_properties: Sequence[tuple[str, str]],
        on_done: Callable[[], None],
        attempt: int = 0,
    ) -> None:
        """Publish at QoS 1 and call `on_done` once PUBACKed, retrying refusals."""
        future = edge.publish(topic, payload, user_properties)

        def completed(fut: asyncio.Future[None]) -> None:
            exc = fut.exception()
            if exc is None:
                on_done()
                return
            delay = min(30.0, 0.2 * 2**attempt)
            self.metrics.publish_retries.labels(edge.name).inc()
            log.error(
                "publish to %s refused (%s); retrying in %.1fs",
                topic,
                exc,
                delay,
                extra={"edge": edge.name, "attempt": attempt + 1},
            )
            asyncio.get_running_loop().call_later(
                delay, self._deliver, edge, topic, payload, user_properties, on_done, attempt + 1
            )

        future.add_done_callback(completed)

    async def _persist(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a store write off the loop; on failure retry, holding the pipeline.

        Nothing after this message is decided until its state is durable
        (fail closed rather than enforce something we could forget).
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                await loop.run_in_executor(self._store_executor, fn, *args)
                return
            except Exception as exc:
                attempt += 1
                delay = min(10.0, 0.1 * 2**attempt)
                log.error("consent store write failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)


__all__ = ["AckWindow", "GatewayService", "PublishRefused"]
