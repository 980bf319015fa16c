"""The running gateway: edges -> decision core -> edges, with durable state.

Delivery guarantee (at least once): a message received from a broker is
acknowledged only when its outcome is final — forwarded and PUBACKed by the
destination broker, or deliberately dropped — and acknowledgements go out
in arrival order. A crash at any point leaves the message unacknowledged,
and the broker redelivers it to the restarted gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.config import GatewayConfig
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
from gateway.edges.mqtt import InboundMessage, MqttEdge, PublishRefused
from gateway.metrics import GatewayMetrics
from gateway.policy import CompiledPolicy
from gateway.store import ConsentStore

log = logging.getLogger("gateway.service")

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
        self._queue: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
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
        for stored in self.store.load_all():
            self.states[stored.snapshot.vin] = state_from_snapshot(
                policy, stored.snapshot, stored.window_until
            )
        self.metrics.vehicles.set(len(self.states))
        return len(self.states)

    async def start(self) -> None:
        count = await asyncio.get_running_loop().run_in_executor(
            self._store_executor, self.load_state
        )
        log.info("loaded applied settings of %d vehicles", count, extra={"vehicles": count})
        vcfg, bcfg, inflight = (
            self.config.vehicle_broker,
            self.config.backend_broker,
            self.config.pipeline.inflight,
        )
        self.vehicle_edge = MqttEdge(
            name=VEHICLE,
            endpoint=vcfg.endpoint,
            client_id=vcfg.client_id,
            subscriptions=[f"{vcfg.topic_prefix}/#"],
            on_message=self._queue.put_nowait,
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
            client_id=bcfg.client_id,
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
        ]

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
        while True:
            msg = await self._queue.get()
            if msg is None or self._stopping:
                return
            if msg.generation != edges[msg.source].generation:
                continue  # received over a lost connection: the broker redelivers it
            self.metrics.received.labels(msg.source).inc()
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
            self.metrics.forwarded.labels(decision.stream, decision.feature).inc()
            for transform in decision.transforms:
                self.metrics.transforms.labels(transform).inc()
            self._deliver(
                self.backend_edge,
                decision.topic,
                decision.payload,
                decision.user_properties,
                slot.settle,
            )
        elif isinstance(decision, Drop):
            self.metrics.dropped.labels(decision.stream, decision.reason.value).inc()
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
        # Durable before it is announced and before the next message is decided.
        await self._persist(self.store.apply_settings, snapshot)
        self.states[snapshot.vin] = decision.state
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
